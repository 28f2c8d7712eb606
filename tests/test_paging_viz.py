"""kvlib.viz.paging and kvlib.widgets.paging: each drawing shows the numbers it is given, each
widget holds one state per control value, labelled with it.

Drawings are read back through their artists (patches, texts, bars) and compared with
numbers computed here from the snapshot or from `experiments.fragmentation`.
"""

from __future__ import annotations

import doctest

import ipywidgets as W
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle

from kvlib.cache.paged import PagedKVCache
from kvlib.config import CacheConfig
from kvlib.experiments import fragmentation as fr
from kvlib.viz import paging as pviz
from kvlib.widgets import paging as pw
from kvlib.widgets.live import STATE_CLASS

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def ax():
    return plt.subplots()[1]


def test_doctests():
    result = doctest.testmod(pviz)
    assert result.attempted >= 2 and result.failed == 0


# -- snapshots ------------------------------------------------------------------------------------

def test_snapshot_follows_the_lengths():
    # 45 tokens in blocks of 16: 16 + 16 + 13; a fork shares them all.
    s = pviz.snapshot(5, 16, {0: [4, 1, 2], 1: [4, 1, 2]}, {0: 45, 1: 45}, cached=[0])
    assert s.fill == (16, 16, 13, 0, 16) and s.ref_counts == (0, 2, 2, 0, 2)
    assert s.cached == (True, False, False, False, False) and s.num_free == 2


def test_snapshot_refuses_what_cannot_be():
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        pviz.snapshot(4, 4, {0: [0, 1]}, {0: 9})
    with pytest.raises(ValueError, match="names block 7, pool has 4"):
        pviz.snapshot(4, 4, {0: [7]}, {0: 1})
    with pytest.raises(ValueError, match="lengths"):
        pviz.snapshot(4, 4, {0: [0]}, {1: 1})
    with pytest.raises(ValueError, match="3 reference counts for 4 blocks"):
        pviz.snapshot(4, 4, {0: [0]}, {0: 1}, ref_counts=[1, 0, 0])


# -- the pool drawing -----------------------------------------------------------------------------

def _slots(ax, y):
    """Unit-wide slot cells on row y, as (x, filled)."""
    white = to_rgba("white")
    return [(p.get_x(), p.get_facecolor() != white) for p in ax.patches
            if isinstance(p, Rectangle) and p.get_width() == 1 and p.get_y() == y]


def test_draw_pool_fills_slots_and_labels_reference_counts(ax):
    s = pviz.snapshot(6, 4, {0: [0, 1, 2], 1: [0, 1, 4]}, {0: 9, 1: 10}, cached=[5],
                      copied=[4])
    pviz.draw_pool(ax, s)
    slots = _slots(ax, 0.0)
    assert len(slots) == 6 * 4
    assert sum(filled for _, filled in slots) == 4 + 4 + 1 + 2 + 4  # blocks 0, 1, 2, 4; cached 5
    texts = [t.get_text() for t in ax.texts]
    for label in ("ref 2", "ref 1", "free", "cached", "#5", "2→#4", "seq 1\n10 tokens"):
        assert label in texts
    assert texts.count("ref 2") == 2 and texts.count("ref 1") == 2
    outlines = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_width() == 4
                and p.get_y() == 0.0 and not p.get_fill()]
    red = [p for p in outlines if p.get_edgecolor() == to_rgba(pviz.COPIED)]
    assert len(outlines) == 6 and len(red) == 1 and red[0].get_x() == 4 * (4 + 0.6)
    assert "4 of 6 blocks in use" in ax.get_title(loc="left")  # 0, 1, 2, 4


def test_shared_blocks_are_drawn_in_the_shared_colour(ax):
    s = pviz.snapshot(3, 2, {0: [0, 1], 1: [0, 2]}, {0: 4, 1: 3})
    pviz.draw_pool(ax, s)
    first = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_width() == 1
             and p.get_y() == 0.0 and p.get_x() < 2]
    assert all(p.get_facecolor() == to_rgba(pviz.SHARED) for p in first)


# -- the scenario, on a real PagedKVCache ---------------------------------------------------------

