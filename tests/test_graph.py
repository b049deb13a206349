"""Attribution graph: exact conservation, edges equal brute-force perturbation, pruning,
scores, and the Neuronpedia JSON round trip."""

import json

import numpy as np
import pytest
import torch

from backend.errors import UserInputError
from backend.graphs.attribution import attribution_graph
from backend.graphs.neuronpedia import parse_graph_json, to_graph_json, view_from_graph
from backend.graphs.prune import graph_scores, influence_series, normalize_rows, prune
from backend.runtime.linearize import linear_forward, record_frozen
from backend.runtime.prompts import encode_prompt

PROMPT = "When Mary and John went to the store"


def target_rows(graph) -> list[int]:
    return list(range(graph.n_features)) + list(range(graph.logit_slice.start, graph.n_nodes))


def test_linearized_forward_reproduces_the_model(tiny):
    ids = torch.tensor([encode_prompt(tiny, PROMPT)])
    frozen = record_frozen(tiny, ids)
    with torch.no_grad():
        plain = tiny.adapter.base(ids).last_hidden_state
    for direct in (False, True):
        run = linear_forward(tiny, frozen, direct=direct)
        assert (run.final - plain).abs().max() < 1e-5


def test_every_node_is_the_sum_of_its_incoming_edges(tiny):
    graph = attribution_graph(tiny, PROMPT, max_nodes=25, batch_size=7)
    rows = target_rows(graph)
    values = graph.node_values[rows]
    sums = graph.adjacency[rows].sum(axis=1)
    scale = np.maximum(np.abs(values), np.abs(graph.adjacency[rows]).sum(axis=1))
    assert (np.abs(sums - values) / scale).max() < 1e-4
    if tiny.adapter.family in ("llama", "gemma"):  # no bias parameters at all
        assert np.abs(graph.adjacency[:, graph.bias_index]).max() == 0


def test_edges_equal_brute_force_perturbation(tiny_llama):
    """Edge s->t = t(all sources) - t(source s set to zero), in the direct-mode linear model."""
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=12, batch_size=5)
    ids = torch.tensor([graph.token_ids])
    frozen = record_frozen(tiny_llama, ids)
    clean = linear_forward(tiny_llama, frozen, direct=True)
    neurons = [v.detach() for v in clean.neuron_inputs]
    embed = clean.embed.detach()

    def row_values(run):
        out = [run.neurons[l][0, p, i] for l, p, i in graph.features]
        matrix = torch.full((len(graph.logit_targets), run.logits.shape[-1]), -1.0 / run.logits.shape[-1])
        for t, info in enumerate(graph.logit_targets):
            matrix[t, info["id"]] += 1.0
        return torch.cat([torch.stack(out), run.logits[0] @ matrix.T]).detach().numpy()

    base = row_values(clean)
    rows = target_rows(graph)
    for source, (layer, pos, idx) in enumerate(graph.features):
        changed = [v.clone() for v in neurons]
        changed[layer][0, pos, idx] = 0.0
        with torch.no_grad():
            perturbed = row_values(linear_forward(tiny_llama, frozen, direct=True, neuron_values=changed))
        np.testing.assert_allclose(graph.adjacency[rows, source], base - perturbed, atol=1e-6)
    for pos in range(graph.n_pos):
        changed = embed.clone()
        changed[0, pos] = 0.0
        with torch.no_grad():
            perturbed = row_values(linear_forward(tiny_llama, frozen, direct=True, embed_value=changed, neuron_values=neurons))
        np.testing.assert_allclose(graph.adjacency[rows, graph.embed_slice.start + pos], base - perturbed, atol=1e-6)


def test_graph_is_acyclic_and_respects_layers(tiny_llama):
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=30)
    for row in range(graph.n_features):
        layer, pos = graph.node_position(row)
        sources = np.flatnonzero(graph.adjacency[row])
        for s in sources:
            if graph.node_kind(s) in ("neuron", "other"):
                s_layer, s_pos = graph.node_position(s)
                assert s_layer < layer and s_pos <= pos


def test_chosen_target_and_logit_difference(tiny_llama):
    single = attribution_graph(tiny_llama, PROMPT, " Mary", max_nodes=5)
    assert [t["token"] for t in single.logit_targets] == [" Mary"] and single.logit_weights == [1.0]
    diff = attribution_graph(tiny_llama, PROMPT, " Mary", wrong=" John", max_nodes=5)
    assert diff.logit_targets[0]["token"] == " Mary −  John"
    ids = torch.tensor([diff.token_ids])
    with torch.no_grad():
        logits = tiny_llama.model(ids).logits[0, -1]
    mary, john = diff.logit_targets[0]["id"], diff.logit_targets[0]["wrong_id"]
    assert diff.node_values[-1] == pytest.approx(float(logits[mary] - logits[john]), abs=1e-5)
    with pytest.raises(UserInputError):
        attribution_graph(tiny_llama, PROMPT, None, wrong=" John")
    with pytest.raises(UserInputError):
        attribution_graph(tiny_llama, PROMPT, max_nodes=-1)


