"""kvlib as a reader on Colab gets it: `pip install kvlib` from the repository, then a chapter
run in a folder that is not the repository.

The wheel is built from a copy of what pyproject.toml packages (kvlib/ and bench/results/),
installed with `pip install --target` into a temporary folder (its dependencies come from the
running environment, so nothing is downloaded), and chapter 7 is executed from another
temporary folder with only that install on the path. The chapter must run without errors,
import kvlib from the install, and show the recorded GPU runs, which live in
bench/results/ of the repository and travel inside the package as `kvlib.results`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "book" / "07_gpu_mapping.ipynb"


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "kvlib").rglob("__init__.py")}
    listed = set(config["packages"])
    assert on_disk <= listed, f"add to pyproject.toml's packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == {"kvlib.results"}
    assert config["package-dir"]["kvlib.results"] == "bench/results"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """kvlib built into a wheel and installed (no dependencies) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("pip")
    src = tmp / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copytree(ROOT / "kvlib", src / "kvlib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(ROOT / "bench" / "results", src / "bench" / "results")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                    str(src)], check=True, cwd=tmp, capture_output=True)
    (wheel,) = (tmp / "dist").glob("kvlib-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    assert (site / "kvlib" / "results" / "gpu_decode_nvidia-h100-80gb-hbm3.json").exists()
    return site


@pytest.mark.parametrize("name", ["stdlib-lm", "stdlib-lm-copying"])
def test_the_wheel_carries_the_book_models(installed, name):
    """kvlib.book_model's checkpoints are package data: a pip install has all of them."""
    shipped = ROOT / "kvlib" / "assets" / name
    got = installed / "kvlib" / "assets" / name
    assert {p.name for p in got.iterdir()} == {p.name for p in shipped.iterdir()}
    assert (got / "model.safetensors").stat().st_size == (shipped / "model.safetensors").stat().st_size


def test_a_chapter_runs_from_a_pip_install_outside_the_repository(installed, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from execute_notebooks import CurrentPythonKernelSpecs
    finally:
        sys.path.pop(0)
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(CHAPTER, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import kvlib\nprint('kvlib from', kvlib.__file__)"))
    km = KernelManager(kernel_name="python3", kernel_spec_manager=CurrentPythonKernelSpecs())
    client = NotebookClient(nb, km=km, timeout=300, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)  # the install, not the repository
    client.execute(env=env, cwd=str(tmp_path))
    text = "\n".join(
        "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
        + "".join(o.get("data", {}).get("text/markdown", ""))
        for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert f"kvlib from {installed / 'kvlib'}" in text
    assert "**NVIDIA H100 80GB HBM3**, 2026-11-26" in text  # the recorded run, read back
    assert "throughput against SDPA" in text  # the recorded launch sweep too
    for missing in ("not beside this copy", "No GPU run of bench/gpu_decode.py is recorded"):
        assert missing not in text