# Worked out by hand: a free queue handing out the least recently freed block first, prefix
# hits on full blocks only, a copy-on-write into the next free block.
EXPECTED_TABLES = [
    {}, {0: (0, 1)}, {0: (0, 1, 2)}, {0: (0, 1, 2), 1: (0, 1, 3)},
    {0: (0, 1, 2), 1: (0, 1, 3), 2: (0, 1, 2)}, {0: (0, 1, 2), 1: (0, 1, 3), 2: (0, 1, 4)},
    {0: (0, 1, 2), 1: (0, 1, 3), 2: (0, 1, 4)}, {1: (0, 1, 3), 2: (0, 1, 4)}, {},
    {3: (0, 1, 5)},
]


def _read_back(cache, seq_id):
    """The token ids a sequence's keys hold, gathered through its block table."""
    k = cache.k_pool(0)[cache.block_table(seq_id)]  # (nb, Hkv, BS, D)
    return k[:, 0, :, 0].reshape(-1)[:int(cache.lengths([seq_id])[0])].long().tolist()


def test_paged_scenario_matches_the_hand_worked_tables():
    snaps, cache = pw.paged_scenario()
    assert len(snaps) == len(pw.SCENARIO) == len(EXPECTED_TABLES)
    assert [s.block_tables for s in snaps] == EXPECTED_TABLES
    for s in snaps:
        named = [b for t in s.block_tables.values() for b in t]
        assert s.ref_counts == tuple(named.count(b) for b in range(s.num_blocks))
        assert not any(c and r for c, r in zip(s.cached, s.ref_counts))  # cached => free
    assert [sorted(s.copied) for s in snaps] == [[]] * 5 + [[4]] + [[]] * 4
    assert [b for b, c in enumerate(snaps[8].cached) if c] == [0, 1]
    assert snaps[3].lengths == {0: 9, 1: 11} and snaps[6].lengths[0] == 10
    cache.check_invariants()
    assert _read_back(cache, 3) == list(range(1, 9)) + [40, 41, 42]


def test_every_sequence_reads_back_its_own_tokens_at_every_step():
    snaps, _ = pw.paged_scenario()
    cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, max_batch_size=1,
                      max_seq_len=64, block_size=pw.SCENARIO_BLOCK_SIZE)
    cache = PagedKVCache(cfg, num_blocks=pw.SCENARIO_NUM_BLOCKS)
    expected = {
        1: {0: [1, 2, 3, 4, 5, 6]},
        5: {0: list(range(1, 10)), 1: list(range(1, 9)) + [20, 21, 22],
            2: list(range(1, 10)) + [30]},
        6: {0: list(range(1, 11)), 2: list(range(1, 10)) + [30]},
        9: {3: list(range(1, 9)) + [40, 41, 42]},
    }
    for step, (_, act) in enumerate(pw.SCENARIO):
        act(cache)
        for seq_id, tokens in expected.get(step, {}).items():
            assert _read_back(cache, seq_id) == tokens, (step, seq_id)
        cache.check_invariants()
    assert cache.num_free_blocks == pw.SCENARIO_NUM_BLOCKS - 3


def test_admit_with_prefix_reports_the_reused_tokens():
    cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, max_batch_size=1,
                      max_seq_len=64, block_size=4)
    cache = PagedKVCache(cfg, num_blocks=8)
    assert pw.admit_with_prefix(cache, 0, list(range(10))) == 0  # nothing cached yet
    assert pw.admit_with_prefix(cache, 1, list(range(9)) + [99]) == 8  # two full blocks
    assert cache.block_table(1)[:2] == cache.block_table(0)[:2]


def _states(widget):
    """(label text, child) of each state of a one-control live widget."""
    stack = widget.children[1]
    return [(state.children[0].value, state.children[1]) for state in stack.children]


def test_scenario_widget_has_one_labelled_state_per_step():
    steps = pw.paged_scenario()[0][:3]
    w = pw.scenario_widget(steps)
    (slider,) = w.children[0].children
    assert isinstance(slider, W.SelectionSlider) and len(slider.options) == 3
    states = _states(w)
    assert [STATE_CLASS in label and f"step = {i}" in label
            for i, (label, _) in enumerate(states)] == [True] * 3
    assert all(isinstance(img, W.Image) and img.value[:4] == b"\x89PNG" for _, img in states)
    with pytest.raises(ValueError, match="at least one snapshot"):
        pw.scenario_widget([])


# -- the simulator --------------------------------------------------------------------------------

