"""Interventions: exact against hand-modified models, nothing leaks. Controls: random sets
that never hold a claimed or repeated unit, matched on activation, p and z both two-sided
around the null mean, and a dead-salmon control that re-runs the selection."""

import copy

import numpy as np
import pytest
import torch

from backend.causal.controls import _summary, controls, dead_salmon, random_sets
from backend.causal.interventions import Item, intervene, intervened, intervened_rows, neuron_items, parse_items
from backend.errors import UserInputError
from backend.runtime.prompts import encode_prompt
from backend.runtime.trace import run_trace
from tests.tiny import tiny_handle

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
    with intervened(
        tiny_llama, {"interventions": neuron_items([(layer, position, neuron)], "scale", factor)}, len(ids)
    ):
        scaled = run_trace(tiny_llama, PROMPT)
    expected = (factor - 1) * clean.neurons[layer, position, neuron] * \
        tiny_llama.adapter.down_proj_weight(layer)[:, neuron].numpy()
    np.testing.assert_allclose(
        scaled.resid[layer + 1, position] - clean.resid[layer + 1, position], expected, atol=1e-5
    )
    np.testing.assert_allclose(scaled.resid[layer + 1, :position], clean.resid[layer + 1, :position], atol=1e-6)


def test_head_zero_equals_zeroing_its_output_columns(tiny_llama):
    ids = encode_prompt(tiny_llama, PROMPT)
    layer, head = 2, 1
    with intervened(
        tiny_llama, {"interventions": [{"kind": "head", "layer": layer, "index": head, "op": "zero"}]}, len(ids)
    ):
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
    for spec in [
        {},
        {"interventions": [{"kind": "x", "layer": 0}]},
        {"interventions": [{"kind": "neuron", "layer": 99, "index": 0}]},
        {"interventions": [{"kind": "neuron", "layer": 0, "index": 0, "op": "mean"}]},
        {"interventions": [{"kind": "resid", "layer": 0, "vector": [1.0]}]},
    ]:
        with pytest.raises(UserInputError):
            intervene(tiny_llama, PROMPT, spec)
    assert no_hooks(tiny_llama)


def test_intervene_result(tiny_llama):
    spec = {"interventions": neuron_items([(1, 8, 5), (2, 8, 6)], "scale", 50.0), "continue_tokens": 3}
    result = intervene(tiny_llama, PROMPT, spec)
    assert len(result.before["top"]) == 10 and result.after["continuation"] != ""
    assert result.delta_target_prob == pytest.approx(result.after["target_prob"] - result.before["target_prob"])
    assert no_hooks(tiny_llama)


