"""bench/quantized.py runs and ends with the JSON it promises (tests/test_scripts.py style)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kvlib.cache.quant_memory import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def test_quantized_bench_ends_with_json_per_scheme():
    result = subprocess.run([sys.executable, "bench/quantized.py", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(last["schemes"]) == set(PRESETS)
    for name, row in last["schemes"].items():
        assert set(row) >= {"bytes_per_token", "ratio_vs_fp16", "attn_rel_err",
                            "time_vs_unquantized"}, name
        assert row["ratio_vs_fp16"] <= row["naive_ratio"] + 1e-9, name  # overheads only add
        assert row["time_vs_unquantized"] > 0 and 0 <= row["attn_rel_err"] < 2
    q4 = last["schemes"]["llama.cpp-q4_0"]
    assert abs(q4["ratio_vs_fp16"] - 16 / 4.5) < 1e-3  # 4.5 bits per value, not 4
    assert q4["bytes_per_token"] == last["fp16_bytes_per_token"] * 4.5 / 16
    assert last["device"].startswith("cpu")
