"""kvlib.bench: call counts, a fake clock, argument checks, sweeps and progress bars."""

import pytest
import torch

from kvlib import bench
from kvlib.bench import Timing, device_name, measure, progress, sweep


class Counter:
    def __init__(self):
        self.calls = []

    def __call__(self, value=None):
        self.calls.append(value)


def fake_clock(monkeypatch, readings):
    """Make bench's `time.perf_counter` return `readings` in order, and fail past the end."""
    it = iter(readings)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(it))


def test_measure_calls_fn_warmup_plus_repeats_times():
    fn = Counter()
    timing = measure(fn, warmup=3, repeats=4)
    assert len(fn.calls) == 3 + 4
    assert len(timing.times_s) == 4


def test_measure_with_no_warmup():
    fn = Counter()
    measure(fn, warmup=0, repeats=1)
    assert len(fn.calls) == 1


def test_median_and_min_of_a_fake_clock(monkeypatch):
    # (start, end) pairs: durations 3, 1, 2, 5, 4 seconds. Warm-up calls read no clock, so
    # any extra reading would shift the pairs and break the durations.
    fake_clock(monkeypatch, [0, 3, 10, 11, 20, 22, 30, 35, 40, 44])
    timing = measure(Counter(), warmup=2, repeats=5, device="cpu")
    assert timing.times_s == (3, 1, 2, 5, 4)
    assert timing.median_s == 3
    assert timing.min_s == 1
    assert timing.median_ms == 3000
    assert str(timing) == f"3000.00 ms (median of 5, {device_name('cpu')})"


def test_timing_str_and_even_count_median():
    assert str(Timing((0.00123,), "cpu")) == "1.23 ms (median of 1, cpu)"
    assert str(Timing((0.0000456,), "cpu")) == "0.0456 ms (median of 1, cpu)"
    assert Timing((1.0, 2.0, 3.0, 10.0), "cpu").median_s == 2.5


@pytest.mark.parametrize("times", [(), (0.1, -0.1)])
def test_timing_rejects_empty_or_negative(times):
    with pytest.raises(ValueError, match="Timing.times_s"):
        Timing(times, "cpu")


@pytest.mark.parametrize("kwargs, name", [
    ({"warmup": -1}, "warmup"),
    ({"warmup": 1.5}, "warmup"),
    ({"repeats": 0}, "repeats"),
    ({"repeats": True}, "repeats"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    fn = Counter()
    with pytest.raises(ValueError, match=f"{name} must be an int"):
        measure(fn, **kwargs)
    assert fn.calls == []  # checked before anything runs


def test_bad_device_raises():
    with pytest.raises(ValueError, match="device must name a torch device"):
        measure(Counter(), device="not-a-device")


def test_device_name_on_cpu():
    name = device_name("cpu")
    assert name.startswith("cpu (") and " cores, " in name


def test_sweep_returns_one_timing_per_value_in_order():
    fn = Counter()
    timings = sweep(fn, iter([8, 2, 5]), warmup=1, repeats=2, progress=False, desc="test")
    assert list(timings) == [8, 2, 5]
    assert all(isinstance(t, Timing) and len(t.times_s) == 2 for t in timings.values())
    assert fn.calls == [8] * 3 + [2] * 3 + [5] * 3  # each value: 1 warm-up + 2 repeats


def test_sweep_with_progress_bar(capsys):
    timings = sweep(Counter(), [1, 2], warmup=0, repeats=1, progress=True, desc="sizes")
    assert list(timings) == [1, 2]
    assert "sizes" in capsys.readouterr().err


def test_sweep_rejects_repeated_values():
    with pytest.raises(ValueError, match="distinct"):
        sweep(Counter(), [1, 2, 1], progress=False)


def test_progress_disabled_returns_the_iterable_itself():
    items = [1, 2, 3]
    assert progress(items, desc="x", enabled=False) is items


def test_progress_enabled_yields_the_same_items():
    assert list(progress(range(4), desc="x", total=4)) == [0, 1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measure_on_cuda_uses_events():
    x = torch.randn(512, 512, device="cuda")
    timing = measure(lambda: x @ x, warmup=1, repeats=3, device="cuda")
    assert len(timing.times_s) == 3 and timing.min_s > 0
    assert timing.device == torch.cuda.get_device_name(0)