def test_pruning_keeps_inputs_and_logits_and_needs_no_model(tiny_llama, monkeypatch):
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=40)
    monkeypatch.setattr(tiny_llama, "model", None)  # any model call would now fail
    loose = prune(graph, 1.0, 1.0)
    tight = prune(graph, 0.5, 0.9)
    assert loose.node_mask[graph.embed_slice].all() and loose.node_mask[graph.logit_slice].all()
    assert tight.node_mask.sum() <= loose.node_mask.sum()
    assert tight.edge_mask.sum() <= loose.edge_mask.sum()
    kept = np.flatnonzero(tight.node_mask[: graph.n_features])
    assert all(tight.edge_mask[:, k].any() for k in kept)  # every kept neuron sends an edge
    with pytest.raises(UserInputError):
        prune(graph, 1.5, 0.9)


def test_influence_series_equals_the_matrix_inverse(tiny_llama):
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=20)
    normalized = normalize_rows(graph.adjacency.astype(np.float64))
    weights = np.zeros(graph.n_nodes)
    weights[graph.logit_slice] = graph.logit_weights
    exact = weights @ (np.linalg.inv(np.eye(graph.n_nodes) - normalized) - np.eye(graph.n_nodes))
    np.testing.assert_allclose(influence_series(normalized, weights), exact, atol=1e-10)
    scores = graph_scores(graph)
    assert 0 <= scores["replacement"] <= 1 and 0 <= scores["completeness"] <= 1


def test_more_neurons_replace_more(tiny_llama):
    few = graph_scores(attribution_graph(tiny_llama, PROMPT, max_nodes=2))
    all_of_them = graph_scores(attribution_graph(tiny_llama, PROMPT, max_nodes=5000))
    assert all_of_them["replacement"] > few["replacement"]
    assert all_of_them["replacement"] == pytest.approx(1.0)  # no "other neurons" left


def test_graph_json_round_trip_and_schema(tiny_llama):
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=20)
    view = view_from_graph(graph, 0.8, 0.98)
    exported = to_graph_json(view, pinned=[view.nodes[0]["node_id"]], supernodes=[["group", view.nodes[0]["node_id"]]])
    assert set(exported) == {"metadata", "qParams", "nodes", "links"}
    node_keys = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
                 "jsNodeId", "clerp", "influence", "activation"}
    assert all(node_keys <= set(n) for n in exported["nodes"])
    assert all(set(l) == {"source", "target", "weight"} for l in exported["links"])
    assert {"replacement", "completeness"} <= set(exported["metadata"]["scores"])
    assert "total_s" in exported["metadata"]["timings"] and exported["metadata"]["settings"]["max_nodes"] == 20
    again = to_graph_json(parse_graph_json(json.dumps(exported)))
    assert again == exported


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("nodes"), "missing 'nodes'"),
        (lambda d: d["nodes"][1].pop("ctx_idx"), "nodes[1]: missing 'ctx_idx'"),
        (lambda d: d["nodes"][0].update(ctx_idx="3"), "nodes[0].ctx_idx: expected an integer"),
        (lambda d: d["nodes"][0].update(feature_type="magic"), "unknown type"),
        (lambda d: d["links"][0].update(target="nope"), "links[0].target: unknown node"),
        (lambda d: d["metadata"].pop("prompt_tokens"), "missing 'prompt_tokens'"),
    ],
)
def test_import_names_the_first_error(tiny_llama, mutate, message):
    view = view_from_graph(attribution_graph(tiny_llama, PROMPT, max_nodes=20))
    data = to_graph_json(view)
    mutate(data)
    with pytest.raises(UserInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_graph_json(json.dumps(data))


def test_import_refuses_non_json_and_oversized(monkeypatch):
    with pytest.raises(UserInputError, match="not JSON"):
        parse_graph_json(b"\xff\xfe not json")
    monkeypatch.setattr("backend.graphs.neuronpedia.MAX_IMPORT_BYTES", 10)
    with pytest.raises(UserInputError, match="limit"):
        parse_graph_json(b'{"metadata": {}, "nodes": [], "links": []}')
