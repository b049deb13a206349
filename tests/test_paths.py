"""NeuronPath against the authors' code followed literally: one unbatched forward of the whole
prompt per step, activations of layers <= l at the path position replaced by constants,
alpha = k/m for k = 0..m-1. Our batched passes over a cached prefix must give the same scores,
the same argmax at every layer, the same JAS; the greedy gradient baseline follows its rule."""

import numpy as np
import pytest
import torch

from backend.causal.paths import NAMED, SuffixRunner, joint_attribution, layer_scores, neuron_path, recurring_neurons
from backend.errors import UserInputError
from backend.runtime.hooks import Hook, hooked
from backend.runtime.prompts import encode_prompt

PROMPT = "When Mary and John went to the store"
STEPS = 4


def clean_activations(handle, ids, position) -> list[torch.Tensor]:
    acts = {}
    hooks = [
        Hook(
            handle.adapter.layers[l].down_proj, "pre", lambda m, a, l=l: acts.__setitem__(l, a[0][0, position].clone())
        )
        for l in range(handle.adapter.n_layers)
    ]
    with hooked(handle, hooks), torch.no_grad():
        handle.model(torch.tensor([ids]))
    return [acts[l] for l in range(handle.adapter.n_layers)]


def literal_gradients(handle, ids, target, position, replaced: dict[int, torch.Tensor]):
    """p(target) and its gradient w.r.t. the activations of the layers in ``replaced``, which
    are set to those constants at ``position`` (the authors' Mlp.forward: x[:, 0] = tmp_score)."""
    leaves = {l: v.clone().requires_grad_(True) for l, v in replaced.items()}

    def replace(layer):
        def fn(module, args):
            x = args[0].clone()
            x[0, position] = leaves[layer]
            return (x,) + tuple(args[1:])
        return fn

    hooks = [Hook(handle.adapter.layers[l].down_proj, "pre", replace(l)) for l in leaves]
    with hooked(handle, hooks), torch.enable_grad():
        p = handle.model(torch.tensor([ids])).logits[0, -1].softmax(-1)[target]
        grads = torch.autograd.grad(p, [leaves[l] for l in sorted(leaves)])
    return dict(zip(sorted(leaves), grads))


def literal_layer_scores(handle, ids, target, position, path, layer, steps=STEPS) -> np.ndarray:
    clean = clean_activations(handle, ids, position)
    total = torch.zeros_like(clean[layer])
    path_grad = 0.0
    for k in range(steps):
        alpha = k / steps
        replaced = {}
        for l in range(layer + 1):
            value = alpha * clean[l] if l == layer else clean[l].clone()
            for pl, n in path:
                if pl == l and l != layer:
                    value[n] = alpha * clean[l][n]
            replaced[l] = value
        grads = literal_gradients(handle, ids, target, position, replaced)
        total += grads[layer]
        path_grad += sum(float(grads[l][n]) for l, n in path)
    path_act = sum(float(clean[l][n]) for l, n in path)
    return ((total + path_grad) * (clean[layer] + path_act) / steps).numpy()


@pytest.mark.parametrize("position", [None, 3])
def test_search_equals_the_literal_reference(tiny_llama, position):
    result = neuron_path(tiny_llama, PROMPT, steps=STEPS, n_random=10, position=position)
    ids = encode_prompt(tiny_llama, PROMPT)
    target, position = result.target["id"], result.position
    runner = SuffixRunner(tiny_llama, ids, position, target)
    path = []
    for row in result.path:
        literal = literal_layer_scores(tiny_llama, ids, target, position, path, row["layer"])
        fast = layer_scores(runner, path, row["layer"], STEPS)
        np.testing.assert_allclose(fast, literal, rtol=1e-4, atol=1e-10)
        assert row["neuron"] == int(np.argmax(literal))
        assert row["score"] == pytest.approx(float(literal.max()), rel=1e-4)
        path.append((row["layer"], row["neuron"]))
    # JAS: every layer replaced, the path scaled, summed over the path's neurons only
    clean = clean_activations(tiny_llama, ids, position)
    total_grad = 0.0
    for k in range(STEPS):
        replaced = {l: clean[l].clone() for l in range(tiny_llama.adapter.n_layers)}
        for l, n in path:
            replaced[l][n] = k / STEPS * clean[l][n]
        grads = literal_gradients(tiny_llama, ids, target, position, replaced)
        total_grad += sum(float(grads[l][n]) for l, n in path)
    expected = total_grad * sum(float(clean[l][n]) for l, n in path) / STEPS
    assert result.jas == pytest.approx(expected, rel=1e-4)
    assert joint_attribution(runner, path, STEPS) == pytest.approx(expected, rel=1e-4)


