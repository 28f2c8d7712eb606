"""kvlib.experiments.gpu_engine: the decode step's floor from a shape, and the host's cost
per step and per layer (the GPU figures come from bench/gpu_engine.py on a GPU)."""

from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch

import kvlib.experiments.gpu_engine as ge

pytestmark = pytest.mark.usefixtures("one_thread")


def test_module_doctests():
    result = doctest.testmod(ge)
    assert result.attempted > 0 and result.failed == 0


def test_floor_from_the_shape_equals_the_floor_of_a_measured_step():
    config = dataclasses.replace(ge.TINY, tie_embeddings=False)
    model = ge.random_model(config, "cpu", torch.float32)
    step = ge.decode_step(model, 3, 20, bandwidth=1e9, steps=2)
    # decode_step counts the keys the timed steps add (steps = 2) on top of the context
    assert ge.floor_s(config, 3, 22, 1e9, "fp32") == pytest.approx(step.floor_s, rel=1e-12)


def test_llama_3_2_1b_floor_at_batch_one_is_its_weights():
    weights = ge.analysis.weight_bytes(ge.LLAMA_3_2_1B, "bf16")
    assert 2.4e9 < weights < 2.6e9  # 1.24B parameters in bf16, the tied embedding once
    assert ge.floor_s(ge.LLAMA_3_2_1B, 1, 0, 1e12) == pytest.approx(weights / 1e12)


def test_host_cost_fits_a_line_through_depths():
    cost = ge.time_host_steps(layers=(1, 3), batch_size=2, context_len=8)
    assert cost.layers == (1, 3) and len(cost.step_s) == 2
    assert cost.per_step_s + 3 * cost.per_layer_s == pytest.approx(cost.step_s[1])


@pytest.mark.parametrize("xs, ys", [([1, 1], [2.0, 3.0]), ([1, 2], [2.0])])
def test_fit_line_refuses_what_it_cannot_fit(xs, ys):
    with pytest.raises(ValueError, match="fit_line needs"):
        ge.fit_line(xs, ys)
