"""Information-flow routes (Ferrando & Voita 2024, "Information Flow Routes"; the LLM
Transparency Tool's contribution graph), from one forward pass.

Each block updates the residual stream at position p in two steps (one for parallel
attention + MLP, as GPT-NeoX): after attention, y = x_p + Σ_j z_j + b, where z_j is what
attention moves from source position j (Σ over heads of α_h(p, j) · W_O^h v_h(j), through a
post-attention norm at its frozen scale where the model has one) and b the output bias;
after the MLP, y' = y + mlp(y). Each part z of a sum y gets the proportion

    prox(z, y) = max(‖y‖₁ - ‖y - z‖₁, 0),   importance(z) = prox(z, y) / Σ_z' prox(z', y)

so a block's importances at a position sum to 1. The graph has a node per residual state
(layer, position) and, between, one after attention ("mid"); edges: attention (source j ->
mid p), residual (state -> mid -> next state) and MLP (mid -> next state). Routes are the
edges of importance >= a threshold that connect to the prediction, found backwards from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from backend.errors import UserInputError
from backend.runtime.arch import parameter
from backend.runtime.attention import AttentionMaps, attention_maps
from backend.runtime.models import ModelHandle
from backend.runtime.norms import apply_frozen, norm_scale
from backend.runtime.prompts import encode_prompt, token_texts
from backend.runtime.results import JsonResult

CHUNK = 32  # query positions per step (bounds memory: CHUNK x P x d_model per layer)


@dataclass
class Flow(JsonResult):
    tokens: list[str]
    parallel: bool  # attention and MLP read the same state (no "mid" node)
    attention: np.ndarray  # [L, P, P] importance of source j in the state after attention at p
    attention_residual: np.ndarray  # [L, P] importance of the residual itself in that step
    mlp: np.ndarray  # [L, P] importance of the MLP output in the state after the MLP
    mlp_residual: np.ndarray  # [L, P] importance of the residual in that step
    max_error: float  # largest |sum of parts - the model's state| / |state| (exactness check)
    seconds: float


def proportions(parts: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Importance of each part [..., K, d] of ``total`` [..., d] (the sum of the parts)."""
    norm = total.abs().sum(-1, keepdim=True)
    prox = (norm - (total.unsqueeze(-2) - parts).abs().sum(-1)).clamp(min=0)
    return prox / prox.sum(-1, keepdim=True).clamp(min=1e-30)