def test_simulator_figure_draws_the_simulated_numbers():
    fig = pw.simulator_figure("sharegpt", 2048, 16, num_requests=2000, budget=50_000)
    left, right = fig.axes
    results = fr.simulate(fr.sample_requests("sharegpt", 2000, 2048), max_len=2048,
                          block_size=16, budget=50_000)
    heights = [p.get_height() for p in left.patches if p.get_height() > 0]
    expected = [u for s in fr.SCHEMES
                for u in (results[s].utilization, results[s].utilization_in_flight)]
    assert heights == pytest.approx(expected)
    assert [p.get_height() for p in right.patches] == [results[s].fits for s in fr.SCHEMES]


def test_simulator_widget_nests_one_state_per_grid_point():
    w = pw.simulator_widget(distributions=("uniform", "alpaca"), max_lens=(256,),
                            block_sizes=(4, 16), num_requests=500, budget=10_000)
    controls = w.children[0].children
    assert [c.description for c in controls] == ["distribution", "max_len", "block_size"]
    outer = w.children[1]
    assert len(outer.children) == 2 and len(outer.children[1].children[0].children) == 2
    label, table = outer.children[1].children[0].children[1].children
    assert "distribution = alpaca · max_len = 256 · block_size = 16" in label.value
    assert isinstance(table, W.HTML) and table.value == pw.simulator_html(
        "alpaca", 256, 16, num_requests=500, budget=10_000)


def test_scheme_table_html_shows_each_schemes_numbers():
    results = fr.simulate(fr.sample_requests("sharegpt", 1000, 2048), max_len=2048,
                          block_size=16, budget=50_000)
    text = pviz.scheme_table_html(results, 50_000, title="a <title>")
    assert "a &lt;title&gt;" in text and "requests in 50,000 slots" in text
    for s, r in results.items():
        row = text.split(f"<b>{s}</b>")[1].split("</tr>")[0]
        assert f"{r.utilization:.1%}" in row and f"{r.utilization_in_flight:.1%}" in row
        assert f"{r.fits:,}</td>" in row
        assert f"width: {100 * r.fits / results['oracle'].fits:.1f}%" in row


def test_plot_block_size_sweep_plots_paged_waste(ax):
    requests = fr.sample_requests("pareto", 1000, 1024)
    sweep = fr.sweep_block_sizes(requests, [1, 16, 256], max_len=1024, budget=10**5)
    pviz.plot_block_size_sweep(ax, sweep, "pareto")
    (line,) = ax.lines
    assert list(line.get_xdata()) == [1, 16, 256]
    assert line.get_ydata() == pytest.approx([100 * sweep[b]["paged"].waste
                                              for b in (1, 16, 256)])
    assert line.get_ydata()[0] == 0.0


def test_plot_length_histogram_counts_every_request(ax):
    lens = np.array([1, 5, 5, 300, 1000])
    pviz.plot_length_histogram(ax, lens, bins=8, max_len=1000)
    (patch,) = ax.patches  # histtype="step": one outline
    assert ax.get_xscale() == "log"
    counts, _ = np.histogram(lens, bins=np.geomspace(1, 1000, 9))
    assert counts.sum() == 5


def test_plot_max_len_sweep_one_line_per_scheme(ax):
    by = {m: fr.simulate(fr.sample_requests("uniform", 500, m), max_len=m, block_size=16,
                         budget=10_000) for m in (256, 1024)}
    pviz.plot_max_len_sweep(ax, by)
    assert [line.get_label() for line in ax.lines] == list(fr.SCHEMES)
    paged = ax.lines[-1]
    assert list(paged.get_xdata()) == [256, 1024]
    assert paged.get_ydata() == pytest.approx([100 * by[m]["paged"].utilization_in_flight
                                               for m in (256, 1024)])


def test_the_chapters_simulator_widget_stays_light():
    w = pw.simulator_widget()  # the chapter's grid: 4 streams x 3 max_lens x 3 block sizes
    tables = [s.children[1] for outer in w.children[1].children for mid in outer.children
              for s in mid.children]
    assert len(tables) == 36 and all(isinstance(t, W.HTML) for t in tables)
    assert sum(len(t.value) for t in tables) < 200_000  # a few kB per state


def test_draw_group_tables_hatches_the_null_block_entries(ax):
    tables = {"windowed": [9, 9, 3, 4], "global": [0, 1, 2, 5]}
    pviz.draw_group_tables(ax, tables, {"windowed": 9, "global": 9}, block_size=8)
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(ax.patches) == 8 and len(hatched) == 2  # the windowed group's two freed entries
    labels = [t.get_text() for t in ax.texts]
    assert "windowed\n2 of 4 held" in labels and "global\n4 of 4 held" in labels
