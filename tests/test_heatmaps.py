"""Heatmaps and their drill-down: exact against transformers and against each other."""

import numpy as np
import pytest
import torch

from backend.analyses.heatmaps import attention_pattern, cell_detail, compare_grids, heatmap, target_readout
from backend.analyses.neurons import cached_trace, neuron_view
from backend.errors import UserInputError

PROMPT = "When Mary and John went to the store"


def test_residual_norms_equal_transformers_hidden_states(tiny):
    grid = heatmap(tiny, PROMPT, "resid_norm")
    ids = torch.tensor([cached_trace(tiny, PROMPT).token_ids])
    with torch.no_grad():
        hidden = tiny.model(ids, output_hidden_states=True).hidden_states
    n_layers = tiny.adapter.n_layers
    expected = np.stack([h[0].norm(dim=-1).numpy() for h in hidden[:n_layers]])  # inputs of each block
    np.testing.assert_allclose(grid.values[:n_layers], expected, rtol=1e-5)
    assert grid.rows == ["emb"] + [f"L{i}" for i in range(n_layers)]


def test_quantities_have_their_shapes(tiny_llama):
    n_layers, n_pos = tiny_llama.adapter.n_layers, len(cached_trace(tiny_llama, PROMPT).tokens)
    assert heatmap(tiny_llama, PROMPT, "target_prob").values.shape == (n_layers + 1, n_pos)
    assert heatmap(tiny_llama, PROMPT, "attn_norm").values.shape == (n_layers, n_pos)
    second = heatmap(tiny_llama, PROMPT, "second_prob", second=" John")
    assert second.values.shape == (n_layers + 1, n_pos)
    neuron = heatmap(tiny_llama, PROMPT, "neuron", neuron=(1, 5))
    np.testing.assert_allclose(neuron.values[0], cached_trace(tiny_llama, PROMPT).neurons[1, :, 5])
    for bad in [dict(quantity="nope"), dict(quantity="neuron"), dict(quantity="neuron", neuron=(99, 0)),
                dict(quantity="second_prob")]:
        with pytest.raises(UserInputError):
            heatmap(tiny_llama, PROMPT, **bad)


def test_direct_effects_add_up_to_the_logit(tiny_llama):
    """Embedding + every head + every neuron = logit(target) - mean logit, at each position."""
    trace = cached_trace(tiny_llama, PROMPT)
    target = int(trace.logits[-1].argmax())
    readout = target_readout(tiny_llama, PROMPT, target)
    for position in range(len(trace.tokens)):
        total = trace.resid[0, position] @ readout[position]
        for row in range(1, tiny_llama.adapter.n_layers + 1):
            detail = cell_detail(tiny_llama, PROMPT, row, position, top=10_000)
            total += sum(h["effect"] for h in detail.heads_by_effect)
            total += sum(n["effect"] for n in detail.neurons_by_effect)
        logits = trace.logits[position]
        assert total == pytest.approx(logits[target] - logits.mean(), abs=1e-4)


def test_cell_detail_lists(tiny_llama):
    detail = cell_detail(tiny_llama, PROMPT, 2, 3)
    assert detail.layer == 1 and len(detail.lens_top) == 10
    effects = [abs(n["effect"]) for n in detail.neurons_by_effect]
    assert effects == sorted(effects, reverse=True)
    acts = [abs(n["activation"]) for n in detail.neurons_by_activation]
    assert acts == sorted(acts, reverse=True)
    assert len(detail.heads_by_effect) == tiny_llama.adapter.n_heads
    assert cell_detail(tiny_llama, PROMPT, 0, 0).neurons_by_effect == []  # embeddings row: lens only


def test_compare_needs_equal_lengths(tiny_llama):
    a = heatmap(tiny_llama, PROMPT, "resid_norm")
    b = heatmap(tiny_llama, "When John and Mary went to the store", "resid_norm")
    if a.values.shape == b.values.shape:
        diff = compare_grids(a, b)
        np.testing.assert_allclose(diff.values, a.values - b.values)
    with pytest.raises(UserInputError, match="equal lengths"):
        compare_grids(a, heatmap(tiny_llama, "When Mary went", "resid_norm"))


def test_attention_and_neuron_views(tiny_llama):
    patterns = attention_pattern(tiny_llama, PROMPT, 0)
    assert patterns.shape[0] == tiny_llama.adapter.n_heads
    view = neuron_view(tiny_llama, PROMPT, 1, 3)
    assert view.promotes[0]["score"] >= view.promotes[-1]["score"]
    assert view.suppresses[0]["score"] <= view.suppresses[-1]["score"]
    with pytest.raises(UserInputError):
        attention_pattern(tiny_llama, PROMPT, 99)