def test_the_gradient_baseline_is_greedy(tiny_llama):
    """Each layer's choice maximizes (g_lj + Σ g_path)(a_lj + Σ a_path) at the clean point,
    the gradients taken with the layers up to l replaced by their clean values."""
    result = neuron_path(tiny_llama, PROMPT, steps=STEPS, n_random=5)
    ids = encode_prompt(tiny_llama, PROMPT)
    target, position = result.target["id"], result.position
    clean = clean_activations(tiny_llama, ids, position)
    chosen = []
    for row in result.baselines["gradient_baseline"]:
        layer = row["layer"]
        grads = literal_gradients(tiny_llama, ids, target, position, {l: clean[l] for l in range(layer + 1)})
        path_grad = sum(float(grads[l][n]) for l, n in chosen)
        path_act = sum(float(clean[l][n]) for l, n in chosen)
        score = ((grads[layer] + path_grad) * (clean[layer] + path_act)).numpy()
        assert row["neuron"] == int(np.argmax(score)) and row["score"] == pytest.approx(float(score.max()), rel=1e-4)
        chosen.append((layer, row["neuron"]))


def test_evaluation_names_the_best_path_honestly(tiny_llama):
    result = neuron_path(tiny_llama, PROMPT, steps=STEPS, n_random=20, top_k=2)
    n_layers = tiny_llama.adapter.n_layers
    assert len(result.path) == 2 * n_layers
    by_act = result.baselines["activation_baseline"]
    assert all(by_act[2 * l]["activation"] >= by_act[2 * l + 1]["activation"] for l in range(n_layers))
    remove, enhance = result.evaluation["remove"], result.evaluation["enhance"]
    assert remove["best"] == min(NAMED, key=remove.get) and enhance["best"] == max(NAMED, key=enhance.get)
    assert remove["random_std"] >= 0 and set(result.top1_changes["remove"]) == set(NAMED)


def test_removing_nothing_changes_nothing(tiny_llama):
    ids = encode_prompt(tiny_llama, PROMPT)
    runner = SuffixRunner(tiny_llama, ids, len(ids) - 1, 5)
    p, _ = runner.intervened([[(0, 1)]], 1.0)
    with torch.no_grad():
        expected = tiny_llama.model(torch.tensor([ids])).logits[0, -1].softmax(-1)[5]
    assert p[0] == pytest.approx(float(expected), rel=1e-5)


def test_bad_settings_and_recurrence(tiny_llama):
    with pytest.raises(UserInputError):
        neuron_path(tiny_llama, PROMPT, position=99)
    with pytest.raises(UserInputError):
        neuron_path(tiny_llama, PROMPT, steps=0)
    a = neuron_path(tiny_llama, PROMPT, steps=2, n_random=2)
    b = neuron_path(tiny_llama, PROMPT + " Mary", steps=2, n_random=2)
    rows = recurring_neurons([a, b])
    assert rows[0]["count"] >= rows[-1]["count"] and sum(r["count"] for r in rows) == len(a.path) + len(b.path)


@pytest.mark.parametrize("position", [2, -1])
def test_the_cached_prefix_is_exact_on_every_family(tiny, position):
    """Sliding-window caches (Gemma), GPT-2, parallel GPT-NeoX: the suffix passes give the
    literal full-prompt scores."""
    ids = encode_prompt(tiny, PROMPT)
    position = position % len(ids)
    runner = SuffixRunner(tiny, ids, position, 7)
    fast = layer_scores(runner, [(0, 3)], 1, STEPS)
    literal = literal_layer_scores(tiny, ids, 7, position, [(0, 3)], 1)
    np.testing.assert_allclose(fast, literal, rtol=1e-4, atol=1e-6 * np.abs(literal).max())