def test_batched_rows_equal_one_set_at_a_time(tiny_llama):
    ids = encode_prompt(tiny_llama, PROMPT)
    sets = [parse_items(tiny_llama, {"interventions": neuron_items([(l, 4, l + j)], "scale", 3.0)}, len(ids))
            for l, j in [(0, 1), (1, 5), (2, 9)]]
    sets.append(parse_items(tiny_llama, {"interventions": [{"kind": "head", "layer": 1, "index": 2, "op": "zero"}]},
                            len(ids)))
    with intervened_rows(tiny_llama, {}, len(ids), sets):
        batched = tiny_llama.model(torch.tensor([ids] * len(sets))).logits
    for row, items in enumerate(sets):
        with intervened(tiny_llama, {}, len(ids), items):
            single = logits(tiny_llama, ids)
        torch.testing.assert_close(batched[row], single, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- controls


def claimed(handle) -> list[Item]:
    ids = encode_prompt(handle, PROMPT)
    return parse_items(handle, {"interventions": neuron_items([(1, 8, 5), (1, 8, 6), (2, 3, 40)])}, len(ids))


@pytest.mark.parametrize("null", ["matched", "plain"])
def test_random_sets_never_hold_a_claimed_or_repeated_unit(tiny_llama, null):
    from backend.causal.controls import _magnitudes

    items = claimed(tiny_llama)
    sets = random_sets(tiny_llama, items, 300, np.random.default_rng(0), null, _magnitudes(tiny_llama, PROMPT))
    taken = {(i.layer, i.index) for i in items}
    for drawn in sets:
        units = [(i.layer, i.index) for i in drawn]
        assert len(set(units)) == len(units) and not set(units) & taken
        assert [(i.layer, i.positions, i.op) for i in drawn] == [(i.layer, i.positions, i.op) for i in items]


def test_matched_sets_are_closer_in_activation_than_plain_ones(tiny_llama):
    from backend.causal.controls import _magnitudes, _unit_magnitude

    items = claimed(tiny_llama)
    magnitudes = _magnitudes(tiny_llama, PROMPT)
    gaps = {}
    for null in ("matched", "plain"):
        sets = random_sets(tiny_llama, items, 200, np.random.default_rng(1), null, magnitudes)
        gaps[null] = np.mean([abs(_unit_magnitude(magnitudes, d)[d.index] - _unit_magnitude(magnitudes, c)[c.index])
                              for drawn in sets for d, c in zip(drawn, items)])
    assert gaps["matched"] < gaps["plain"] / 3


def test_p_and_z_are_both_two_sided_around_the_null_mean():
    null = np.array([-1.0, 0.0, 1.0, 2.0])  # mean 0.5
    mean, std, z_high, p_high = _summary(3.0, null)
    _, _, z_low, p_low = _summary(-2.0, null)  # the same distance below the mean
    assert mean == 0.5 and z_high == pytest.approx(-z_low) and p_high == p_low == pytest.approx(1 / 5)
    assert _summary(0.5, null)[2:] == (0.0, 1.0)  # at the null mean: nothing
    assert _summary(1.6, null)[3] == pytest.approx(3 / 5)  # |x - 0.5| >= 1.1 for -1.0 and 2.0, plus one


def test_controls_on_a_random_network_find_no_difference_from_its_dead_salmon():
    """When the "trained" model is itself randomly initialized, the explanation is an
    artefact of the method: the dead-salmon control, which re-runs the same selection on
    another re-initialized copy, must report an effect of similar size."""
    handle = tiny_handle("llama", seed=3)
    from backend.causal.controls import _attribution_units

    ids = encode_prompt(handle, PROMPT)
    target = int(logits(handle, ids)[-1].argmax())
    units = _attribution_units(handle, PROMPT, target, "neuron", 6)
    spec = {"interventions": neuron_items(units, "zero"), "selection": {"method": "attribution"}}
    control = controls(handle, PROMPT, spec, n_random=60, seed=0)
    trained, salmon = control.trained, control.dead_salmon
    assert salmon.items != trained.items  # its own set, chosen on its own weights
    assert 0.2 < abs(salmon.observed) / abs(trained.observed) < 5
    assert np.sign(salmon.z_score) == np.sign(trained.z_score)
    assert no_hooks(handle) and no_hooks(dead_salmon(handle, 0))


def test_controls_result_fields_and_bad_input(tiny_llama):
    spec = {"interventions": neuron_items([(1, 8, 5), (2, 8, 6)], "scale", 50.0)}
    control = controls(tiny_llama, PROMPT, spec, n_random=20, seed=1, salmon=False)
    assert len(control.trained.null) == 20 and 0 < control.trained.p_value <= 1 and control.dead_salmon is None
    observed = intervene(tiny_llama, PROMPT, {**spec, "continue_tokens": 0}).delta_target_prob
    assert control.trained.observed_prob == pytest.approx(observed, abs=1e-6)
    with pytest.raises(UserInputError):
        controls(tiny_llama, PROMPT, spec, n_random=0)
    with pytest.raises(UserInputError):
        controls(tiny_llama, PROMPT, spec, null="magic")
    assert no_hooks(tiny_llama)


def test_corrupt_head_ablation_with_a_continuation(tiny_llama):
    spec = {"interventions": [{"kind": "head", "layer": 1, "index": 2, "op": "corrupt"}],
            "corrupt_prompt": "When John and Mary went to the store", "continue_tokens": 3}
    result = intervene(tiny_llama, PROMPT, spec)  # the continuation runs past the corrupted prompt's length
    assert result.after["continuation"] and no_hooks(tiny_llama)
