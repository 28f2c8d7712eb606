"""Chapter 7's helpers: the intensity formula, the drawings, recorded results, kernel source."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kvlib import analysis  # noqa: E402
from kvlib.experiments import gpu as gexp  # noqa: E402
from kvlib.experiments.quoted import H200_DECODE  # noqa: E402
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
    gviz.draw_roofline(axes[1], [analysis.GPUS["H100-SXM"], analysis.GPUS["H200"]],
                       {"bf16": 4.0})
    gviz.draw_bandwidths(axes[2], result)
    gviz.draw_quoted_ranges(axes[3], H200_DECODE.ranges, H200_DECODE.source)
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


def test_gather_returns_the_contiguous_cache():
    case = gexp.make_case(2, 32, H=4, Hkv=2, D=8, BS=4, dtype=torch.float32, device="cpu")
    assert torch.equal(gexp.gather(case.k_pool, case.block_tables), case.k)  # (B, Hkv, S, D)
    assert torch.equal(gexp.gather(case.v_pool, case.block_tables), case.v)
    k8, _, k_scale, _ = case.codes["int8"]  # the INT8 pool codes the same keys
    assert (k8.float() * k_scale[..., None] - case.k_pool).abs().max() < 0.02


def test_quoted_figures_stay_out_of_the_measured_path():
    """The H200 preset is a datasheet entry beside the others; quoted H200 measurements carry
    their source and are not importable from the measuring module."""
    assert analysis.GPUS["H200"].bandwidth == 4.8e12
    assert analysis.GPUS["H200"].peak_flops == analysis.GPUS["H100-SXM"].peak_flops
    assert not hasattr(gexp, "H200") and not hasattr(gexp, "ISSUE_H200")
    assert H200_DECODE.source.startswith("quoted")


def test_recorded_bandwidth_ranges_use_the_quoted_labels():
    from kvlib.experiments.quoted import H200_DECODE as quoted

    for result in gexp.recorded_results():
        ranges = gexp.bandwidth_ranges(result)
        assert set(ranges) == set(quoted.ranges)
        for lo, hi in ranges.values():
            assert 0 < lo <= hi
        saved = gexp.graph_savings_us(result)
        assert set(saved) == {"paged", "sdpa", "gather", "int8"}
        assert all(len(v) == len(result["rows"]) for v in saved.values())


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
