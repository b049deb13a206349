"""Pruning and scores of an attribution graph, as circuit-tracer defines them.

No model call: everything here works on the adjacency matrix, so re-pruning with other
thresholds is a few matrix-vector products.

- influence: the geometric series Σ_k w·Â^k of the row-normalized |adjacency| Â, started
  from the logit weights w (exact: the graph is a DAG, so Â is nilpotent);
- node pruning keeps the most influential nodes reaching ``node_threshold`` of the total
  (embeddings, bias and logits are always kept); edge pruning keeps the edges reaching
  ``edge_threshold`` of the total edge influence; nodes left without outgoing edges (or, for
  neurons, incoming ones) are then dropped until nothing changes;
- replacement score: of the influence that reaches an endpoint (an input: a token
  embedding or the bias; or an "other neurons" node without inputs), the share that reaches
  an input along a path through no "other neurons" node. With circuit-tracer's error
  semantics ("other" nodes have no inputs) this is exactly its inputs / (inputs + errors);
  with exact "other" nodes, which pass influence on to the inputs, it stays a score: the
  plain share of influence reaching the inputs would be 1 by construction;
- completeness score (both modes, circuit-tracer's): the influence-weighted share of each
  node's incoming |edges| that does not come from "other neurons".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.errors import UserInputError
from backend.graphs.graph import AttributionGraph


@dataclass
class Pruned:
    node_mask: np.ndarray  # [N] bool
    edge_mask: np.ndarray  # [N, N] bool, same layout as the adjacency
    influence: np.ndarray  # [N] node influence on the weighted logits
    cumulative: np.ndarray  # [N] share of total influence of all nodes at least as influential


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    absolute = np.abs(matrix)
    return absolute / np.clip(absolute.sum(axis=1, keepdims=True), 1e-10, None)


def influence_series(normalized: np.ndarray, start: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """Σ_{k>=1} start · Â^k (terminates: Â of a DAG is nilpotent)."""
    current = start @ normalized
    total = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise RuntimeError("influence did not converge: the graph has a cycle")


def logit_weight_vector(graph: AttributionGraph) -> np.ndarray:
    weights = np.zeros(graph.n_nodes, dtype=np.float64)
    weights[graph.logit_slice] = graph.logit_weights
    return weights


def _threshold(scores: np.ndarray, fraction: float) -> float:
    """The score above which the top entries reach ``fraction`` of the total."""
    ordered = np.sort(scores.ravel())[::-1]
    total = ordered.sum()
    if total <= 0:
        return np.inf
    index = int(np.searchsorted(np.cumsum(ordered) / total, fraction))
    return float(ordered[min(index, len(ordered) - 1)])


def check_thresholds(node_threshold: float, edge_threshold: float) -> None:
    for name, value in (("node threshold", node_threshold), ("edge threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise UserInputError(f"The {name} must be between 0 and 1 (got {value}).")


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    check_thresholds(node_threshold, edge_threshold)
    adjacency = graph.adjacency.astype(np.float64)
    weights = logit_weight_vector(graph)
    n_kept_always = graph.n_pos + 1 + len(graph.logit_targets)  # embeddings, bias, logits
    influence = influence_series(normalize_rows(adjacency), weights)
    node_mask = influence >= _threshold(influence, node_threshold)
    node_mask[-n_kept_always:] = True

    pruned = adjacency.copy()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_rows(pruned)
    edge_scores = normalized * (influence_series(normalized, weights) + weights)[:, None]
    edge_mask = (edge_scores >= _threshold(edge_scores, edge_threshold)) & (edge_scores > 0)

    senders = slice(0, graph.n_nodes - n_kept_always)  # neurons and "other neurons"
    while True:
        before = node_mask.copy()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[senders] &= edge_mask[:, senders].any(axis=0)
        node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(axis=1)
        if (node_mask == before).all():
            break

    order = np.argsort(-influence, kind="stable")
    cumulative = np.zeros_like(influence)
    total = influence.sum()
    cumulative[order] = np.cumsum(influence[order]) / total if total > 0 else 0.0
    return Pruned(node_mask=node_mask, edge_mask=edge_mask, influence=influence, cumulative=cumulative)


def graph_scores(graph: AttributionGraph) -> dict[str, float]:
    """Replacement and completeness (module doc), "other neurons" in the role of errors."""
    weights = logit_weight_vector(graph)
    normalized = normalize_rows(graph.adjacency.astype(np.float64))
    influence = influence_series(normalized, weights)
    inputs = slice(graph.embed_slice.start, graph.bias_index + 1)
    others = np.zeros(graph.n_nodes, dtype=bool)
    others[graph.error_slice] = True
    dead_ends = others & ~graph.adjacency.any(axis=1)
    avoiding = normalized.copy()
    avoiding[:, others] = 0.0  # a path may not enter an "other neurons" node
    reached = influence[inputs].sum() + influence[dead_ends].sum()
    replacement = influence_series(avoiding, weights)[inputs].sum() / reached if reached > 0 else 0.0
    non_error = 1.0 - normalized[:, graph.error_slice].sum(axis=1)
    output_influence = influence + weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return {"replacement": float(replacement), "completeness": float(completeness)}
