"""Recorded benchmark runs (bench/results/), found wherever a chapter runs.

`bench/*.py` write their results to `bench/results/<name>_<device>.json`; chapters read them
back to show figures a reader's machine cannot measure (an H100 run on a laptop, say). From a
clone of the repository they are in `bench/results/`; `pip install kvlib` ships the same
files inside the package as `kvlib.results`, so a chapter opened on Colab, or run from any
folder, finds them too. The repository's copy comes first, so a run just recorded is the one
read.

>>> sorted(p.name for p in files("gpu_decode_*.json"))[:1]
['gpu_decode_nvidia-h100-80gb-hbm3.json']
>>> load("paged_decode_cpu-2-cores-x86_64.json")["batch"]
8
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_KVLIB = Path(__file__).resolve().parents[1]
_REPOSITORY = _KVLIB.parent / "bench" / "results"  # a clone, or an editable install
_PACKAGED = _KVLIB / "results"  # kvlib.results of an installed wheel (data, no code)


def folders() -> list[Path]:
    """Where recorded runs are looked for, in order: the repository's bench/results, then
    the copy inside the installed package (whichever exist)."""
    return [folder for folder in (_REPOSITORY, _PACKAGED) if folder.is_dir()]


def path(name: str) -> Path:
    """The recorded file `name` (e.g. 'engine_cpu-2-cores-x86_64.json').

    Raises:
        FileNotFoundError: no folder holds it; the message names the folders searched.
    """
    for folder in folders():
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no recorded run named {name!r} in {[str(f) for f in folders()]}")


def load(name: str) -> Any:
    """The recorded JSON file `name`, parsed."""
    return json.loads(path(name).read_text())


def files(pattern: str) -> list[Path]:
    """Every recorded file matching the glob `pattern`, one per name (the first folder's)."""
    seen: dict[str, Path] = {}
    for folder in folders():
        for p in sorted(folder.glob(pattern)):
            seen.setdefault(p.name, p)
    return sorted(seen.values(), key=lambda p: p.name)
