"""Graph JSON in the circuit-tracer / Neuronpedia schema, and the view the graph page draws.

A ``GraphView`` is a pruned graph as typed nodes and plain links. Ours come from
``view_from_graph`` (with scores, timings and settings under ``metadata``); theirs come from
``parse_graph_json``, which validates the file and names the first error it finds. Export is
``to_graph_json``. Nothing from a file is executed or unpickled: it is only JSON.

Node ids follow circuit-tracer's current scheme: a neuron (or transcoder feature)
``{layer}_{index}_{pos}``, an "other neurons" / error node ``{layer}_-1_{pos}`` (their PR
#102; the legacy ``0_{layer}_{pos}`` collided with neuron ``{layer}`` of layer 0 and is still
read), an embedding ``E_{token id}_{pos}``, a logit ``{n_layers + 1}_{token id}_{pos}``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from backend.errors import UserInputError
from backend.graphs.graph import AttributionGraph
from backend.graphs.prune import graph_scores, prune
from backend.runtime.results import JsonResult

MAX_IMPORT_BYTES = 50 * 1024 * 1024
MAX_NODES = 100_000
MAX_LINKS = 2_000_000
FEATURE_TYPES = {  # Neuronpedia's feature_type -> our node kind
    "cross layer transcoder": "neuron",
    "mlp neuron": "neuron",
    "transcoder": "neuron",
    "mlp reconstruction error": "other",
    "embedding": "embedding",
    "logit": "logit",
    "bias": "bias",
    "supernode": "supernode",
}
KIND_TO_TYPE = {
    "neuron": "cross layer transcoder",
    "other": "mlp reconstruction error",
    "embedding": "embedding",
    "logit": "logit",
    "bias": "bias",
    "supernode": "supernode",
}
LEGACY_ERROR_ID = re.compile(r"^0_(\d+)_(\d+)$")


@dataclass
class GraphNode(JsonResult):
    """One drawn node. ``layer``: -1 for embeddings, n_layers for logits; ``feature``: the
    neuron / feature index (the token id for embeddings and logits, -1 for other nodes)."""

    node_id: str
    kind: str  # neuron | other | embedding | bias | logit | supernode
    layer: int
    ctx_idx: int
    feature: int
    label: str
    activation: float | None = None
    influence: float | None = None  # cumulative influence (circuit-tracer's node score)
    token_prob: float = 0.0
    is_target_logit: bool = False
    contribution: float | None = None  # embeddings: exact signed contribution to the weighted targets
    members: list[str] = field(default_factory=list)  # supernodes: their members' ids


@dataclass
class GraphView(JsonResult):
    metadata: dict
    nodes: list[GraphNode]
    links: list[dict]  # {source, target, weight}
    qparams: dict = field(default_factory=dict)

    @property
    def tokens(self) -> list[str]:
        return list(self.metadata.get("prompt_tokens", []))

    def node(self, node_id: str) -> GraphNode | None:
        return next((n for n in self.nodes if n.node_id == node_id), None)

    def canonical_id(self, node_id: str) -> str:
        """``node_id`` as this view names it: a legacy error id ``0_{layer}_{pos}`` that is not
        a node here becomes ``{layer}_-1_{pos}``."""
        if self.node(node_id) is not None:
            return node_id
        match = LEGACY_ERROR_ID.match(node_id)
        if match and self.node(f"{match[1]}_-1_{match[2]}") is not None:
            return f"{match[1]}_-1_{match[2]}"
        return node_id


# ---------------------------------------------------------------- ours -> view


def node_id(graph: AttributionGraph, index: int) -> str:
    kind = graph.node_kind(index)
    layer, pos = graph.node_position(index)
    if kind == "neuron":
        return f"{layer}_{graph.features[index][2]}_{pos}"
    if kind == "other":
        return f"{layer}_-1_{pos}"
    if kind == "embedding":
        return f"E_{graph.token_ids[pos]}_{pos}"
    if kind == "bias":
        return "B_0_0"
    target = graph.logit_targets[index - graph.logit_slice.start]
    return f"{graph.n_layers + 1}_{target['id']}_{pos}"


def node_ids(graph: AttributionGraph) -> list[str]:
    """The Neuronpedia node_id of every node of ``graph``, in adjacency order."""
    return [node_id(graph, i) for i in range(graph.n_nodes)]


def _view_node(graph: AttributionGraph, index: int, influence: float) -> GraphNode:
    kind = graph.node_kind(index)
    layer, pos = graph.node_position(index)
    node = GraphNode(node_id=node_id(graph, index), kind=kind, layer=layer, ctx_idx=pos,
                     feature={"neuron": lambda: graph.features[index][2], "other": lambda: -1,
                              "embedding": lambda: graph.token_ids[pos], "bias": lambda: 0,
                              "logit": lambda: 0}[kind](),
                     label=graph.node_label(index), influence=float(influence),
                     activation=float(graph.node_values[index]) if kind in ("neuron", "other") else None)
    if kind == "embedding" and graph.embed_contributions:
        node.contribution = graph.embed_contributions[pos]
    if kind == "logit":
        t = index - graph.logit_slice.start
        target = graph.logit_targets[t]
        node.feature, node.token_prob, node.is_target_logit = target["id"], float(target["prob"]), t == 0
        node.label = f'Output "{target["token"]}" (p={target["prob"]:.3f})'
    return node


def _feature_kind(graph: AttributionGraph) -> str:
    if graph.basis == "transcoders":
        return (f"transcoder feature ({graph.transcoders}); error nodes = MLP output minus reconstruction, plus the "
                "unlisted active features (no inputs, as circuit-tracer)")
    return ("MLP neuron (down-projection input); error nodes = other neurons"
            + (" with exact inputs" if graph.other_inputs else " (no inputs, as circuit-tracer)"))


def view_from_graph(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                    max_links: int | None = None) -> GraphView:
    """Prune (no model call) and lay out as a view; ``max_links`` keeps the strongest links."""
    pruned = prune(graph, node_threshold, edge_threshold)
    kept = [int(i) for i in np.flatnonzero(pruned.node_mask)]
    if not graph.adjacency[:, graph.bias_index].any():
        kept = [i for i in kept if i != graph.bias_index]  # a bias-free model (Llama): no bias node to draw
    nodes = [_view_node(graph, i, pruned.cumulative[i]) for i in kept]
    ids = {i: n.node_id for i, n in zip(kept, nodes)}
    targets, sources = np.nonzero(pruned.edge_mask)
    weights = graph.adjacency[targets, sources]
    order = np.argsort(-np.abs(weights), kind="stable")
    if max_links is not None:
        order = order[:max_links]
    links = [{"source": ids[int(sources[i])], "target": ids[int(targets[i])], "weight": float(weights[i])}
             for i in order if int(sources[i]) in ids and int(targets[i]) in ids]
    linked = {l["source"] for l in links} | {l["target"] for l in links}
    nodes = [n for n in nodes if n.node_id in linked or n.kind in ("embedding", "logit")]
    metadata = {
        "slug": "circuitscope",
        "scan": graph.model,
        "prompt": graph.prompt,
        "prompt_tokens": graph.tokens,
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "n_layers": graph.n_layers,
        "feature_kind": _feature_kind(graph),
        "basis": graph.basis,
        "transcoders": graph.transcoders,
        "sink": graph.sink,
        "scores": graph_scores(graph),
        "timings": dict(graph.timings),
        "settings": {**graph.settings, "node_threshold": node_threshold, "edge_threshold": edge_threshold},
        "other_members": graph.other_members,
    }
    return GraphView(metadata=metadata, nodes=nodes, links=links)


# ---------------------------------------------------------------- view <-> Neuronpedia JSON


def to_graph_json(view: GraphView, pinned: list[str] | None = None, supernodes: list[list[str]] | None = None,
                  clicked: str = "", clerps: dict[str, str] | None = None) -> dict:
    """The circuit-tracer / Neuronpedia graph JSON of a view (our extras under metadata);
    ``clerps`` replaces node labels (unit labels, the user's node labels) by node id."""
    clerps = clerps or {}
    n_layers = int(view.metadata.get("n_layers", 0))
    nodes = []
    for n in view.nodes:
        layer = "E" if n.kind == "embedding" else str(n.layer + 1 if n.kind == "logit" else n.layer)
        record = {
            "node_id": n.node_id,
            "feature": n.feature,
            "layer": layer,
            "ctx_idx": n.ctx_idx,
            "feature_type": KIND_TO_TYPE[n.kind],
            "token_prob": n.token_prob,
            "is_target_logit": n.is_target_logit,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": _js_node_id(n, layer),
            "clerp": clerps.get(n.node_id, n.label),
            "influence": n.influence,
            "activation": n.activation,
        }
        if n.contribution is not None:
            record["contribution"] = n.contribution
        if n.members:
            record["members"] = list(n.members)
        nodes.append(record)
    return {
        "metadata": {**view.metadata, "n_layers": n_layers},
        "qParams": {
            "pinnedIds": list(pinned or view.qparams.get("pinnedIds", [])),
            "supernodes": [list(s) for s in (supernodes or view.qparams.get("supernodes", []))],
            "linkType": "both",
            "clickedId": clicked or view.qparams.get("clickedId", ""),
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": [dict(l) for l in view.links],
    }


def _js_node_id(node: GraphNode, layer: str) -> str:
    """Neuronpedia's jsNodeId: the same feature at several positions shares one id."""
    kind, pos = node.kind, node.ctx_idx
    if kind == "embedding":
        return f"E_{node.feature}-{pos}"
    if kind == "logit":
        return f"L_{node.feature}-{pos}"
    if kind == "other":
        return f"{layer}_-1_{pos}-0"
    if kind == "bias":
        return "B-0"
    if kind == "supernode":
        return node.node_id
    return f"{layer}_{node.feature}-0"


def _fail(where: str, problem: str) -> None:
    raise UserInputError(f"Invalid graph JSON: {where}: {problem}.")


def _require(obj: dict, key: str, kind, where: str):
    if key not in obj:
        _fail(where, f"missing '{key}'")
    value = obj[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        _fail(f"{where}.{key}", "expected an integer")
    if kind is not int and not isinstance(value, kind):
        _fail(f"{where}.{key}", f"expected {getattr(kind, '__name__', kind)}")
    return value


def parse_graph_json(raw: bytes | str) -> GraphView:
    """Validate a circuit-tracer / Neuronpedia graph JSON and turn it into a view."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_IMPORT_BYTES:
        raise UserInputError(f"The graph file is {size / 1e6:.1f} MB; the limit is {MAX_IMPORT_BYTES / 1e6:.0f} MB.")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserInputError(f"Invalid graph JSON: not JSON ({exc}).") from exc
    if not isinstance(data, dict):
        _fail("top level", "expected an object with metadata, nodes and links")
    metadata = _require(data, "metadata", dict, "top level")
    tokens = _require(metadata, "prompt_tokens", list, "metadata")
    if not all(isinstance(t, str) for t in tokens):
        _fail("metadata.prompt_tokens", "expected a list of strings")
    raw_nodes = _require(data, "nodes", list, "top level")
    raw_links = _require(data, "links", list, "top level")
    if len(raw_nodes) > MAX_NODES or len(raw_links) > MAX_LINKS:
        _fail("top level", f"too many nodes or links (limits {MAX_NODES} and {MAX_LINKS})")
    nodes = [_parse_node(n, i) for i, n in enumerate(raw_nodes)]
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        _fail("nodes", f"node_id {duplicate!r} appears twice")
    known = set(ids)
    links = [_parse_link(l, i, known) for i, l in enumerate(raw_links)]
    qparams = data.get("qParams") if isinstance(data.get("qParams"), dict) else {}
    return GraphView(metadata=metadata, nodes=nodes, links=links, qparams=qparams)


def _parse_node(raw, index: int) -> GraphNode:
    where = f"nodes[{index}]"
    if not isinstance(raw, dict):
        _fail(where, "expected an object")
    node_id = _require(raw, "node_id", str, where)
    layer_text = _require(raw, "layer", (str, int), where)
    ctx_idx = _require(raw, "ctx_idx", int, where)
    feature_type = _require(raw, "feature_type", str, where)
    if feature_type not in FEATURE_TYPES:
        _fail(f"{where}.feature_type", f"unknown type {feature_type!r}")
    kind = FEATURE_TYPES[feature_type]
    if layer_text == "E":
        layer = -1
    else:
        try:
            layer = int(layer_text)
        except ValueError:
            _fail(f"{where}.layer", f"expected a number or 'E', got {layer_text!r}")
    if kind == "logit":
        layer -= 1  # Neuronpedia puts logits at n_layers + 1
    feature = raw.get("feature", 0)
    if kind == "neuron":
        parts = node_id.split("_")  # "{layer}_{index}_{pos}": the index, also when feature is a global id
        feature = int(parts[1]) if len(parts) == 3 and parts[1].lstrip("-").isdigit() else feature
    members = raw.get("members") if isinstance(raw.get("members"), list) else []
    return GraphNode(
        node_id=node_id, kind=kind, layer=layer, ctx_idx=ctx_idx,
        feature=int(feature) if isinstance(feature, (int, float)) and not isinstance(feature, bool) else 0,
        label=str(raw.get("clerp") or node_id),
        activation=_number_or_none(raw.get("activation")),
        influence=_number_or_none(raw.get("influence")),
        token_prob=_number_or_none(raw.get("token_prob")) or 0.0,
        is_target_logit=bool(raw.get("is_target_logit", False)),
        contribution=_number_or_none(raw.get("contribution")),
        members=[str(m) for m in members],
    )


def _parse_link(raw, index: int, known: set[str]) -> dict:
    where = f"links[{index}]"
    if not isinstance(raw, dict):
        _fail(where, "expected an object")
    source = _require(raw, "source", str, where)
    target = _require(raw, "target", str, where)
    weight = _require(raw, "weight", (int, float), where)
    for end, value in (("source", source), ("target", target)):
        if value not in known:
            _fail(f"{where}.{end}", f"unknown node {value!r}")
    if isinstance(weight, bool) or not math.isfinite(weight):
        _fail(f"{where}.weight", "expected a finite number")
    return {"source": source, "target": target, "weight": float(weight)}


def _number_or_none(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
