"""The attribution graph as data: nodes, their layout in the adjacency matrix, their labels.

Nodes, in this order (rows = targets, columns = sources of ``adjacency``):
  [K neurons] [L×P "other neurons"] [P token embeddings] [1 bias] [T logit targets]
- a neuron node is one MLP neuron (layer, position, index): the down projection's input;
- an "other neurons" node (layer, position) carries every neuron of that MLP not among the
  K. What they write, r (their down-projection output), is a vector; the node's value is
  its projection v·r on the gradient v of the weighted logit targets w.r.t. that write,
  through every later path of the linearized model: the unlisted neurons' total effect on
  the targets, in logit units. Its outgoing edges are exact direct effects (g_t·r). With
  ``other_inputs`` it has incoming edges like a neuron (v·r is an exact linear function of
  upstream nodes under the linearization), so each source's edge is its effect on the
  targets through this node; without, it is circuit-tracer's error node (no inputs). The
  sink position's "other" nodes never have inputs (circuit-tracer zeroes BOS features);
- with transcoders (basis "transcoders", see features.py) the unit nodes are active
  transcoder features and a (layer, position)'s "other" node is its error node: the MLP's
  output minus the transcoder's reconstruction, plus the active features not among the K;
  it never has inputs;
- the bias node carries each node's constant term (zero for bias-free models such as Llama);
- logit targets: the top logits up to 95% probability (at most 10), or one chosen token, or
  the difference of two tokens' logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from backend.runtime.results import JsonResult


@dataclass
class AttributionGraph(JsonResult):
    model: str
    prompt: str
    tokens: list[str]
    token_ids: list[int]
    n_layers: int
    features: list[list[int]]  # K rows of [layer, position, neuron]
    activations: list[float]  # K neuron values
    logit_targets: list[dict]  # T rows of {token, id, prob, wrong_id?}
    logit_weights: list[float]  # T weights for influence (probabilities, or 1 for a difference)
    adjacency: np.ndarray  # [N, N], rows = targets, columns = sources
    node_values: np.ndarray  # [N] value of every node (embeddings: their vector's norm)
    other_inputs: bool = True  # "other neurons" nodes have incoming edges (else circuit-tracer's error nodes)
    sink: int | None = None  # position left out of neuron nodes (a BOS / document-start token), if any
    embed_contributions: list[float] = field(
        default_factory=list
    )  # exact signed share of the weighted targets per token
    other_members: dict = field(
        default_factory=dict
    )  # "layer,pos" -> top members [{neuron, activation, influence, logit_effect}]
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    basis: str = "neurons"  # "neurons" | "transcoders" (unit nodes are transcoder features)
    transcoders: str = ""  # the transcoder set's folder, with basis "transcoders"

    @property
    def unit_letter(self) -> str:
        return "F" if self.basis == "transcoders" else "N"

    @property
    def rest_name(self) -> str:
        """What a (layer, position)'s node beside the unit nodes holds."""
        return "error" if self.basis == "transcoders" else "other"

    # ------------------------------------------------------------ node layout
    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_layers * self.n_pos)

    @property
    def embed_slice(self) -> slice:
        start = self.error_slice.stop
        return slice(start, start + self.n_pos)

    @property
    def bias_index(self) -> int:
        return self.embed_slice.stop

    @property
    def logit_slice(self) -> slice:
        return slice(self.bias_index + 1, self.bias_index + 1 + len(self.logit_targets))

    @property
    def n_nodes(self) -> int:
        return self.logit_slice.stop

    def other_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def target_rows(self) -> list[int]:
        """The nodes with incoming edges (rows of the adjacency that are filled)."""
        rows = list(range(self.n_features))
        if self.other_inputs:
            rows += [self.other_index(l, p) for l in range(self.n_layers) for p in range(self.n_pos) if p != self.sink]
        return rows + list(range(self.logit_slice.start, self.n_nodes))

    def node_kind(self, index: int) -> str:
        if index < self.n_features:
            return "neuron"
        if index < self.error_slice.stop:
            return "other"
        if index < self.embed_slice.stop:
            return "embedding"
        if index == self.bias_index:
            return "bias"
        return "logit"

    def node_position(self, index: int) -> tuple[int, int]:
        """(layer, position) of a node; embeddings/bias are layer -1, logits layer n_layers."""
        kind = self.node_kind(index)
        if kind == "neuron":
            layer, pos, _ = self.features[index]
            return layer, pos
        if kind == "other":
            return divmod(index - self.n_features, self.n_pos)
        if kind == "embedding":
            return -1, index - self.embed_slice.start
        if kind == "bias":
            return -1, 0
        return self.n_layers, self.n_pos - 1

    def node_label(self, index: int) -> str:
        kind = self.node_kind(index)
        layer, pos = self.node_position(index)
        if kind == "neuron":
            return f"L{layer} {self.unit_letter}{self.features[index][2]} @{pos}"
        if kind == "other":
            return f"L{layer} {self.rest_name} @{pos}"
        if kind == "embedding":
            return f"emb {self.tokens[pos]!r} @{pos}"
        if kind == "bias":
            return "bias"
        return f"logit {self.logit_targets[index - self.logit_slice.start]['token']!r}"

    def context_influence(self, influence: np.ndarray) -> dict[int, float]:
        """Influence of each context token's embedding: every position except the last
        (the prediction's own token) and the sink."""
        start = self.embed_slice.start
        return {p: float(influence[start + p]) for p in range(self.n_pos - 1) if p != self.sink}
