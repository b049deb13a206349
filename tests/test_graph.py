"""Attribution graphs: exact conservation on every family, edges equal to an independent
forward (tests/manual.py), selection as circuit-tracer selects, circuit-tracer's scores,
the sink, node ids, the Neuronpedia JSON round trip and grouped supernodes."""

import json

import numpy as np
import pytest
import torch

from backend.errors import UserInputError
from backend.graphs.attribution import attribution_graph
from backend.graphs.grouping import group_id, grouped_view
from backend.graphs.neuronpedia import node_ids, parse_graph_json, to_graph_json, view_from_graph
from backend.graphs.prune import graph_scores, influence_series, normalize_rows, prune
from backend.runtime.linearize import Leaves, linear_forward, record_frozen
from backend.runtime.prompts import encode_prompt
from tests.manual import ManualModel
from tests.tiny import tiny_handle

PROMPT = "When Mary and John went to the store"


def relative_conservation_error(graph) -> float:
    rows = graph.target_rows()
    values = graph.node_values[rows]
    sums = graph.adjacency[rows].sum(axis=1)
    scale = np.maximum(np.abs(values), np.abs(graph.adjacency[rows]).sum(axis=1))
    return float((np.abs(sums - values) / np.maximum(scale, 1e-12)).max())


def test_linearized_forward_reproduces_the_model(tiny):
    ids = torch.tensor([encode_prompt(tiny, PROMPT)])
    frozen = record_frozen(tiny, ids)
    with torch.no_grad():
        plain = tiny.adapter.base(ids).last_hidden_state
    for direct in (False, True):
        run = linear_forward(tiny, frozen, direct=direct)
        assert (run.final - plain).abs().max() < 1e-5


@pytest.mark.parametrize("other_inputs", [True, False])
def test_every_node_is_the_sum_of_its_incoming_edges(tiny, other_inputs):
    graph = attribution_graph(tiny, PROMPT, max_nodes=25, batch_size=7, other_inputs=other_inputs)
    assert relative_conservation_error(graph) < 1e-4
    other_rows = [graph.other_index(l, p) for l in range(graph.n_layers) for p in range(graph.n_pos)]
    assert graph.adjacency[other_rows].any() == other_inputs  # "other" nodes get inputs only when asked
    if tiny.adapter.family in ("llama", "gemma"):  # no bias parameters at all
        assert np.abs(graph.adjacency[:, graph.bias_index]).max() == 0


# ---------------------------------------------------------------- edges against an independent forward


class Brute:
    """Node values of the direct-mode linear model, computed by tests/manual.py: every
    source set to zero in turn gives its edge into every target; all sources at zero give
    the biases."""

    def __init__(self, handle, graph, family: str) -> None:
        self.graph, self.model = graph, ManualModel(handle.model, family)
        self.clean, out = self.model.clean(graph.token_ids)
        self.embed = self.model.embed(graph.token_ids).detach()
        with torch.no_grad():
            self.neurons = {l: n.detach() for l, n in enumerate(self.model.run(self.clean, self.embed).neurons)}
        self.matrix = torch.zeros(len(graph.logit_targets), out.logits.shape[-1])
        for t, info in enumerate(graph.logit_targets):
            self.matrix[t] = -1.0 / out.logits.shape[-1]
            self.matrix[t, info["id"]] += 1.0
        self.unselected = {l: torch.ones_like(n) for l, n in self.neurons.items()}
        for layer, pos, neuron in graph.features:
            self.unselected[layer][pos, neuron] = 0.0
        self.directions = self._total_effect_directions()

    def _total_effect_directions(self) -> dict[int, torch.Tensor]:
        """Gradient of the weighted targets w.r.t. each MLP's write, through every path of
        the (non-direct) linearized model."""
        out = self.model.run(self.clean, self.embed.clone(), taps=True)
        objective = (torch.tensor(self.graph.logit_weights) * (self.matrix @ out.logits[-1])).sum()
        layers = range(self.graph.n_layers)
        grads = torch.autograd.grad(objective, [out.taps[("mlp_out", l)] for l in layers])
        return dict(zip(layers, grads))

    def values(self, embed: torch.Tensor, neurons: dict[int, torch.Tensor]) -> np.ndarray:
        """Every node's value (adjacency order; 0 for nodes without inputs)."""
        graph = self.graph
        with torch.no_grad():
            out = self.model.run(self.clean, embed, neurons=neurons)
        values = np.zeros(graph.n_nodes)
        for i, (layer, pos, neuron) in enumerate(graph.features):
            values[i] = out.neurons[layer][pos, neuron]
        for layer in range(graph.n_layers):
            down = self._down_weight(layer)
            for pos in range(graph.n_pos):
                write = (out.neurons[layer][pos] * self.unselected[layer][pos]) @ down
                values[graph.other_index(layer, pos)] = float(write @ self.directions[layer][pos])
        values[graph.logit_slice] = (self.matrix @ out.logits[-1]).numpy()
        return values

    def _down_weight(self, layer: int) -> torch.Tensor:
        model = self.model.model
        if self.model.family == "llama":
            return model.model.layers[layer].mlp.down_proj.weight.T
        return model.transformer.h[layer].mlp.c_proj.weight

    def edge_column(self, source: int) -> np.ndarray:
        graph, embed = self.graph, self.embed.clone()
        neurons = {l: n.clone() for l, n in self.neurons.items()}
        kind = graph.node_kind(source)
        layer, pos = graph.node_position(source)
        if kind == "embedding":
            embed[pos] = 0.0
        elif kind == "neuron":
            neurons[layer][pos, graph.features[source][2]] = 0.0
        else:
            neurons[layer][pos] = neurons[layer][pos] * (1 - self.unselected[layer][pos])
        return self.values(self.embed, self.neurons) - self.values(embed, neurons)

    def biases(self) -> np.ndarray:
        return self.values(torch.zeros_like(self.embed), {l: torch.zeros_like(n) for l, n in self.neurons.items()})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edges_equal_an_independent_forward(family):
    handle = tiny_handle(family)
    graph = attribution_graph(handle, PROMPT, max_nodes=12, batch_size=5)
    brute = Brute(handle, graph, family)
    rows = graph.target_rows()
    scale = np.abs(graph.adjacency[rows]).max()
    sources = list(range(graph.n_features)) + [graph.other_index(l, p) for l in range(graph.n_layers)
                                               for p in (3, graph.n_pos - 1)]
    sources += list(range(graph.embed_slice.start, graph.embed_slice.stop))
    for source in sources:
        np.testing.assert_allclose(graph.adjacency[rows, source], brute.edge_column(source)[rows], atol=2e-5 * scale,
                                   err_msg=graph.node_label(source))
    np.testing.assert_allclose(graph.adjacency[rows, graph.bias_index], brute.biases()[rows], atol=2e-5 * scale)
    np.testing.assert_allclose(graph.node_values[rows], brute.values(brute.embed, brute.neurons)[rows],
                               atol=2e-5 * np.abs(graph.node_values[rows]).max())


