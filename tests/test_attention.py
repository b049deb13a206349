"""QK attribution and information-flow routes on tiny models of every family.

Independent references: the model's own attention weights (every family: the softmax of our
scores, with the causal and sliding-window masks and Gemma 2's soft-cap, must equal them),
the hand-written forward of tests/manual.py (Llama, GPT-2: absolute pre-softmax scores) and
the model's own residual states (the parts of each step add up to them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.analyses.flow import head_shares, information_flow, proportions, routes
from backend.analyses.qk import component_outputs, qk_attribution, score_rows, strongest_key
from backend.causal.components import layout
from backend.errors import UserInputError
from backend.runtime.attention import AttentionMaps
from backend.runtime.prompts import encode_prompt
from tests.manual import ManualModel
from tests.tiny import tiny_handle

PROMPT = "When Mary and John went to the store, John gave"


def _mask(handle, layer: int, n: int) -> torch.Tensor:
    config = handle.model.config
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    if getattr(config, "layer_types", None) and config.layer_types[layer] == "sliding_attention":
        mask |= torch.tril(torch.ones(n, n, dtype=torch.bool), -config.sliding_window)
    return mask


def test_our_scores_give_the_models_attention_weights(tiny):
    ids = encode_prompt(tiny, PROMPT)
    maps = AttentionMaps(tiny, ids)
    for layer in range(tiny.adapter.n_layers):
        scores = score_rows(maps, layer)
        cap = maps.softcap(layer)
        if cap:
            scores = torch.tanh(scores / cap) * cap
        scores = scores.masked_fill(_mask(tiny, layer, len(ids)), float("-inf"))
        torch.testing.assert_close(scores.softmax(-1), maps.frozen[layer].pattern, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scores_equal_an_independent_forward(family):
    handle = tiny_handle(family)
    ids = encode_prompt(handle, PROMPT)
    record, _ = ManualModel(handle.model, family).clean(ids)
    maps = AttentionMaps(handle, ids)
    for layer in range(handle.adapter.n_layers):
        causal = ~torch.triu(torch.ones(len(ids), len(ids), dtype=torch.bool), 1)
        torch.testing.assert_close(score_rows(maps, layer)[:, causal], record.scores[layer][:, causal],
                                   atol=1e-5, rtol=1e-5)


def test_the_terms_sum_to_the_score_and_the_components_to_the_stream(tiny):
    ids = encode_prompt(tiny, PROMPT)
    names, outputs = component_outputs(tiny, ids)
    maps = AttentionMaps(tiny, ids)
    lay = layout(tiny)
    for layer in range(tiny.adapter.n_layers):
        upstream = lay.upstream[lay.head_receivers(layer)]
        torch.testing.assert_close(outputs[:upstream].sum(0), maps.frozen[layer].resid, atol=1e-5, rtol=1e-5)
    last = tiny.adapter.n_layers - 1
    whole = score_rows(maps, last)
    for head, query, key in [(0, 10, 3), (tiny.adapter.n_heads - 1, 10, 10), (1, 5, 0)]:
        result = qk_attribution(tiny, PROMPT, last, head, query, key, top=10_000)
        assert result.score == pytest.approx(float(whole[head, query, key]), abs=1e-4)
        assert sum(t["value"] for t in result.terms) + result.rest == pytest.approx(result.score, abs=1e-6)
        assert abs(result.rest) < 1e-9  # everything listed
        assert sum(r["value"] for r in result.query_side) == pytest.approx(result.score, abs=1e-6)
        assert result.probability == pytest.approx(float(maps.frozen[last].pattern[head, query, key]), abs=1e-6)


def test_a_query_side_total_is_the_score_without_that_component(tiny_llama):
    """Bilinearity: removing component c from the query's residual stream lowers the score by
    exactly c's query-side total (computed by rerunning the maps on the edited stream)."""
    ids = encode_prompt(tiny_llama, PROMPT)
    names, outputs = component_outputs(tiny_llama, ids)
    layer, head, query, key = 2, 1, 9, 4
    result = qk_attribution(tiny_llama, PROMPT, layer, head, query, key, top=10_000)
    maps = AttentionMaps(tiny_llama, ids)
    component = next(r for r in result.query_side if r["component"] == "a1.h2")
    edited = maps.frozen[layer].resid[query:query + 1] - outputs[names.index("a1.h2"), query:query + 1]
    q = maps.queries(layer, edited, torch.tensor([query]), include_bias=True)[0, head]
    k = maps.keys(layer, maps.frozen[layer].resid[key:key + 1], torch.tensor([key]), include_bias=True)[0, head // 2]
    without = maps.scaling(layer) * float(q @ k)
    assert result.score - without == pytest.approx(component["value"], abs=1e-5)


def test_comparing_two_keys_explains_the_difference(tiny_llama):
    a = qk_attribution(tiny_llama, PROMPT, 2, 0, 10, 4, compare_key=7, top=10_000)
    b = qk_attribution(tiny_llama, PROMPT, 2, 0, 10, 7)
    assert a.comparison["difference"] == pytest.approx(a.score - b.score, abs=1e-6)
    assert sum(t["value"] for t in a.comparison["terms"]) == pytest.approx(a.score - b.score, abs=1e-6)
    assert strongest_key(tiny_llama, PROMPT, 2, 0, 10) == int(
        AttentionMaps(tiny_llama, encode_prompt(tiny_llama, PROMPT)).frozen[2].pattern[0, 10].argmax())


@pytest.mark.parametrize("args, message", [
    ((5, 0, 3, 1), "No layer 5"), ((0, 9, 3, 1), "No head 9"), ((0, 0, 40, 1), "outside the prompt"),
    ((0, 0, 3, 5), "comes after query"),
])
def test_qk_bad_input(tiny_llama, args, message):
    with pytest.raises(UserInputError, match=message):
        qk_attribution(tiny_llama, PROMPT, *args)


def test_flow_parts_add_up_and_importances_are_proportions(tiny):
    flow = information_flow(tiny, PROMPT)
    assert flow.max_error < 1e-5  # source parts + residual + bias = the model's state after attention
    P = len(flow.tokens)
    step = flow.attention.sum(-1) + flow.attention_residual
    if not tiny.adapter.parallel:
        np.testing.assert_allclose(step, 1.0, atol=1e-4)  # the bias takes the rest, here ~0
        np.testing.assert_allclose(flow.mlp + flow.mlp_residual, 1.0, atol=1e-5)
    assert np.all(flow.attention[:, np.triu_indices(P, 1)[0], np.triu_indices(P, 1)[1]] == 0)
    assert flow.attention.min() >= 0


def test_proportions_follow_the_l1_proximity_formula():
    parts = torch.tensor([[[1.0, 1.0], [0.5, 2.0], [-0.2, 0.1]]])
    total = parts.sum(1)  # [1.3, 3.1]: proximities 2.0, 2.5 and 0
    prox = [max(float(total.abs().sum() - (total - p).abs().sum()), 0) for p in parts[0]]
    expected = torch.tensor(prox) / sum(prox)
    torch.testing.assert_close(proportions(parts, total)[0], expected)


def test_head_shares_split_the_attention_edges(tiny_llama):
    flow = information_flow(tiny_llama, PROMPT)
    shares = head_shares(tiny_llama, PROMPT, 1, -1)
    assert shares.shape == (tiny_llama.adapter.n_heads, len(flow.tokens))
    assert 0 <= shares.min() and shares.sum() <= 1 + 1e-5


def test_routes_connect_to_the_prediction():
    handle = tiny_handle("gemma2")
    flow = information_flow(handle, PROMPT)
    edges = routes(flow, 0.04)
    assert edges and all(e.importance >= 0.04 for e in edges)
    last_layer = [e for e in edges if e.layer == len(flow.attention) - 1]
    assert {e.target for e in last_layer} == {len(flow.tokens) - 1}  # only the predicting state's block
    reached = {len(flow.tokens) - 1}  # walking back, every edge's target was reached by a later kept edge
    for layer in range(len(flow.attention) - 1, -1, -1):
        here = [e for e in edges if e.layer == layer]
        assert all(e.target in reached for e in here if e.stage == "mlp")
        reached = {e.source for e in here if e.stage == "attention"}
    assert len(routes(flow, 0.5)) < len(edges)


def test_an_unknown_attention_module_is_refused_with_a_message():
    """A family the adapter accepts but whose attention projections we cannot map: a plain
    message (the page shows it), not a traceback."""
    from dataclasses import replace

    from backend.runtime.attention import qkv_weights

    handle = tiny_handle("llama")
    parts = handle.adapter.layers[0]
    odd = replace(handle.adapter, layers=(replace(parts, attn=torch.nn.Identity()), *handle.adapter.layers[1:]))
    with pytest.raises(UserInputError, match="Identity"):
        qkv_weights(odd, 0)
