"""Chapter 7's helpers: the intensity formula, the drawings, recorded results, kernel source."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kvlib import analysis  # noqa: E402
from kvlib.experiments import gpu as gexp  # noqa: E402
from kvlib.viz import gpu as gviz  # noqa: E402


@pytest.mark.parametrize(("H", "Hkv", "b", "want"), [(32, 8, 2, 4.0), (32, 32, 4, 0.5),
                                                     (64, 8, 1, 16.0)])
def test_intensity_is_two_g_over_bytes(H, Hkv, b, want):
    D, G = 128, H // Hkv
    flops = 4 * D * G  # q.k and p v for each query head of the group, per cached token
    bytes_read = 2 * D * b  # the token's key and value rows
    assert gexp.decode_attention_intensity(H, Hkv, b) == want == flops / bytes_read


def test_drawings_draw():
    result = {"device": "test", "copy_TBps": 3.0,
              "rows": [{"B": 1, "S": 16, "kv_GB": 0.1, "paged_ms": 0.05, "sdpa_ms": 0.04,
                        "gather_ms": 0.1, "int8_ms": 0.03}]}
    fig, axes = plt.subplots(1, 4)
    gviz.draw_memory_hierarchy(axes[0], 0.5)
    gviz.draw_roofline(axes[1], [analysis.GPUS["H100-SXM"], gexp.H200], {"bf16": 4.0})
    gviz.draw_bandwidths(axes[2], result)
    gviz.draw_quoted_ranges(axes[3], gexp.QUOTED_H200, "quoted")
    assert len(axes[2].patches) == 4  # one bar per path
    plt.close(fig)


def test_kernel_source_is_the_module_text():
    source = gexp.kernel_source("_split_kernel")
    assert source.startswith("def _split_kernel(") and "m_i" in source and "acc" in source
    with pytest.raises(ValueError, match="no function"):
        gexp.kernel_source("nope")


def test_recorded_results_are_complete(tmp_path):
    assert gexp.recorded_results(tmp_path) == []
    for result in gexp.recorded_results():  # whatever bench/results holds
        assert {"device", "copy_TBps", "rows", "date", "versions"} <= set(result)
        for row in result["rows"]:
            assert {"B", "S", "kv_GB", "paged_ms", "sdpa_ms", "gather_ms", "int8_ms"} <= set(row)
            # the ratios and sizes the chapter quotes follow from the recorded times and shape
            assert row["paged_over_sdpa"] == pytest.approx(row["sdpa_ms"] / row["paged_ms"],
                                                           abs=2e-3)
            assert row["int8_over_sdpa"] == pytest.approx(row["sdpa_ms"] / row["int8_ms"],
                                                          abs=2e-3)
            assert row["kv_GB"] == pytest.approx(2 * row["B"] * row["S"] * 8 * 128 * 2 / 1e9,
                                                 abs=1e-4)  # bf16 K and V, 8 KV heads of 128
        worst = result["targets"]["paged_over_gather"]["worst"]
        assert worst == min(r["paged_over_gather"] for r in result["rows"])


def test_gather_equals_the_reference_gather():
    case = gexp.make_case(2, 32, H=4, Hkv=2, D=8, BS=4, dtype=torch.float32, device="cpu")
    dense = case.paged.dense()  # (B, Hkv, S, D)
    assert torch.equal(gexp.gather(case.paged.k_pool, case.paged.block_tables), dense.k)
    assert torch.equal(gexp.gather(case.paged.v_pool, case.paged.block_tables), case.v)


def test_roofline_widget_states_all_differ_and_place_the_operations():
    import itertools

    from kvlib import analysis
    from kvlib.widgets import gpu as gw

    states = {}
    for gpu, dtype, G, batch in itertools.product(*gw.GRID.values()):
        states[gpu, dtype, G, batch] = gw.roofline_state(analysis.GPUS[gpu], dtype, G, batch)
    assert len(set(states.values())) == len(states)  # no state repeats another
    assert max(map(len, states.values())) < 8_000  # a few kB each
    h100 = states["H100-SXM", "bf16", 4, 1024]
    assert "attention</td><td>4 FLOP/B</td><td>memory bound" in h100
    assert "weight matmuls</td><td>1,0" in h100 and "compute bound" in h100
    # Attention's intensity is 2 G / bytes whatever the batch; the matmuls' follows the batch.
    for G in (1, 4, 8):
        ops = gw.step_operations(G, 16, "fp8")
        assert ops[1].arithmetic_intensity == 2 * G
        assert round(ops[0].arithmetic_intensity) == 16
    w = gw.roofline_widget(grid={"gpu": ["L4", "H100-SXM"], "kv_dtype": ["bf16"], "G": [4],
                                 "batch": [1]})
    assert w.children[0].children[0].index == 1  # the H100 first
