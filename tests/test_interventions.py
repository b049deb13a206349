"""Interventions: exact against hand-modified models, nothing leaks, controls behave."""

import copy

import numpy as np
import pytest
import torch

from backend.errors import UserInputError
from backend.causal.interventions import controls, intervene, intervened, neuron_items
from backend.runtime.prompts import encode_prompt
from backend.runtime.trace import run_trace

PROMPT = "When Mary and John went to the store"


def logits(handle, ids):
    with torch.no_grad():
        return handle.model(torch.tensor([ids])).logits[0]


def no_hooks(handle) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in handle.model.modules())


def test_intervening_on_nothing_changes_nothing(tiny):
    ids = encode_prompt(tiny, PROMPT)
    with intervened(tiny, {"interventions": []}, len(ids)):
        inside = logits(tiny, ids)
    assert torch.equal(inside, logits(tiny, ids))


@pytest.mark.parametrize("op, factor", [("zero", 0.0), ("scale", 3.0)])
def test_neuron_ablation_equals_editing_the_weights(tiny_llama, op, factor):
    """A neuron zeroed/scaled at every position = its down-projection column zeroed/scaled."""
    ids = encode_prompt(tiny_llama, PROMPT)
    layer, neuron = 1, 7
    with intervened(tiny_llama, {"interventions": [{"kind": "neuron", "layer": layer, "index": neuron, "op": op,
                                                    "factor": factor}]}, len(ids)):
        ablated = logits(tiny_llama, ids)
    edited = copy.deepcopy(tiny_llama.model)
    with torch.no_grad():
        edited.model.layers[layer].mlp.down_proj.weight[:, neuron] *= factor
        expected = edited(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ablated, expected, atol=1e-5, rtol=1e-5)


def test_scaled_neuron_moves_the_residual_stream_by_hand(tiny_llama):
    ids = encode_prompt(tiny_llama, PROMPT)
    layer, neuron, position, factor = 0, 3, 4, 5.0
    clean = run_trace(tiny_llama, PROMPT, neurons=True)
    with intervened(tiny_llama, {"interventions": neuron_items([(layer, position, neuron)], "scale", factor)}, len(ids)):
        scaled = run_trace(tiny_llama, PROMPT)
    expected = (factor - 1) * clean.neurons[layer, position, neuron] * \
        tiny_llama.adapter.down_proj_weight(layer)[:, neuron].numpy()
    np.testing.assert_allclose(scaled.resid[layer + 1, position] - clean.resid[layer + 1, position], expected, atol=1e-5)
    np.testing.assert_allclose(scaled.resid[layer + 1, :position], clean.resid[layer + 1, :position], atol=1e-6)


def test_head_zero_equals_zeroing_its_output_columns(tiny_llama):
    ids = encode_prompt(tiny_llama, PROMPT)
    layer, head = 2, 1
    with intervened(tiny_llama, {"interventions": [{"kind": "head", "layer": layer, "index": head, "op": "zero"}]}, len(ids)):
        ablated = logits(tiny_llama, ids)
    edited = copy.deepcopy(tiny_llama.model)
    hd = tiny_llama.adapter.head_dim
    with torch.no_grad():
        edited.model.layers[layer].self_attn.o_proj.weight[:, head * hd:(head + 1) * hd] = 0
        expected = edited(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ablated, expected, atol=1e-5, rtol=1e-5)


def test_steering_adds_the_vector(tiny_llama):
    ids = encode_prompt(tiny_llama, PROMPT)
    vector = torch.randn(tiny_llama.adapter.d_model, generator=torch.Generator().manual_seed(0))
    clean = run_trace(tiny_llama, PROMPT)
    spec = {"interventions": [{"kind": "resid", "layer": 1, "op": "add", "factor": 2.0, "vector": vector.tolist(),
                               "positions": [2]}]}
    with intervened(tiny_llama, spec, len(ids)):
        steered = run_trace(tiny_llama, PROMPT)
    np.testing.assert_allclose(steered.resid[1, 2] - clean.resid[1, 2], 2.0 * vector.numpy(), atol=1e-5)
    np.testing.assert_allclose(steered.resid[1, :2], clean.resid[1, :2], atol=1e-6)  # other positions untouched


