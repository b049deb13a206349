"""NeuronPath: the batched layer scores equal an unbatched recomputation, the search picks
their argmax at every layer, JAS is recomputed independently, evaluation is consistent."""

import numpy as np
import pytest
import torch

from backend.errors import UserInputError
from backend.runtime.hooks import Hook, hooked
from backend.causal.paths import layer_scores, neuron_path, recurring_neurons
from backend.runtime.prompts import encode_prompt

PROMPT = "When Mary and John went to the store"
STEPS = 4


def probability_and_gradients(handle, ids, target, position, scales: dict) -> tuple[float, dict]:
    """One unbatched run: layer l's neurons at ``position`` multiplied by scales[l] ([d_mlp])."""
    kept = {}

    def hook(layer):
        def fn(module, args):
            x = args[0].clone()
            x[0, position] = x[0, position] * scales[layer]
            kept[layer] = x
            return (x,) + tuple(args[1:])

        return fn

    hooks = [Hook(handle.adapter.layers[l].down_proj, "pre", hook(l)) for l in scales]
    hooks.insert(0, Hook(handle.adapter.layers[0].block, "pre", lambda m, a: (a[0].detach().requires_grad_(True),) + a[1:]))
    with hooked(handle, hooks), torch.enable_grad():
        p = handle.model(torch.tensor([ids])).logits[0, -1].softmax(-1)[target]
        grads = torch.autograd.grad(p, [kept[l] for l in sorted(kept)])
    return float(p.detach()), {l: g[0, position] for l, g in zip(sorted(kept), grads)}


def slow_layer_scores(handle, ids, target, position, path, layer):
    d_mlp = handle.adapter.d_mlp
    total = torch.zeros(d_mlp)
    path_grad = 0.0
    for k in range(1, STEPS + 1):
        alpha = k / STEPS
        scales = {l: torch.ones(d_mlp) for l, _ in path}
        for l, n in path:
            scales[l][n] = alpha
        scales[layer] = torch.full((d_mlp,), alpha)
        _, grads = probability_and_gradients(handle, ids, target, position, scales)
        total += grads[layer]
        path_grad += sum(float(grads[l][n]) for l, n in path)
    _, clean = probability_and_gradients(handle, ids, target, position, {l: torch.ones(d_mlp) for l in range(layer + 1)})
    with torch.no_grad():
        acts = {}
        hooks = [Hook(handle.adapter.layers[l].down_proj, "pre", lambda m, a, l=l: acts.__setitem__(l, a[0][0, position].clone()))
                 for l in range(layer + 1)]
        with hooked(handle, hooks):
            handle.model(torch.tensor([ids]))
    path_act = sum(float(acts[l][n]) for l, n in path)
    return ((total + path_grad) * (acts[layer] + path_act) / STEPS).numpy()


def test_search_is_the_argmax_of_the_unbatched_score(tiny_llama):
    result = neuron_path(tiny_llama, PROMPT, steps=STEPS, n_random=10)
    ids = encode_prompt(tiny_llama, PROMPT)
    target, position = result.target["id"], result.position
    path = []
    for row in result.path:
        slow = slow_layer_scores(tiny_llama, ids, target, position, path, row["layer"])
        fast = layer_scores(tiny_llama, ids, target, position, path, row["layer"], STEPS)
        np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-9)
        assert row["neuron"] == int(np.argmax(slow))
        assert row["score"] == pytest.approx(float(slow.max()), rel=1e-4)
        path.append((row["layer"], row["neuron"]))


def test_jas_recomputed_independently(tiny_llama):
    result = neuron_path(tiny_llama, PROMPT, steps=STEPS, n_random=10)
    ids = encode_prompt(tiny_llama, PROMPT)
    path = [(r["layer"], r["neuron"]) for r in result.path]
    d_mlp = tiny_llama.adapter.d_mlp
    total_grad = 0.0
    for k in range(1, STEPS + 1):
        scales = {l: torch.ones(d_mlp) for l, _ in path}
        for l, n in path:
            scales[l][n] = k / STEPS
        _, grads = probability_and_gradients(tiny_llama, ids, result.target["id"], result.position, scales)
        total_grad += sum(float(grads[l][n]) for l, n in path)
    total_act = sum(r["activation"] for r in result.path)
    assert result.jas == pytest.approx(total_grad * total_act / STEPS, rel=1e-4)


def test_baselines_and_evaluation(tiny_llama):
    result = neuron_path(tiny_llama, PROMPT, steps=STEPS, n_random=20, top_k=2)
    n_layers = tiny_llama.adapter.n_layers
    assert len(result.path) == 2 * n_layers
    by_act = result.baselines["activation_baseline"]
    assert all(by_act[2 * l]["activation"] >= by_act[2 * l + 1]["activation"] for l in range(n_layers))
    for operation in ("remove", "enhance"):
        keys = set(result.evaluation[operation])
        assert keys == {"path", "activation_baseline", "gradient_baseline", "random_mean", "random_std"}
    assert result.evaluation["remove"]["random_std"] >= 0


def test_removing_nothing_changes_nothing(tiny_llama):
    from backend.causal.paths import _intervened_probs

    ids = encode_prompt(tiny_llama, PROMPT)
    p, _ = _intervened_probs(tiny_llama, ids, 5, len(ids) - 1, [[(0, 1)]], 1.0)
    with torch.no_grad():
        expected = tiny_llama.model(torch.tensor([ids])).logits[0, -1].softmax(-1)[5]
    assert p[0] == pytest.approx(float(expected), rel=1e-6)


def test_bad_settings_and_recurrence(tiny_llama):
    with pytest.raises(UserInputError):
        neuron_path(tiny_llama, PROMPT, position=99)
    with pytest.raises(UserInputError):
        neuron_path(tiny_llama, PROMPT, steps=0)
    a = neuron_path(tiny_llama, PROMPT, steps=2, n_random=2)
    b = neuron_path(tiny_llama, PROMPT + " Mary", steps=2, n_random=2)
    rows = recurring_neurons([a, b])
    assert rows[0]["count"] >= rows[-1]["count"] and sum(r["count"] for r in rows) == len(a.path) + len(b.path)
