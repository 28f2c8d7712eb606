"""The numba paged decode kernel: windows and sinks, torch's thread count, its compile cache;
and what every kernel module may import."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import paged_case

import kvlib.kernels
from kvlib.kernels.paged_decode_cpu import paged_decode_numba
from kvlib.kernels.reference import paged_decode_ref

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("window", "sink_tokens"), [(None, 0), (5, 0), (6, 3), (1, 40),
                                                     (13, 2)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_windows_and_sinks_read_only_what_the_query_sees(window, sink_tokens, block_size):
    """Blocks outside the window and the sinks hold NaNs: the output has none, and equals the
    reference."""
    gen = torch.Generator().manual_seed(block_size + (window or 0))
    lens = [1, 9, 40, 57]
    q, k_pool, v_pool, tables, lens_t, _ = paged_case(
        gen, lens, [1] * len(lens), heads=4, kv_heads=2, dim=8, block_size=block_size,
        dtype=torch.float32, window=window, sink_tokens=sink_tokens)
    got = paged_decode_numba(q, k_pool, v_pool, tables, lens_t, window=window,
                             sink_tokens=sink_tokens)
    want = paged_decode_ref(q, k_pool, v_pool, tables, lens_t, window, sink_tokens)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_refuses_bad_windows():
    q, pool = torch.zeros(1, 2, 4), torch.zeros(2, 1, 4, 4)
    tables, lens = torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3])
    with pytest.raises(ValueError, match="window"):
        paged_decode_numba(q, pool, pool, tables, lens, window=0)
    with pytest.raises(ValueError, match="sink_tokens"):
        paged_decode_numba(q, pool, pool, tables, lens, sink_tokens=-1)


_THREADS = """
import torch
torch.set_num_threads(1)
from kvlib.kernels.paged_decode_cpu import paged_decode_numba, numba
q, pool = torch.randn(2, 4, 8), torch.randn(4, 2, 4, 8)
tables, lens = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([5, 8])
paged_decode_numba(q, pool, pool, tables, lens)
print(torch.get_num_threads(), numba.get_num_threads())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: nothing can be raised")
def test_first_call_leaves_torch_thread_count_as_the_user_set_it():
    """numba's OpenMP pool starts with omp_set_num_threads(cores), which is torch's setting
    too; the kernel runs on torch's count and leaves it. A fresh process, since the pool
    starts once per process."""
    run = subprocess.run([sys.executable, "-c", _THREADS], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["1", "1"]


_CACHE = """
from kvlib.kernels.paged_decode_cpu import _kernel, cache_dir
print(cache_dir()); print(_kernel()._cache.cache_path)
"""


def test_compile_cache_lives_in_the_user_cache_dir_not_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    run = subprocess.run([sys.executable, "-c", _CACHE], capture_output=True, text=True,
                         timeout=120, env={**env, "PYTHONPATH": str(ROOT),
                                           "XDG_CACHE_HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    folder, cache_path = (Path(line) for line in run.stdout.split())
    assert folder == tmp_path / "kvlib" / "numba"
    assert cache_path.is_relative_to(folder)
    assert not cache_path.is_relative_to(Path(kvlib.kernels.__file__).parent)


def test_kernels_import_no_cache_and_nothing_above_them():
    """Kernels take plain tensors: from kvlib they import only attention, checks, config and
    each other (never a cache, the contract, the model or the engine)."""
    allowed = ("kvlib.attention", "kvlib.checks", "kvlib.config", "kvlib.kernels")
    folder = Path(kvlib.kernels.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == "kvlib" or name.startswith("kvlib."):
                    assert name.startswith(allowed), f"{path.name} imports {name}"
