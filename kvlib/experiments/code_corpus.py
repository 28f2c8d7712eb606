"""The book model's text: the Python standard library's own source, on every machine offline.

The corpus is every `.py` file under the running interpreter's standard library except
tests (folders `test`, `tests`, `idle_test`, files `test_*.py`), installed packages
(`site-packages`) and the build's own settings (`_sysconfigdata_*.py`, written when Python
was compiled, so it differs from machine to machine). Files are named by their path relative to the library's root, with `/`
on every system. The held-out split is *by file*: whole modules the model never saw, drawn
by a seeded shuffle, so that a held-out file shares no lines with the training text beyond
what two modules of one library share anyway.

>>> split_files(["a.py", "b.py", "c.py", "d.py"], heldout_fraction=0.25, seed=0)
(['a.py', 'b.py', 'c.py'], ['d.py'])
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from collections.abc import Sequence
from pathlib import Path

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
SKIP_PREFIXES = ("test_", "_sysconfigdata")


def stdlib_root() -> Path:
    """The running interpreter's standard library folder (e.g. `.../lib/python3.11`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None) -> list[str]:
    """Every non-test `.py` file under `root` (default: the standard library), sorted."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"no standard library folder at {root}")
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if (SKIP_DIRS.isdisjoint(rel.parts[:-1])
                and not rel.name.startswith(SKIP_PREFIXES)):
            files.append(rel.as_posix())
    return sorted(files)


def read_source(name: str, root: Path | None = None) -> str:
    """One corpus file's text (UTF-8, as Python 3 source is unless it says otherwise)."""
    root = stdlib_root() if root is None else Path(root)
    return (root / name).read_bytes().decode("utf-8")


def corpus_hash(names: Sequence[str], root: Path | None = None) -> str:
    """sha256 over every file's name and bytes, in the order given: one line names a corpus."""
    root = stdlib_root() if root is None else Path(root)
    h = hashlib.sha256()
    for name in names:
        data = (root / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def split_files(names: Sequence[str], heldout_fraction: float,
                seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) file names, each sorted: a seeded shuffle, the last
    `round(heldout_fraction * len(names))` files (at least one) held out."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    if len(names) < 2:
        raise ValueError(f"a split needs at least 2 files, got {len(names)}")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    k = max(1, round(heldout_fraction * len(order)))
    return sorted(order[:-k]), sorted(order[-k:])