def test_graph_is_acyclic_and_respects_layers(tiny_llama):
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=30)
    for row in graph.target_rows():
        if graph.node_kind(row) == "logit":
            continue
        layer, pos = graph.node_position(row)
        for s in np.flatnonzero(graph.adjacency[row]):
            if graph.node_kind(s) in ("neuron", "other"):
                s_layer, s_pos = graph.node_position(s)
                assert s_layer < layer and s_pos <= pos


# ---------------------------------------------------------------- selection


def circuit_tracer_selection(full, n_logits: int, k: int, batch: int, update_interval: int = 4) -> list[int]:
    """circuit-tracer's attribute() loop, ported literally onto a full adjacency over every
    candidate: rows are revealed in visit order; each influence update
    (compute_partial_influences) queues the update_interval · batch unvisited candidates
    with the largest influence."""
    n = full.n_features
    error_cols = list(range(full.error_slice.start, full.embed_slice.stop))
    logit_rows = list(range(full.logit_slice.start, full.n_nodes))
    columns = list(range(n)) + error_cols + logit_rows  # features, errors, tokens, logits
    visited, order = np.zeros(n, dtype=bool), []
    rows = list(logit_rows)
    row_to_node = [n + len(error_cols) + t for t in range(n_logits)]
    logit_p = np.asarray(full.logit_weights)
    while len(order) < k:
        edge = full.adjacency[np.ix_(rows, columns)].astype(np.float64)
        normalized = np.abs(edge) / np.maximum(np.abs(edge).sum(axis=1, keepdims=True), 1e-8)
        prod = np.zeros(len(columns))
        prod[-n_logits:] = logit_p
        influence = np.zeros(len(columns))
        for _ in range(128):
            prod = prod[row_to_node] @ normalized
            if not prod.any():
                break
            influence += prod
        ranked = np.argsort(-influence[:n], kind="stable")
        pending = ranked[~visited[ranked]][:min(update_interval * batch, k - len(order))]
        visited[pending] = True
        order += pending.tolist()
        rows += pending.tolist()
        row_to_node += pending.tolist()
    return order


def test_neurons_are_selected_as_circuit_tracer_selects_features(tiny_llama):
    """Tiny models have fewer neurons per (layer, position) than CANDIDATES, so every neuron
    is a candidate: the selection must equal circuit-tracer's loop run on the full graph."""
    full = attribution_graph(tiny_llama, PROMPT, max_nodes=5000, batch_size=64, other_inputs=False)
    assert full.n_features == tiny_llama.adapter.n_layers * full.n_pos * tiny_llama.adapter.d_mlp
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=40, batch_size=3, other_inputs=False)
    expected = circuit_tracer_selection(full, len(full.logit_targets), 40, 3)  # 4 updates of 12 (or fewer)
    assert sorted(map(tuple, graph.features)) == sorted(tuple(full.features[i]) for i in expected)


