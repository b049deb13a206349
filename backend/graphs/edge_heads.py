"""Which attention heads carry a graph edge: the direct effect split over heads.

In the direct-mode linearization, a source s reaches a target t only through the residual
stream and frozen attention. Every such path either stays in the residual stream (possible
only when s and t sit at the same position) or has a *last* attention hop: a head (m, h)
that writes into t's position, after which the path runs in the residual stream alone. So

    edge(s -> t) = residual-only term + Σ_(m,h) g_t · Δwrite_(m,h)[p_t]

exactly, where g_t is t's gradient w.r.t. the residual stream it reads (no further hops)
and Δwrite is what head (m, h) writes at p_t because of s alone (a replay with only s's
value switched on, minus a replay with every source at zero). Cost: one batched forward
(batch 2) and one small backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backend.errors import UserInputError
from backend.graphs.attribution import other_value, target_matrix, total_effects
from backend.graphs.graph import AttributionGraph
from backend.runtime.linearize import Leaves, linear_forward, record_frozen
from backend.runtime.models import ModelHandle
from backend.runtime.norms import apply_frozen
from backend.runtime.results import JsonResult


@dataclass
class EdgeHeads(JsonResult):
    source: str
    target: str
    heads: np.ndarray  # [layers, heads] contribution of paths whose last hop is that head
    residual: float  # paths without any attention hop (same position only)
    edge: float  # the graph's edge weight (equals residual + heads.sum())


def _source_values(graph: AttributionGraph, run, index: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Leaf values with only source ``index`` switched on (batch 1)."""
    embed = torch.zeros_like(run.embed[:1])
    neurons = [torch.zeros_like(v[:1]) for v in run.neuron_inputs]
    kind = graph.node_kind(index)
    layer, pos = graph.node_position(index)
    if kind == "embedding":
        embed[0, pos] = run.embed[0, pos].detach()
    elif kind == "neuron":
        neuron = graph.features[index][2]
        neurons[layer][0, pos, neuron] = run.neuron_inputs[layer][0, pos, neuron].detach()
    elif kind == "other":
        neurons[layer][0, pos] = run.neuron_inputs[layer][0, pos].detach()
        for f_layer, f_pos, f_neuron in graph.features:
            if (f_layer, f_pos) == (layer, pos):
                neurons[layer][0, pos, f_neuron] = 0.0
    else:
        raise UserInputError(f"A {kind} node has no edges to split over heads.")
    return embed, neurons


def _target_value(handle: ModelHandle, graph: AttributionGraph, run, index: int, batch: int,
                  direction: torch.Tensor | None) -> torch.Tensor:
    kind = graph.node_kind(index)
    if kind == "neuron":
        layer, pos, neuron = graph.features[index]
        return run.neurons[layer][batch, pos, neuron]
    if kind == "other":
        layer, pos = graph.node_position(index)
        unselected = torch.ones(handle.adapter.d_mlp, device=direction.device)
        for f_layer, f_pos, f_neuron in graph.features:
            if (f_layer, f_pos) == (layer, pos):
                unselected[f_neuron] = 0.0
        return other_value(handle, run.neurons[layer][batch, pos], unselected, direction, layer)
    info = graph.logit_targets[index - graph.logit_slice.start]
    logits = run.logits[batch]
    value = logits[info["id"]] - (logits[info["wrong_id"]] if "wrong_id" in info else logits.mean())
    return value


def _head_writes(handle: ModelHandle, frozen, heads_in: torch.Tensor, layer: int, pos: int) -> torch.Tensor:
    """What each head of ``layer`` writes into the residual stream at ``pos``: [H, d]."""
    adapter = handle.adapter
    z = heads_in[pos].reshape(adapter.n_heads, adapter.head_dim)
    w = adapter.o_proj_weight(layer).reshape(-1, adapter.n_heads, adapter.head_dim)
    writes = torch.einsum("hk,dhk->hd", z, w)
    post = adapter.layers[layer].attn_out
    if post is not adapter.layers[layer].attn:  # Gemma: a (frozen, bias-free) norm after o_proj
        writes = apply_frozen(post, writes, frozen.norm_scale[id(post)][0, pos])
    return writes


def edge_heads(handle: ModelHandle, graph: AttributionGraph, source: int, target: int) -> EdgeHeads:
    """Split the edge ``source -> target`` of ``graph`` (node indices) over attention heads."""
    kind = graph.node_kind(target)
    if not graph.adjacency[target].any():
        raise UserInputError(f"{graph.node_label(target)} has no incoming edges.")
    adapter = handle.adapter
    input_ids = handle.ids(graph.token_ids)
    with handle.lock:
        frozen = record_frozen(handle, input_ids)
        direction = None
        if kind == "other":
            matrix = target_matrix(graph.logit_targets, handle.vocab_size).to(handle.device)
            directions, _ = total_effects(handle, frozen, matrix, graph.logit_weights)
            direction = directions[graph.node_position(target)]
        clean = linear_forward(handle, frozen, direct=True)
        embed, neurons = _source_values(graph, clean, source)
        run = linear_forward(
            handle,
            frozen,
            direct=True,
            batch=2,
            leaves=Leaves(
                torch.cat([embed, torch.zeros_like(embed)]), [torch.cat([v, torch.zeros_like(v)]) for v in neurons]
            ),
            capture_heads=True,
            capture_reads=True,
        )
        t_layer, t_pos = graph.node_position(target)
        read = run.reads[adapter.n_layers] if kind == "logit" else run.reads[t_layer]
        (gradient,) = torch.autograd.grad(_target_value(handle, graph, run, target, 0, direction), read)
        g = gradient[0, t_pos]
        last_head_layer = t_layer if not adapter.parallel else t_layer - 1
        if kind == "logit":
            last_head_layer = adapter.n_layers - 1
        contributions = torch.zeros(adapter.n_layers, adapter.n_heads)
        with torch.no_grad():
            for layer in range(last_head_layer + 1):
                delta = run.heads[layer][0] - run.heads[layer][1]
                contributions[layer] = _head_writes(handle, frozen, delta, layer, t_pos) @ g
            total = float((g * (read[0, t_pos] - read[1, t_pos])).sum())
    heads = contributions.cpu().numpy()
    return EdgeHeads(
        source=graph.node_label(source),
        target=graph.node_label(target),
        heads=heads,
        residual=total - float(heads.sum()),
        edge=float(graph.adjacency[target, source]),
    )
