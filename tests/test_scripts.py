"""The command-line entry points run and print what they promise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_python_m_kvlib_prints_measured_tables():
    out = _run("-m", "kvlib", "--new-tokens", "16")
    assert "identical tokens: True" in out
    for section in ("1. Generation", "2. One decode step", "3. KV cache of real models",
                    "4. Decode attention"):
        assert section in out
    # 131,072 B per token; 8,192 tokens of it are exactly 1 GiB
    assert re.search(r"llama-3-8b +128 KiB +1.00 GiB", out)


def test_incremental_bench_ends_with_json_speedups():
    out = _run("bench/incremental.py", "--lengths", "16", "64", "--repeats", "2")
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last["speedup_by_len"]) == {"16", "64"}
    assert all(x > 0 for x in last["speedup_by_len"].values())
    for s in ("16", "64"):
        ratio = last["uncached_ms"][s] / last["cached_ms"][s]
        assert abs(ratio - last["speedup_by_len"][s]) <= 0.01 * ratio + 0.01
    assert last["device"].startswith("cpu")


def test_engine_bench_ends_with_json_throughputs():
    pytest.importorskip("transformers")
    out = _run("bench/engine.py", "--quick")
    last = json.loads(out.strip().splitlines()[-1])
    for name in ("continuous", "static", "transformers", "transformers_cb"):
        assert last[f"{name}_tok_s"] > 0
    ratio = last["continuous_tok_s"] / last["static_tok_s"]
    assert abs(ratio - last["continuous_over_static"]) <= 0.01 * ratio + 0.01
    ratio = last["continuous_tok_s"] / last["transformers_cb_tok_s"]
    assert abs(ratio - last["continuous_over_transformers_cb"]) <= 0.01 * ratio + 0.01
    # greedy outputs agree, request for request, across the four schedules
    assert last["greedy_equal_static"] == last["requests"]
    assert last["greedy_equal_transformers"] == last["requests"]
    assert last["greedy_equal_transformers_cb"] == last["requests"]
    assert last["device"].startswith("cpu")


def test_gpu_engine_bench_runs_on_the_cpu_with_a_tiny_model():
    pytest.importorskip("transformers")
    out = _run("bench/gpu_engine.py", "--quick")
    last = json.loads(out.strip().splitlines()[-1])
    for name in ("engine", "static", "transformers", "transformers_cb"):
        assert last[f"{name}_tok_s"] > 0
    assert set(last["step_over_floor"]) == {"1", "4"}
    for b in ("1", "4"):
        ratio = last["step_ms"][b] / last["floor_ms"][b]
        assert abs(ratio - last["step_over_floor"][b]) <= 0.01 * ratio + 0.01
    # fp32 on the CPU: every schedule's greedy outputs equal the engine's
    assert all(n == last["requests"] for n in last["greedy_equal_to_engine"].values())
    assert last["syncs_per_decode_step"] is None  # counted on a GPU only
    # eager against the graphs' stand-in (re-run on the persistent buffers) on the CPU
    assert not last["graphs_real"] and not last["decode_step_cuda_graphs"]
    assert set(last["graph_step_ms"]) == set(last["eager_step_ms"]) == {"1", "4"}
    assert all(last["graphs_outputs_equal"].values())
    assert last["device"].startswith("cpu")


def test_paged_decode_bench_ends_with_json_ratios():
    out = _run("bench/paged_decode.py", "--quick")
    last = json.loads(out.strip().splitlines()[-1])
    for name in ("paged", "gather", "flat", "sdpa"):
        assert last[f"{name}_ms"] > 0
    assert abs(last["paged_over_sdpa"] - last["paged_ms"] / last["sdpa_ms"]) < 0.01 * last[
        "paged_over_sdpa"] + 0.002
    assert last["paged_over_flat"] > 0 and last["gather_over_sdpa"] > 0


def test_flash_bench_ends_with_json_peak_bytes_and_times():
    out = _run("bench/flash.py", "--quick")
    last = json.loads(out.strip().splitlines()[-1])
    lens = last["seq_lens"]
    assert lens == [64, 128, 256]
    for key in ("peak_bytes_naive", "peak_bytes_chunked", "peak_bytes_sdpa", "ms_naive",
                "ms_chunked", "ms_sdpa"):
        assert len(last[key]) == len(lens) and all(x > 0 for x in last[key]), key
    # The naive path holds 4 heads' (T, T) fp32 scores at least; chunked, far less at 256.
    assert last["peak_bytes_naive"][-1] >= 4 * 256 * 256 * 4
    assert last["peak_bytes_chunked"][-1] < last["peak_bytes_naive"][-1] / 4
    assert last["device"].startswith("cpu")


def test_bf16_divergence_bench_ends_with_json_per_dtype():
    out = _run("bench/bf16_divergence.py", "--device", "cpu", "--prompts", "2",
               "--prompt-len", "4", "--new-tokens", "4")
    last = json.loads(out.strip().splitlines()[-1])
    for dtype in ("bfloat16", "float32"):
        assert last[dtype]["max_logit_gap"] >= 0 and len(last[dtype]["diverged_at"]) == 2
    assert last["float32"]["max_logit_gap"] < 1e-4
    assert last["device"].startswith("cpu")


def test_recorded_bf16_divergence_matches_the_script_format():
    recorded = json.loads((ROOT / "bench/results/bf16_divergence_nvidia-h200.json").read_text())
    assert {"device", "prompts", "new_tokens", "bfloat16", "float32"} <= set(recorded)
