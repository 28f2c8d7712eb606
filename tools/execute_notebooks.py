"""Re-execute book chapters in place, keeping widget state, for `make execute`.

Usage: python tools/execute_notebooks.py [--timeout SECONDS] [--allow-errors] NOTEBOOK...

Each notebook runs top to bottom in a fresh kernel started with *this* Python (the
project's venv), with the notebook's folder as the working directory. Outputs and the
widget state (so the HTML book can show live widgets) are written back to the file.
A cell that raises, or runs longer than the timeout, stops that notebook, leaves its file
untouched and makes the script exit non-zero. Cells tagged `raises-exception` may raise.
Cells that take longer than SLOW_CELL_S are named as they finish, to show where time goes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

SLOW_CELL_S = 10.0


class CurrentPythonKernelSpecs(KernelSpecManager):
    """Every kernel name resolves to an IPython kernel on the running interpreter."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="Python 3 (ipykernel)",
            language="python",
            name=kernel_name,
        )


def execute(path: Path, timeout: int, allow_errors: bool) -> None:
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=CurrentPythonKernelSpecs())
    client = NotebookClient(
        nb,
        km=km,
        timeout=timeout,
        allow_errors=allow_errors,
        store_widget_state=True,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    started = {}
    client.on_cell_execute = lambda cell, cell_index: started.update(
        {cell_index: time.perf_counter()})

    def report_slow(cell, cell_index, execute_reply):
        seconds = time.perf_counter() - started.get(cell_index, time.perf_counter())
        if seconds > SLOW_CELL_S:
            first_line = cell.source.strip().splitlines()[0][:60] if cell.source.strip() else ""
            print(f"  cell {cell_index} took {seconds:.0f} s: {first_line}", flush=True)

    client.on_cell_executed = report_slow
    client.execute()
    nbformat.validate(nb)
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell (300)")
    parser.add_argument(
        "--allow-errors",
        action="store_true",
        help="keep going past cells that raise (only to make test fixtures)",
    )
    args = parser.parse_args(argv)

    failed = []
    for path in args.notebooks:
        start = time.perf_counter()
        print(f"executing {path} ...", flush=True)
        try:
            execute(path, args.timeout, args.allow_errors)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
            print(f"FAILED {path}: {exc}", file=sys.stderr, flush=True)
            failed.append(path)
            continue
        print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
