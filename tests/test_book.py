"""Checks on the book's sources: every chapter is listed, executed, set up the same way, and
ignores only the outputs that legitimately vary (timings)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_NOTEBOOK_BYTES = 3 * 2**20  # every state of every widget is stored in the notebook
TIMING_CALLS = re.compile(r"\b(measure|sweep|decode_timings|time_[a-z_]+)\(")


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", [toc]):
        files += [entry["file"] for entry in part.get("chapters", [])]
    return files


CHAPTERS = [ROOT / f"{name}.ipynb" for name in _toc_files()]


def _code_cells(path: Path) -> list[dict]:
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code"]


def test_every_notebook_is_in_the_toc():
    on_disk = sorted((ROOT / "book").glob("*.ipynb"))
    assert on_disk == sorted(CHAPTERS), "book/*.ipynb and _toc.yml disagree"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_committed_executed_without_errors(path):
    cells = _code_cells(path)
    assert cells, f"{path.name} has no code"
    unrun = [i for i, c in enumerate(cells) if c["execution_count"] is None]
    assert not unrun, f"{path.name}: code cells {unrun} were not executed (run `make execute`)"
    errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{path.name}: stored error outputs {[e['ename'] for e in errors]}"
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: run out of order: {counts}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_first_cell_installs_kvlib_from_the_configured_repository(path):
    repo_url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    setup = "".join(_code_cells(path)[0]["source"])
    assert f'REPO_URL = "{repo_url}"' in setup, (
        f"{path.name}: the setup cell's REPO_URL must be _config.yml's repository.url "
        f"({repo_url}); change both together"
    )
    assert 'device = "cuda" if torch.cuda.is_available() else "cpu"' in setup
    tags = _code_cells(path)[0].get("metadata", {}).get("tags", [])
    assert "hide-input" in tags, f"{path.name}: fold the setup cell in the HTML (hide-input tag)"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_notebook_weighs_under_3_mb(path):
    size = path.stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, (
        f"{path.name} is {size / 2**20:.2f} MiB (limit 3 MiB): shrink widget grids or figures"
    )


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_only_timing_cells_ignore_their_output(path):
    for cell in _code_cells(path):
        source = "".join(cell["source"])
        tags = cell.get("metadata", {}).get("tags", [])
        assert "nbval-skip" not in tags and "NBVAL_SKIP" not in source, (
            f"{path.name}: a skipped cell hides it from nbval:\n{source[:200]}"
        )
        assert "NBVAL_IGNORE_OUTPUT" not in source, (
            f"{path.name}: the HTML would show the comment; tag the cell nbval-ignore-output:\n"
            f"{source[:200]}"
        )
        if "nbval-ignore-output" in tags:
            assert TIMING_CALLS.search(source), (
                f"{path.name}: only cells that time something may ignore their output:\n"
                f"{source[:200]}"
            )
