"""Timing helpers: warm up, repeat, report the median and the device it ran on.

On a GPU, kernels run asynchronously: a wall clock read right after a call measures the
launch, not the work. So on CUDA each repeat is bracketed by a pair of `torch.cuda.Event`s
and the device is synchronized before the times are read. On the CPU, `time.perf_counter`
is enough. The median of the repeats resists the odd slow run; the minimum is kept too.

>>> timing = Timing(times_s=(0.003, 0.001, 0.002), device="cpu")
>>> timing.median_s, timing.min_s
(0.002, 0.001)
>>> str(timing)
'2.00 ms (median of 3, cpu)'
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")
V = TypeVar("V", bound=Hashable)


@dataclass(frozen=True)
class Timing:
    """Seconds taken by each timed repeat, and the device they ran on."""

    times_s: tuple[float, ...]
    device: str

    def __post_init__(self) -> None:
        if len(self.times_s) == 0:
            raise ValueError("Timing.times_s must hold at least one time, got none")
        if any(t < 0 for t in self.times_s):
            raise ValueError(f"Timing.times_s must be >= 0, got {self.times_s}")

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def median_ms(self) -> float:
        return 1000 * self.median_s

    def __str__(self) -> str:
        ms = self.median_ms
        shown = f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"  # 1.23 ms, or 0.0456 ms
        return f"{shown} ms (median of {len(self.times_s)}, {self.device})"


def _as_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must name a torch device like 'cpu' or 'cuda', "
                         f"got {device!r} ({err})") from None


def device_name(device: str | torch.device = "cpu") -> str:
    """A short description of the hardware, printed beside every timing in the book.

    e.g. "cpu (2 cores, x86_64)" or "NVIDIA H100 80GB HBM3".
    """
    dev = _as_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use, not the host's
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return f"{dev.type} ({cores} cores, {platform.machine()})"


def measure(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5,
            device: str | torch.device = "cpu") -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times timed, one time per call.

    Warm-up calls absorb one-off costs: allocator growth, kernel compilation, cold caches.
    """
    for name, value, minimum in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    dev = _as_device(device)
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        times_s = _time_cuda(fn, repeats, dev)
    else:
        times_s = _time_wall_clock(fn, repeats)
    return Timing(times_s=tuple(times_s), device=device_name(dev))


def _time_wall_clock(fn: Callable[[], Any], repeats: int) -> list[float]:
    times_s = []
    for _ in range(repeats):
        start = time.perf_counter()  # via the module, so tests can substitute a fake clock
        fn()
        times_s.append(time.perf_counter() - start)
    return times_s


def _time_cuda(fn: Callable[[], Any], repeats: int, dev: torch.device) -> list[float]:
    torch.cuda.synchronize(dev)  # let warm-up work finish before the first event
    pairs = []
    with torch.cuda.device(dev):
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
    torch.cuda.synchronize(dev)  # events hold times only once the device reaches them
    return [start.elapsed_time(end) / 1000 for start, end in pairs]  # ms -> s


def _bar(iterable: Iterable[T], desc: str, enabled: bool, total: int | None) -> Iterable[T]:
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, total=total)


def progress(iterable: Iterable[T], *, desc: str, enabled: bool = True,
             total: int | None = None) -> Iterable[T]:
    """A progress bar over `iterable` (terminal or notebook), or the iterable itself if off."""
    return _bar(iterable, desc, enabled, total)


def sweep(fn: Callable[[V], Any], values: Iterable[V], *, warmup: int = 2, repeats: int = 5,
          device: str | torch.device = "cpu", progress: bool = True,
          desc: str = "sweep") -> dict[V, Timing]:
    """Time `fn(value)` for each value, in order, with a progress bar.

    >>> timings = sweep(lambda n: sum(range(n)), [10, 1000], repeats=3, progress=False)
    >>> list(timings), len(timings[1000].times_s)
    ([10, 1000], 3)
    """
    values = list(values)
    if len(set(values)) != len(values):
        raise ValueError(f"sweep values must be distinct (they key the result), got {values}")
    timings = {}
    # `progress` is a flag here, shadowing the function above; both share _bar.
    for value in _bar(values, desc, progress, len(values)):
        call = functools.partial(fn, value)  # fn(value), bound now, not at call time
        timings[value] = measure(call, warmup=warmup, repeats=repeats, device=device)
    return timings
