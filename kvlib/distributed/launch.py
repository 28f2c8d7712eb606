"""Starting a group of processes that talk through `torch.distributed`, bounded in time.

    results = run_ranks(worker, world_size=2, args=(requests,), timeout_s=120)

starts `world_size` processes (torch.multiprocessing, "spawn"), joins them into one process
group -- gloo on a CPU, NCCL when every rank has a GPU of its own -- and calls
`worker(rank, world_size, *args)` in each; the list of their return values comes back, in rank
order. Whatever happens, it ends by itself: a rank that raises ends the run with its traceback,
and after `timeout_s` seconds every process still running is killed and `TimeoutError` says
which ranks had not finished. (`torchrun --nproc-per-node 2 script.py` starts the same group
from a shell; a worker then calls `init_group` itself.)

A rank listed in `may_exit` may die without a result (a test of a peer that disappears
mid-transfer): its entry is None.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def default_backend(world_size: int) -> str:
    """NCCL when every rank can have a GPU of its own, gloo otherwise (the CPU)."""
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    return "nccl" if cuda else "gloo"


def init_group(rank: int, world_size: int, init_method: str, backend: str,
               timeout_s: float) -> torch.device:
    """Join the process group; the device this rank computes on."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: the loopback interface
    dist.init_process_group(backend, init_method=init_method, rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _entry(worker: Callable[..., Any], rank: int, world_size: int, init_method: str,
           backend: str, timeout_s: float, threads: int, results: Any,
           args: Sequence[Any]) -> None:
    torch.set_num_threads(threads)
    try:
        init_group(rank, world_size, init_method, backend, timeout_s)
        value = worker(rank, world_size, *args)
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 -- reported to the parent, which raises it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(worker: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *,
              timeout_s: float = 120.0, backend: str | None = None, threads: int = 1,
              may_exit: Collection[int] = ()) -> list[Any]:
    """Run `worker(rank, world_size, *args)` in `world_size` processes; their results.

    `worker` must be importable by name (a module-level function): spawned processes
    import it afresh. Raises RuntimeError (with the rank's traceback) if a rank fails,
    TimeoutError if the run outlives `timeout_s`; either way no process is left behind.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = default_backend(world_size) if backend is None else backend
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{Path(tmp) / 'rendezvous'}"
        procs = [ctx.Process(target=_entry, daemon=True,
                             args=(worker, rank, world_size, init_method, backend, timeout_s,
                                   threads, results, tuple(args)))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout_s, set(may_exit))
        finally:
            for p in procs:  # NOTE: every path ends here, so no process outlives the call
                if p.is_alive():
                    p.kill()
                p.join(timeout=10)


def _collect(procs: list, results: Any, world_size: int, timeout_s: float,
             may_exit: set[int]) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    out: dict[int, Any] = {}
    dead: set[int] = set()  # found exited with no result; declared so one poll later
    while len(out) < world_size:
        try:
            rank, status, value = results.get(timeout=0.2)
        except queue.Empty:
            for rank in sorted(dead - set(out)):  # NOTE: its last message had time to arrive
                if rank not in may_exit:
                    raise RuntimeError(f"rank {rank} exited with code {procs[rank].exitcode} "
                                       f"without a result") from None
                out[rank] = None
            dead = {r for r, p in enumerate(procs) if r not in out and p.exitcode is not None}
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(out))
                raise TimeoutError(f"ranks {missing} had not finished after {timeout_s:.0f} s; "
                                   f"every process was stopped") from None
            continue
        if status == "error":
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        out[rank] = value
    return [out[r] for r in range(world_size)]
