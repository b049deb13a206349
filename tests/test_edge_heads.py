"""Splitting an edge over attention heads is an exact decomposition of the edge."""

import numpy as np
import torch

from backend.graphs.attribution import attribution_graph
from backend.graphs.edge_heads import edge_heads

PROMPT = "When Mary and John went to the store"


def test_heads_plus_residual_equal_the_edge(tiny):
    graph = attribution_graph(tiny, PROMPT, max_nodes=15)
    rows = list(range(graph.n_features)) + [graph.logit_slice.start]
    checked = 0
    for target in rows:
        sources = np.argsort(-np.abs(graph.adjacency[target]))[:3]
        for source in sources:
            if graph.adjacency[target, source] == 0 or graph.node_kind(int(source)) == "bias":
                continue
            split = edge_heads(tiny, graph, int(source), target)
            assert abs(split.heads.sum() + split.residual - split.edge) <= 1e-4 * max(1.0, abs(split.edge))
            _, s_pos = graph.node_position(int(source))
            _, t_pos = graph.node_position(target)
            if s_pos != t_pos:  # no attention hop -> no way to move between positions
                assert abs(split.residual) <= 1e-5 * max(1.0, np.abs(split.heads).sum())
            checked += 1
    assert checked >= 5


def test_same_position_residual_term_is_the_sources_own_write(tiny_llama):
    graph = attribution_graph(tiny_llama, PROMPT, max_nodes=30)
    target = graph.logit_slice.start  # reads the last position
    last = graph.n_pos - 1
    source = next(i for i in range(graph.n_features) if graph.features[i][1] == last)
    layer, _, neuron = graph.features[source]
    split = edge_heads(tiny_llama, graph, source, target)
    # own write = activation * W_down[:, neuron], read through the final norm and unembedding
    from backend.runtime.linearize import linear_forward, record_frozen

    ids = torch.tensor([graph.token_ids])
    frozen = record_frozen(tiny_llama, ids)
    run = linear_forward(tiny_llama, frozen, direct=True, capture_reads=True)
    logits = run.logits[0]
    target_value = logits[graph.logit_targets[0]["id"]] - logits.mean()
    (g,) = torch.autograd.grad(target_value, run.reads[-1])
    write = graph.node_values[source] * tiny_llama.adapter.down_proj_weight(layer)[:, neuron]
    assert abs(float(g[0, last] @ write) - split.residual) < 1e-5