def test_a_promoted_neuron_becomes_a_node(tiny_llama):
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=10)
    member = graph.other_members["2,5"][0]
    assert [2, 5, member["unit"]] not in graph.features
    promoted = attribution_graph(tiny_llama, PROMPT, max_nodes=10, include=[(2, 5, member["unit"])])
    assert [2, 5, member["unit"]] in promoted.features and promoted.n_features == 11
    assert relative_conservation_error(promoted) < 1e-4
    with pytest.raises(UserInputError):
        attribution_graph(tiny_llama, PROMPT, max_nodes=10, include=[(99, 0, 0)])


def test_other_members_are_the_unlisted_neurons_by_influence(tiny_llama):
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=10)
    listed = {tuple(f) for f in graph.features}
    for site, members in graph.other_members.items():
        layer, pos = map(int, site.split(","))
        assert all((layer, pos, m["unit"]) not in listed for m in members)
        assert [m["influence"] for m in members] == sorted((m["influence"] for m in members), reverse=True)


# ---------------------------------------------------------------- the sink


def test_the_sink_position_has_no_neuron_nodes_and_its_other_nodes_no_inputs(tiny_llama):
    prompt = "<eos>" + PROMPT  # the tiny tokenizer's special token in front, as a BOS
    ids = encode_prompt(tiny_llama, prompt)
    assert ids[0] == tiny_llama.tokenizer.convert_tokens_to_ids("<eos>")
    graph = attribution_graph(tiny_llama, prompt, max_nodes=40)
    assert graph.sink == 0 and all(pos != 0 for _, pos, _ in graph.features)
    assert not graph.adjacency[[graph.other_index(l, 0) for l in range(graph.n_layers)]].any()
    assert relative_conservation_error(graph) < 1e-4
    with torch.no_grad():
        logits = tiny_llama.model(torch.tensor([ids])).logits[0, -1]
    top = graph.logit_targets[0]
    assert top["id"] == int(logits.argmax())  # the graph explains the model's prediction on what it reads


def test_embedding_contributions_sum_to_the_weighted_targets(tiny):
    """Euler in the full linearized model (MLPs live): Σ contributions + the value at zero
    embeddings = the weighted targets."""
    graph = attribution_graph(tiny, PROMPT, max_nodes=5)
    weighted = float(np.dot(graph.logit_weights, graph.node_values[graph.logit_slice]))
    frozen = record_frozen(tiny, torch.tensor([graph.token_ids]))
    at_zero = linear_forward(
        tiny, frozen, direct=False, leaves=Leaves(torch.zeros(1, graph.n_pos, tiny.adapter.d_model))
    )
    logits = at_zero.logits[0].detach()
    bias = sum(w * float(logits[t["id"]] - logits.mean()) for w, t in zip(graph.logit_weights, graph.logit_targets))
    assert sum(graph.embed_contributions) + bias == pytest.approx(weighted, rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------- pruning and scores


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


def circuit_tracer_scores(graph) -> tuple[float, float]:
    """circuit-tracer's compute_graph_scores, ported (bias counted with the tokens)."""
    logit_weights = np.zeros(graph.n_nodes)
    logit_weights[graph.logit_slice] = graph.logit_weights
    absolute = np.abs(graph.adjacency.astype(np.float64))
    normalized = absolute / np.clip(absolute.sum(axis=1, keepdims=True), 1e-10, None)
    influence = logit_weights @ (np.linalg.inv(np.eye(graph.n_nodes) - normalized) - np.eye(graph.n_nodes))
    tokens = influence[graph.embed_slice].sum() + influence[graph.bias_index]
    errors = influence[graph.error_slice].sum()
    non_error = 1 - normalized[:, graph.error_slice].sum(axis=1)
    output = influence + logit_weights
    return tokens / (tokens + errors), (non_error * output).sum() / output.sum()


def test_scores_equal_circuit_tracers_with_error_semantics(tiny_llama):
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=20, other_inputs=False)
    replacement, completeness = circuit_tracer_scores(graph)
    scores = graph_scores(graph)
    assert scores["replacement"] == pytest.approx(replacement, rel=1e-9)
    assert scores["completeness"] == pytest.approx(completeness, rel=1e-9)