def test_model_is_clean_after_an_error_mid_way(tiny_llama):
    ids = encode_prompt(tiny_llama, PROMPT)
    before = logits(tiny_llama, ids)
    spec = {"interventions": [{"kind": "neuron", "layer": 0, "index": 1, "op": "zero"},
                              {"kind": "neuron", "layer": 1, "index": 2, "op": "corrupt"}],
            "corrupt_prompt": "When Mary went"}  # other length: fails inside the forward
    with pytest.raises(UserInputError, match="same token length"):
        with intervened(tiny_llama, spec, len(ids)):
            logits(tiny_llama, ids)
    assert no_hooks(tiny_llama) and torch.equal(logits(tiny_llama, ids), before)


def test_mean_and_corrupt_ablation(tiny_llama):
    ids = encode_prompt(tiny_llama, PROMPT)
    other = "When John and Mary went to the store"
    item = {"kind": "neuron", "layer": 1, "index": 5, "op": "corrupt"}
    with intervened(tiny_llama, {"interventions": [item], "corrupt_prompt": other}, len(ids)):
        patched = run_trace(tiny_llama, PROMPT, neurons=True)
    corrupt = run_trace(tiny_llama, other, neurons=True)
    np.testing.assert_allclose(patched.neurons[1, :, 5], corrupt.neurons[1, :, 5], atol=1e-6)
    mean = {"interventions": [{**item, "op": "mean"}], "reference_prompts": [PROMPT, other]}
    with intervened(tiny_llama, mean, len(ids)):
        averaged = run_trace(tiny_llama, PROMPT, neurons=True)
    expected = np.concatenate([run_trace(tiny_llama, p, neurons=True).neurons[1, :, 5] for p in (PROMPT, other)]).mean()
    np.testing.assert_allclose(averaged.neurons[1, :, 5], expected, atol=1e-6)


def test_bad_specs(tiny_llama):
    for spec in [{}, {"interventions": [{"kind": "x", "layer": 0}]}, {"interventions": [{"kind": "neuron", "layer": 99, "index": 0}]},
                 {"interventions": [{"kind": "neuron", "layer": 0, "index": 0, "op": "mean"}]},
                 {"interventions": [{"kind": "resid", "layer": 0, "vector": [1.0]}]}]:
        with pytest.raises(UserInputError):
            intervene(tiny_llama, PROMPT, spec)
    assert no_hooks(tiny_llama)


def test_intervene_result_and_controls(tiny_llama):
    spec = {"interventions": neuron_items([(1, 8, 5), (2, 8, 6)], "scale", 50.0), "continue_tokens": 3}
    result = intervene(tiny_llama, PROMPT, spec)
    assert len(result.before["top"]) == 10 and result.after["continuation"] != ""
    assert result.delta_target_prob == pytest.approx(result.after["target_prob"] - result.before["target_prob"])
    control = controls(tiny_llama, PROMPT, spec, n_random=20, seed=1)
    assert len(control.null) == 20 and 0 < control.p_value <= 1
    assert control.observed == pytest.approx(result.delta_target_prob, abs=1e-6)
    assert set(control.dead_salmon) == {"observed", "null_mean", "null_std", "z_score", "p_value"}
    assert no_hooks(tiny_llama)


def test_corrupt_head_ablation_with_a_continuation(tiny_llama):
    spec = {"interventions": [{"kind": "head", "layer": 1, "index": 2, "op": "corrupt"}],
            "corrupt_prompt": "When John and Mary went to the store", "continue_tokens": 3}
    result = intervene(tiny_llama, PROMPT, spec)  # the continuation runs past the corrupted prompt's length
    assert result.after["continuation"] and no_hooks(tiny_llama)