def source_parts(handle: ModelHandle, maps: AttentionMaps, layer: int, queries: slice,
                 by_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What attention moves into each query position from each source position: [Q, P, d]
    (summed over heads) or [Q, H, P, d] (``by_head``), and the output bias [d] (after a
    post-attention norm, at its frozen scale, where the model has one)."""
    adapter = handle.adapter
    parts_of = adapter.layers[layer]
    values = maps.values(layer)  # [P, Hkv, hd]
    values = values.repeat_interleave(adapter.n_heads // adapter.n_kv_heads, dim=1)
    w_o = adapter.o_proj_weight(layer).view(adapter.d_model, adapter.n_heads, adapter.head_dim)
    written = torch.einsum("phk,dhk->hpd", values, w_o)  # [H, P, d] each head's output per source
    pattern = maps.frozen[layer].pattern[:, queries]  # [H, Q, P]
    bias = parameter(parts_of.o_proj, "bias")
    bias = torch.zeros(adapter.d_model) if bias is None else bias.detach()
    if by_head:
        parts = torch.einsum("hqp,hpd->qhpd", pattern, written)
    else:
        parts = torch.einsum("hqp,hpd->qpd", pattern, written)
    if parts_of.attn_out is not parts_of.attn:  # a post-attention norm (Gemma): frozen at its input's scale
        total = torch.einsum("hqp,hpd->qd", pattern, written) + bias
        scale = norm_scale(parts_of.attn_out, total)  # [Q, 1]
        scale = scale[:, None, None] if by_head else scale[:, None]
        parts = apply_frozen(parts_of.attn_out, parts, scale, bias_share=0.0)
        bias = apply_frozen(parts_of.attn_out, bias.expand(total.shape), norm_scale(parts_of.attn_out, total),
                            bias_share=1.0)
    else:
        bias = bias.expand(parts.shape[0], -1)
    return parts, bias  # bias: [Q, d]


@torch.no_grad()
def information_flow(handle: ModelHandle, prompt: str) -> Flow:
    started = time.perf_counter()
    ids = encode_prompt(handle, prompt)
    adapter = handle.adapter
    maps = attention_maps(handle, ids)
    L, P = adapter.n_layers, len(ids)
    attention = np.zeros((L, P, P), dtype=np.float32)
    attention_residual, mlp, mlp_residual = (np.zeros((L, P), dtype=np.float32) for _ in range(3))
    worst = 0.0
    for layer in range(L):
        resid = maps.frozen[layer].resid  # [P, d]
        mlp_out = maps.mlp_out[layer]
        for start in range(0, P, CHUNK):
            rows = slice(start, min(start + CHUNK, P))
            parts, bias = source_parts(handle, maps, layer, rows)  # [Q, P, d], [Q, d]
            residual = resid[rows]
            after_attention = residual + parts.sum(1) + bias
            worst = max(worst, _relative_error(residual + maps.attn_out[layer][rows], after_attention))
            extra = [mlp_out[rows]] if adapter.parallel else []
            total = after_attention + (mlp_out[rows] if adapter.parallel else 0)
            share = proportions(torch.cat([parts, torch.stack([residual, bias, *extra], 1)], 1), total)
            attention[layer, rows] = share[:, :P].numpy()
            attention_residual[layer, rows] = share[:, P].numpy()
            if adapter.parallel:
                mlp[layer, rows] = share[:, P + 2].numpy()
                mlp_residual[layer, rows] = share[:, P].numpy()
            else:
                step = proportions(torch.stack([after_attention, mlp_out[rows]], 1), after_attention + mlp_out[rows])
                mlp_residual[layer, rows], mlp[layer, rows] = step[:, 0].numpy(), step[:, 1].numpy()
    causal = np.tril(np.ones((P, P), dtype=bool))
    attention[:, ~causal] = 0.0
    return Flow(tokens=token_texts(handle, ids), parallel=adapter.parallel, attention=attention,
                attention_residual=attention_residual, mlp=mlp, mlp_residual=mlp_residual, max_error=worst,
                seconds=time.perf_counter() - started)


def _relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float(((expected - got).norm(dim=-1) / expected.norm(dim=-1).clamp(min=1e-12)).max())


@torch.no_grad()
def head_shares(handle: ModelHandle, prompt: str, layer: int, position: int) -> np.ndarray:
    """[H, P] importance of each (head, source position) in the state after attention at
    ``position`` (with the residual and the bias as the other parts): which heads carry an
    attention edge."""
    ids = encode_prompt(handle, prompt)
    if not 0 <= layer < handle.adapter.n_layers or not -len(ids) <= position < len(ids):
        raise UserInputError(f"No state at layer {layer}, position {position}.")
    position %= len(ids)
    maps = attention_maps(handle, ids)
    parts, bias = source_parts(handle, maps, layer, slice(position, position + 1), by_head=True)  # [1, H, P, d]
    parts, bias = parts[0], bias[0]
    residual = maps.frozen[layer].resid[position]
    total = residual + parts.sum((0, 1)) + bias
    if handle.adapter.parallel:
        total = total + maps.mlp_out[layer][position]
    H, P = parts.shape[:2]
    share = proportions(torch.cat([parts.reshape(H * P, -1), torch.stack([residual, bias])]), total)
    return share[:H * P].reshape(H, P).numpy()


@dataclass
class RouteEdge:
    kind: str  # attention | residual | mlp
    layer: int
    source: int  # position read (attention: the source token)
    target: int  # position written
    stage: str  # "attention" (into the mid state) or "mlp" (into the next state)
    importance: float


def routes(flow: Flow, threshold: float = 0.04, position: int = -1) -> list[RouteEdge]:
    """The edges of importance >= ``threshold`` that connect to the prediction at
    ``position`` (the last by default), walking back from it: a state is kept when a kept
    edge leaves it."""
    L, P = flow.attention.shape[:2]
    position %= P
    needed = {position}  # positions whose state after block `layer` is on a route
    kept: list[RouteEdge] = []
    for layer in range(L - 1, -1, -1):
        if flow.parallel:  # attention and the MLP both read the block's input state
            needed = _parallel_step(flow, layer, needed, threshold, kept)
            continue
        mids = set()
        for p in sorted(needed):
            if flow.mlp[layer, p] >= threshold:
                kept.append(RouteEdge("mlp", layer, p, p, "mlp", float(flow.mlp[layer, p])))
                mids.add(p)
            if flow.mlp_residual[layer, p] >= threshold:
                kept.append(RouteEdge("residual", layer, p, p, "mlp", float(flow.mlp_residual[layer, p])))
                mids.add(p)
        states = set()
        for p in sorted(mids):
            for j in np.flatnonzero(flow.attention[layer, p] >= threshold):
                kept.append(RouteEdge("attention", layer, int(j), p, "attention", float(flow.attention[layer, p, j])))
                states.add(int(j))
            if flow.attention_residual[layer, p] >= threshold:
                kept.append(RouteEdge("residual", layer, p, p, "attention", float(flow.attention_residual[layer, p])))
                states.add(p)
        needed = states
    return kept


def _parallel_step(flow: Flow, layer: int, needed: set[int], threshold: float, kept: list[RouteEdge]) -> set[int]:
    states = set()
    for p in sorted(needed):
        for j in np.flatnonzero(flow.attention[layer, p] >= threshold):
            kept.append(RouteEdge("attention", layer, int(j), p, "attention", float(flow.attention[layer, p, j])))
            states.add(int(j))
        for kind, value in (("residual", flow.attention_residual[layer, p]), ("mlp", flow.mlp[layer, p])):
            if value >= threshold:
                kept.append(RouteEdge(kind, layer, p, p, "block", float(value)))
                states.add(p)
    return states