def test_replacement_with_exact_other_nodes_counts_paths_that_avoid_them(tiny_llama):
    """Computed by matrix inverses: the influence reaching the inputs with every "other"
    column removed, over the influence reaching the inputs (no "other" node is a dead end
    here: no sink). Rising with K, below 1 while neurons stay unlisted."""
    scores = []
    for k in (2, 20, 200):
        graph = attribution_graph(tiny_llama, PROMPT, max_nodes=k)
        normalized = normalize_rows(graph.adjacency.astype(np.float64))
        weights = np.zeros(graph.n_nodes)
        weights[graph.logit_slice] = graph.logit_weights
        eye = np.eye(graph.n_nodes)
        avoiding = normalized.copy()
        avoiding[:, graph.error_slice] = 0
        inputs = slice(graph.embed_slice.start, graph.bias_index + 1)
        through_all = (weights @ (np.linalg.inv(eye - normalized) - eye))[inputs].sum()
        avoiding_others = (weights @ (np.linalg.inv(eye - avoiding) - eye))[inputs].sum()
        score = graph_scores(graph)["replacement"]
        assert score == pytest.approx(avoiding_others / through_all, rel=1e-9)
        scores.append(score)
    assert scores[0] < scores[1] < scores[2] < 1


# ---------------------------------------------------------------- JSON, node ids, grouping


def test_every_neuron_kept_round_trips_through_the_json(tiny_llama):
    """Neuron ids {layer}_{index}_{pos} and "other" ids {layer}_-1_{pos} never collide (the
    legacy 0_{layer}_{pos} did, with neuron {layer} of layer 0)."""
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=5000)
    ids = node_ids(graph)
    assert len(set(ids)) == len(ids) and "0_1_1" in ids and "1_-1_1" in ids
    view = view_from_graph(graph, 1.0, 1.0)
    again = parse_graph_json(json.dumps(to_graph_json(view)))
    assert [n.node_id for n in again.nodes] == [n.node_id for n in view.nodes]
    assert to_graph_json(again) == to_graph_json(view)


def test_legacy_error_ids_are_read(tiny_llama):
    view = view_from_graph(attribution_graph(tiny_llama, PROMPT, max_nodes=20), 1.0, 1.0)
    other = next(n for n in view.nodes if n.kind == "other")
    assert view.canonical_id(f"0_{other.layer}_{other.ctx_idx}") == other.node_id
    neuron = next(n for n in view.nodes if n.kind == "neuron")
    assert view.canonical_id(neuron.node_id) == neuron.node_id


def test_graph_json_schema(tiny_llama):
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=20)
    view = view_from_graph(graph, 0.8, 0.98)
    first = view.nodes[0].node_id
    exported = to_graph_json(view, pinned=[first], supernodes=[["group", first]])
    assert set(exported) == {"metadata", "qParams", "nodes", "links"}
    node_keys = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
                 "jsNodeId", "clerp", "influence", "activation"}
    assert all(node_keys <= set(n) for n in exported["nodes"])
    assert all(set(l) == {"source", "target", "weight"} for l in exported["links"])
    assert {"replacement", "completeness"} <= set(exported["metadata"]["scores"])
    assert "total_s" in exported["metadata"]["timings"] and exported["metadata"]["settings"]["max_nodes"] == 20
    assert not any(n["feature_type"] == "bias" for n in exported["nodes"])  # Llama: no bias node


def test_supernodes_collapse_into_one_node_with_summed_edges(tiny_llama):
    view = view_from_graph(attribution_graph(tiny_llama, PROMPT, max_nodes=30), 1.0, 1.0)
    neurons = [n.node_id for n in view.nodes if n.kind == "neuron"]
    members = neurons[:3]
    grouped = grouped_view(view, [["trio", *members]])
    gid = group_id("trio")
    assert grouped.node(gid).members == members and not any(grouped.node(m) for m in members)
    for other in {l["target"] for l in view.links if l["source"] in members} - set(members):
        expected = sum(l["weight"] for l in view.links if l["source"] in members and l["target"] == other)
        got = next(l["weight"] for l in grouped.links if l["source"] == gid and l["target"] == other)
        assert got == pytest.approx(expected, rel=1e-6)
    assert not any(l["source"] == gid and l["target"] == gid for l in grouped.links)
    exported = to_graph_json(grouped)
    assert parse_graph_json(json.dumps(exported)).node(gid).members == members


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("nodes"), "missing 'nodes'"),
        (lambda d: d["nodes"][1].pop("ctx_idx"), "nodes[1]: missing 'ctx_idx'"),
        (lambda d: d["nodes"][0].update(ctx_idx="3"), "nodes[0].ctx_idx: expected an integer"),
        (lambda d: d["nodes"][0].update(feature_type="magic"), "unknown type"),
        (lambda d: d["links"][0].update(target="nope"), "links[0].target: unknown node"),
        (lambda d: d["metadata"].pop("prompt_tokens"), "missing 'prompt_tokens'"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "appears twice"),
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
