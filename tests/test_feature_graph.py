"""Transcoder-feature graphs: every edge and bias equal to the local replacement model
written independently from the weights (tests/manual.py plus the transcoder formula),
conservation, circuit-tracer's error nodes with K = every active feature, the sink, forced
features and the JSON round trip (SmolLM2 and the CLI: test_transcoders_smollm2.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from backend.errors import UserInputError
from backend.graphs.features import feature_graph
from backend.graphs.graph import AttributionGraph
from backend.graphs.neuronpedia import parse_graph_json, to_graph_json, view_from_graph
from backend.graphs.prune import graph_scores
from backend.replacement.transcoders import load_transcoders
from tests.manual import ManualModel
from tests.test_graph import PROMPT, relative_conservation_error
from tests.test_transcoders import layer_tensors, write_set
from tests.tiny import tiny_handle

D_MODEL = 32  # tests/tiny.py


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


@pytest.fixture(scope="module")
def skip_set(tmp_path_factory):
    """A relu set with skip connections for the 3-layer tiny Llama, scaled like a trained
    set (writes the size of the MLP's; unscaled random weights grow the residual stream
    10^5-fold over three layers and the logits become float32 cancellation noise)."""
    layers = [layer_tensors(10 + i, d_model=D_MODEL, skip=True) for i in range(3)]
    for t in layers:
        t["W_dec"] *= 0.05
        t["W_skip"] *= 0.02
        t["b_dec"] *= 0.05
    folder = tmp_path_factory.mktemp("tc") / "skip"
    write_set(folder, layers)
    return folder, layers


class ReplacementBrute:
    """circuit-tracer's local replacement model, by hand: each MLP's output is
    Σ a_f W_dec[f] + b_dec + h W_skipᵀ + error (a and error fixed at their clean values),
    attention and norms frozen (ManualModel). Setting a source to zero and re-running gives
    its edge into every node; everything at zero gives the biases."""

    def __init__(self, handle, graph: AttributionGraph, layers: list[dict]) -> None:
        self.graph, self.layers = graph, layers
        self.model = ManualModel(handle.model, "llama")
        self.clean, out = self.model.clean(graph.token_ids)
        self.embed = self.model.embed(graph.token_ids).detach()
        inputs: dict[int, torch.Tensor] = {}

        def real_mlp(layer: int, h: torch.Tensor) -> torch.Tensor:
            inputs[layer] = h
            return self.model._down(layer, self.model._mlp(layer, h, self.clean, None))

        with torch.no_grad():
            clean_out = self.model.run(self.clean, self.embed, mlp_outputs=real_mlp)
            self.acts, self.errors = {}, {}
            for layer, t in enumerate(layers):
                a = torch.relu(inputs[layer] @ t["W_enc"].T + t["b_enc"])
                if graph.sink is not None:
                    a[graph.sink] = 0.0
                self.acts[layer] = a
            for layer in range(len(layers)):
                h = inputs[layer]
                real = self.model._down(layer, self.model._mlp(layer, h, self.clean, None))
                self.errors[layer] = real - self.reconstruction(layer, self.acts, h)
        vocab = clean_out.logits.shape[-1]
        self.matrix = torch.full((len(graph.logit_targets), vocab), -1.0 / vocab)
        for i, info in enumerate(graph.logit_targets):
            self.matrix[i, info["id"]] += 1.0
        self.selected = {(l, p, f) for l, p, f in graph.features}

    def values(self, embed, acts, errors, biases: bool = True) -> np.ndarray:
        graph, inputs = self.graph, {}

        def replaced(layer: int, h: torch.Tensor) -> torch.Tensor:
            inputs[layer] = h
            return self.reconstruction(layer, acts, h) + errors[layer]

        with torch.no_grad():
            out = self.model.run(self.clean, embed, mlp_outputs=replaced)
        values = np.zeros(graph.n_nodes)
        for i, (layer, pos, feature) in enumerate(graph.features):
            t = self.layers[layer]
            values[i] = inputs[layer][pos] @ t["W_enc"][feature] + t["b_enc"][feature]
        values[graph.logit_slice] = (self.matrix @ out.logits[-1]).numpy()
        return values

    def reconstruction(self, layer: int, acts: dict, h: torch.Tensor) -> torch.Tensor:
        """What the transcoders write to ``layer``'s MLP output: per-layer (W_dec [F, d], skip)
        or cross-layer (every earlier layer's W_dec [F, L - i, d], slot layer - i)."""
        t = self.layers[layer]
        if t["W_dec"].dim() == 2:
            return acts[layer] @ t["W_dec"] + t["b_dec"] + h @ t["W_skip"].T
        return t["b_dec"] + sum(acts[i] @ self.layers[i]["W_dec"][:, layer - i] for i in range(layer + 1))

    def error_values(self) -> np.ndarray:
        """Each error node's writes (its site's error, and the unlisted features read at its
        site, wherever they write) projected on the gradient of the weighted targets w.r.t.
        the MLP outputs they land on, through every path of the linearized real model
        (ManualModel with taps)."""
        graph = self.graph
        out = self.model.run(self.clean, self.embed.clone(), taps=True)
        objective = (torch.tensor(graph.logit_weights) * (self.matrix @ out.logits[-1])).sum()
        grads = torch.autograd.grad(objective, [out.taps[("mlp_out", l)] for l in range(graph.n_layers)])
        values = np.zeros((graph.n_layers, graph.n_pos))
        for layer, t in enumerate(self.layers):
            decoder = t["W_dec"] if t["W_dec"].dim() == 3 else t["W_dec"][:, None]  # [F, span, d]
            unlisted = self._unlisted(layer)
            value = (self.errors[layer] * grads[layer]).sum(-1)
            for slot in range(decoder.shape[1]):
                value = value + ((unlisted @ decoder[:, slot]) * grads[layer + slot]).sum(-1)
            values[layer] = value.detach().numpy()
        return values.flatten()

    def _unlisted(self, layer: int) -> torch.Tensor:
        acts = self.acts[layer].clone()
        for l, p, f in self.selected:
            if l == layer:
                acts[p, f] = 0.0
        return acts

    def clean_values(self) -> np.ndarray:
        return self.values(self.embed, self.acts, self.errors)

    def edge_column(self, source: int) -> np.ndarray:
        graph = self.graph
        embed = self.embed.clone()
        acts = {l: a.clone() for l, a in self.acts.items()}
        errors = {l: e.clone() for l, e in self.errors.items()}
        kind = graph.node_kind(source)
        layer, pos = graph.node_position(source)
        if kind == "embedding":
            embed[pos] = 0.0
        elif kind == "neuron":
            acts[layer][pos, graph.features[source][2]] = 0.0
        else:  # the error node: its site's error and the active features read there that are not nodes
            errors[layer][pos] = 0.0
            for feature in range(acts[layer].shape[1]):
                if (layer, pos, feature) not in self.selected:
                    acts[layer][pos, feature] = 0.0
        return self.clean_values() - self.values(embed, acts, errors)

    def biases(self) -> np.ndarray:
        return self.values(torch.zeros_like(self.embed), {l: torch.zeros_like(a) for l, a in self.acts.items()},
                           {l: torch.zeros_like(e) for l, e in self.errors.items()})


def assert_edges_and_errors_equal(graph: AttributionGraph, brute: ReplacementBrute,
                                  error_positions: tuple[int, ...]) -> None:
    """Every feature and embedding column, the error columns at ``error_positions`` and the
    bias of every row with inputs; every error node's value."""
    rows = graph.target_rows()
    scale = np.abs(graph.adjacency[rows]).max()
    sources = list(range(graph.n_features)) + list(range(graph.embed_slice.start, graph.embed_slice.stop))
    sources += [graph.other_index(l, p) for l in range(graph.n_layers) for p in error_positions]
    for source in sources:
        np.testing.assert_allclose(graph.adjacency[rows, source], brute.edge_column(source)[rows], atol=2e-5 * scale,
                                   err_msg=graph.node_label(source))
    np.testing.assert_allclose(graph.adjacency[rows, graph.bias_index], brute.biases()[rows], atol=2e-5 * scale)
    errors = brute.error_values()
    np.testing.assert_allclose(graph.node_values[graph.error_slice], errors, atol=1e-4 * np.abs(errors).max())


def test_feature_edges_and_biases_equal_the_replacement_model_by_hand(llama, skip_set):
    folder, layers = skip_set
    graph = feature_graph(llama, PROMPT, str(folder), max_nodes=12, batch_size=5)
    assert graph.basis == "transcoders" and graph.n_features == 12
    brute = ReplacementBrute(llama, graph, layers)
    rows = graph.target_rows()
    assert rows == list(range(12)) + list(range(graph.logit_slice.start, graph.n_nodes))  # errors: no inputs
    assert_edges_and_errors_equal(graph, brute, error_positions=(0, 4, graph.n_pos - 1))
    np.testing.assert_allclose(graph.node_values[rows], brute.clean_values()[rows],
                               atol=2e-5 * np.abs(graph.node_values[rows]).max())
    np.testing.assert_allclose(graph.activations, [float(brute.acts[l][p, f]) for l, p, f in graph.features],
                               rtol=1e-5)
    assert relative_conservation_error(graph) < 1e-4


def test_with_every_active_feature_the_error_nodes_are_circuit_tracers(llama, skip_set):
    """K = every active feature: each error column is the error alone (no unselected
    feature is folded in), and the node count is the active count."""
    folder, layers = skip_set
    graph = feature_graph(llama, PROMPT, str(folder), max_nodes=5000, batch_size=64)
    brute = ReplacementBrute(llama, graph, layers)
    active = sum(int((a != 0).sum()) for a in brute.acts.values())
    assert graph.n_features == active == graph.settings["candidates"]
    rows = graph.target_rows()
    for layer in range(graph.n_layers):
        errors = {l: e.clone() for l, e in brute.errors.items()}
        errors[layer][3] = 0.0
        column = brute.clean_values() - brute.values(brute.embed, brute.acts, errors)
        np.testing.assert_allclose(graph.adjacency[rows, graph.other_index(layer, 3)], column[rows],
                                   atol=2e-5 * np.abs(graph.adjacency[rows]).max())
    assert 0 < graph_scores(graph)["replacement"] < 1


def test_selection_order_and_forced_features(llama, skip_set):
    folder, _ = skip_set
    small = feature_graph(llama, PROMPT, str(folder), max_nodes=6, batch_size=3)
    large = feature_graph(llama, PROMPT, str(folder), max_nodes=12, batch_size=3)
    assert {tuple(f) for f in small.features} <= {tuple(f) for f in large.features}  # chosen by influence, greedily
    active = {tuple(f) for f in feature_graph(llama, PROMPT, str(folder), max_nodes=5000).features}
    outside = sorted(active - {tuple(f) for f in small.features})[0]
    forced = feature_graph(llama, PROMPT, str(folder), max_nodes=6, include=[outside], batch_size=3)
    assert list(outside) in forced.features and forced.n_features == 7
    assert relative_conservation_error(forced) < 1e-4
    inactive = next((0, p, f) for p in range(forced.n_pos) for f in range(12) if (0, p, f) not in active)
    with pytest.raises(UserInputError, match="not active"):
        feature_graph(llama, PROMPT, str(folder), max_nodes=6, include=[inactive])


def test_the_sink_holds_no_feature_and_its_error_node_takes_them(llama, skip_set):
    folder, layers = skip_set
    prompt = "<eos>" + PROMPT  # the tiny tokenizer's special token in front, as a BOS
    graph = feature_graph(llama, prompt, str(folder), max_nodes=5000)
    assert graph.sink == 0 and graph.features and all(pos != 0 for _, pos, _ in graph.features)
    brute = ReplacementBrute(llama, graph, layers)  # zeroes the sink's features into its errors
    rows = graph.target_rows()
    for layer in range(graph.n_layers):
        np.testing.assert_allclose(graph.adjacency[rows, graph.other_index(layer, 0)],
                                   brute.edge_column(graph.other_index(layer, 0))[rows],
                                   atol=2e-5 * np.abs(graph.adjacency[rows]).max())
    assert relative_conservation_error(graph) < 1e-4


def test_feature_graph_json_round_trip_keeps_the_basis(llama, skip_set):
    folder, _ = skip_set
    graph = feature_graph(llama, PROMPT, str(folder), max_nodes=8)
    again = AttributionGraph.from_json(graph.to_json())
    assert again.basis == "transcoders" and again.transcoders == str(folder)
    assert again.node_label(0).startswith(f"L{graph.features[0][0]} F")
    exported = to_graph_json(view_from_graph(graph, 0.8, 0.98))
    assert exported["metadata"]["basis"] == "transcoders"
    assert exported["metadata"]["transcoders"] == str(folder)
    view = parse_graph_json(json.dumps(exported))
    assert view.metadata["basis"] == "transcoders"


def test_ln2_hook_normalized_reads_the_rms_norm_before_its_gain(llama, skip_set, tmp_path):
    """TransformerLens's ln2.hook_normalized precedes an RMSNorm's weight w: a set reading
    there equals a set on mlp.hook_in whose W_enc and W_skip columns are divided by w (the
    tiny model's norm weights are random, so reading the wrong tensor changes the graph)."""
    folder, layers = skip_set
    gains = [llama.adapter.layers[l].mlp_norm.weight.detach() for l in range(3)]
    assert not torch.allclose(gains[0], torch.ones_like(gains[0]))
    write_set(tmp_path / "normalized", layers, feature_input_hook="ln2.hook_normalized")
    folded = [{**t, "W_enc": t["W_enc"] / g, "W_skip": t["W_skip"] / g} for t, g in zip(layers, gains)]
    write_set(tmp_path / "folded", folded)
    a = feature_graph(llama, PROMPT, str(tmp_path / "normalized"), max_nodes=10)
    b = feature_graph(llama, PROMPT, str(tmp_path / "folded"), max_nodes=10)
    assert a.features == b.features
    np.testing.assert_allclose(a.adjacency, b.adjacency, atol=1e-4 * np.abs(b.adjacency).max())


# ---------------------------------------------------------------- cross-layer transcoders


def clt_layers(seed: int, n_layers: int = 3, width: int = 12) -> list[dict]:
    """A random cross-layer set for the tiny Llama: layer i's W_dec [F, L - i, d]."""
    g = torch.Generator().manual_seed(seed)
    return [{"W_enc": torch.randn(width, D_MODEL, generator=g), "b_enc": torch.randn(width, generator=g),
             "W_dec": 0.05 * torch.randn(width, n_layers - i, D_MODEL, generator=g),
             "b_dec": 0.05 * torch.randn(D_MODEL, generator=g)} for i in range(n_layers)]


def write_clt(folder, layers: list[dict], **config) -> None:
    """circuit-tracer's CrossLayerTranscoder.to_safetensors layout, and its config."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(layers):
        save_file({f"W_enc_{i}": t["W_enc"], f"b_enc_{i}": t["b_enc"], f"b_dec_{i}": t["b_dec"]},
                  str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": t["W_dec"]}, str(folder / f"W_dec_{i}.safetensors"))
    spec = {"model_kind": "cross_layer_transcoder", "scan": "test", "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "mlp.hook_out", **config}
    (folder / "config.yaml").write_text(yaml.safe_dump(spec))


def test_cross_layer_edges_equal_the_replacement_model_by_hand(llama, tmp_path):
    """A feature of layer i writes to every later MLP output: its edges sum over those
    writes, and an error node holds what the unlisted features write there."""
    layers = clt_layers(30)
    write_clt(tmp_path / "clt", layers)
    graph = feature_graph(llama, PROMPT, str(tmp_path / "clt"), max_nodes=10, batch_size=4)
    brute = ReplacementBrute(llama, graph, layers)
    assert_edges_and_errors_equal(graph, brute, error_positions=(0, 5, graph.n_pos - 1))
    assert relative_conservation_error(graph) < 1e-4
    assert any(f[0] < 2 for f in graph.features)  # early features, whose writes span several layers, are listed


def test_cross_layer_sets_refused_with_one_message_each(llama, tmp_path):
    layers = clt_layers(31)
    write_clt(tmp_path / "ok", layers)
    assert load_transcoders(tmp_path / "ok", llama).cross_layer is not None
    bad = [dict(t) for t in layers]
    bad[1] = {**bad[1], "W_dec": bad[1]["W_dec"][:, :1].contiguous()}
    write_clt(tmp_path / "slots", bad)
    with pytest.raises(UserInputError, match=r"W_dec_1 has shape \(12, 1, 32\), expected \(12, 2, 32\)"):
        load_transcoders(tmp_path / "slots", llama)
    write_clt(tmp_path / "missing", layers)
    (tmp_path / "missing" / "W_dec_2.safetensors").unlink()
    with pytest.raises(UserInputError, match="W_dec_2.safetensors is missing"):
        load_transcoders(tmp_path / "missing", llama)
    write_clt(tmp_path / "cut", layers)
    data = (tmp_path / "cut" / "W_dec_0.safetensors").read_bytes()
    (tmp_path / "cut" / "W_dec_0.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="truncated"):
        load_transcoders(tmp_path / "cut", llama)
    write_clt(tmp_path / "two", clt_layers(32, n_layers=2))
    with pytest.raises(UserInputError, match="has 2 layers"):
        load_transcoders(tmp_path / "two", llama)
