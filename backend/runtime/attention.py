"""Attention as linear maps: per-family query/key/value weights, the frozen q/k norms, RoPE.

With the norm scales frozen at a run's values, a head's query at position p is an affine
function of the residual stream there: q = RoPE_p(qknorm(W_q · norm(x) + b_q)), and the same
holds for keys and values. ``AttentionMaps`` captures, in one forward, what is frozen (the
norm inputs and the rotary cos/sin each attention module received) and applies those maps
to any vectors written into the residual stream, e.g. one upstream component's output; the
same forward keeps each block's attention and MLP outputs (information flow splits them). The
model's own ``apply_rotary_pos_emb`` is used, so partial rotary (GPT-NeoX) and per-layer
rotary bases (Gemma 3's local layers) are exactly the model's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial

import torch

from backend.errors import UserInputError
from backend.runtime.arch import ArchAdapter, parameter
from backend.runtime.cache import cached
from backend.runtime.hooks import Hook, hooked, read_site
from backend.runtime.models import ModelHandle
from backend.runtime.norms import apply_frozen, norm_scale


@dataclass(frozen=True)
class QKV:
    """[rows, d_model] weights and [rows] biases (None: no bias) of queries, keys, values,
    rows = heads x head_dim (kv heads for keys and values)."""

    w_q: torch.Tensor
    b_q: torch.Tensor | None
    w_k: torch.Tensor
    b_k: torch.Tensor | None
    w_v: torch.Tensor
    b_v: torch.Tensor | None


def qkv_weights(adapter: ArchAdapter, layer: int) -> QKV:
    attn = adapter.layers[layer].attn
    d, hd, heads = adapter.d_model, adapter.head_dim, adapter.n_heads
    if hasattr(attn, "q_proj"):  # Llama, Qwen, Mistral, Gemma
        return QKV(attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias,
                   attn.v_proj.weight, attn.v_proj.bias)
    if hasattr(attn, "c_attn"):  # GPT-2: Conv1D, weight [d, 3d]
        w, b = attn.c_attn.weight.T, attn.c_attn.bias
        return QKV(w[:d], b[:d], w[d:2 * d], b[d:2 * d], w[2 * d:], b[2 * d:])
    if hasattr(attn, "query_key_value"):  # GPT-NeoX: rows interleaved per head [H, (q, k, v), hd]
        w = attn.query_key_value.weight.view(heads, 3, hd, d)
        b = parameter(attn.query_key_value, "bias")
        bias = None if b is None else b.view(heads, 3, hd)
        parts = [(w[:, i].reshape(heads * hd, d), None if bias is None else bias[:, i].reshape(-1)) for i in range(3)]
        return QKV(parts[0][0], parts[0][1], parts[1][0], parts[1][1], parts[2][0], parts[2][1])
    raise UserInputError(f"QK attribution and information flow do not know the attention module "
                         f"{type(attn).__name__} (supported: Llama, Qwen, Mistral, Gemma, GPT-2, GPT-NeoX).")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x @ weight.T if bias is None else x @ weight.T + bias


@dataclass
class Frozen:
    """What one layer's attention saw in the recorded run."""

    resid: torch.Tensor  # [P, d] the attention norm's input
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) [1, P, rot] or None
    pattern: torch.Tensor | None  # [H, P, P] attention weights (eager attention)


class AttentionMaps:
    """Affine maps from residual-stream vectors to one layer's queries, keys and values,
    frozen at a recorded run of ``ids`` (batch 1)."""

    def __init__(self, handle: ModelHandle, ids: list[int]) -> None:
        self.handle, self.adapter = handle, handle.adapter
        self.attn_out: list[torch.Tensor] = [torch.empty(0)] * self.adapter.n_layers  # [P, d] per block
        self.mlp_out: list[torch.Tensor] = [torch.empty(0)] * self.adapter.n_layers
        self.frozen = self._record(ids)

    def _record(self, ids: list[int]) -> list[Frozen]:
        adapter = self.adapter
        seen: dict[int, dict] = {layer: {} for layer in range(adapter.n_layers)}

        def keep_output(store: list[torch.Tensor], layer: int, tensor: torch.Tensor) -> None:
            store[layer] = tensor[0].detach()

        def keep_input(layer: int, module, args) -> None:
            seen[layer]["resid"] = args[0][0].detach()

        def keep_kwargs(layer: int, module, args, kwargs) -> None:
            embeddings = kwargs.get("position_embeddings")
            seen[layer]["rope"] = None if embeddings is None else tuple(t.detach() for t in embeddings)

        def keep_pattern(layer: int, module, args, output) -> None:
            seen[layer]["pattern"] = output[1][0].detach() if output[1] is not None else None

        hooks = []
        for layer, parts in enumerate(adapter.layers):
            hooks += [Hook(parts.attn_norm, "pre", lambda m, a, layer=layer: keep_input(layer, m, a)),
                      Hook(parts.attn, "pre_kwargs", lambda m, a, k, layer=layer: keep_kwargs(layer, m, a, k)),
                      Hook(parts.attn, "forward", lambda m, a, o, layer=layer: keep_pattern(layer, m, a, o)),
                      read_site(adapter.site("attn_out", layer), partial(keep_output, self.attn_out, layer)),
                      read_site(adapter.site("mlp_out", layer), partial(keep_output, self.mlp_out, layer))]
        with torch.no_grad(), hooked(self.handle, hooks):
            self.handle.final_residual(self.handle.ids(ids))
        return [Frozen(seen[layer]["resid"], seen[layer].get("rope"), seen[layer].get("pattern"))
                for layer in range(adapter.n_layers)]

    # ------------------------------------------------------------ pieces
    def scaling(self, layer: int) -> float:
        return float(self.adapter.layers[layer].attn.scaling)

    def softcap(self, layer: int) -> float | None:
        cap = getattr(self.adapter.layers[layer].attn, "attn_logit_softcapping", None)
        return float(cap) if cap else None

    def normed(self, layer: int, vectors: torch.Tensor, positions: torch.Tensor, with_bias: bool) -> torch.Tensor:
        """The attention norm applied to ``vectors`` [..., P', d] at ``positions`` with the
        recorded scales (its bias only when ``with_bias``)."""
        norm = self.adapter.layers[layer].attn_norm
        scale = norm_scale(norm, self.frozen[layer].resid)[positions]
        return apply_frozen(norm, vectors, scale, bias_share=1.0 if with_bias else 0.0)

    def queries(self, layer: int, vectors: torch.Tensor, positions: torch.Tensor, include_bias: bool) -> torch.Tensor:
        """[..., P', H, hd] queries of residual vectors [..., P', d] at ``positions``: the
        affine map's linear part, plus its constant (norm and projection biases) when
        ``include_bias`` (of zero vectors: the constant alone)."""
        return self._side(layer, vectors, positions, include_bias, "q")

    def keys(self, layer: int, vectors: torch.Tensor, positions: torch.Tensor, include_bias: bool) -> torch.Tensor:
        """[..., P', H_kv, hd] key parts (see ``queries``)."""
        return self._side(layer, vectors, positions, include_bias, "k")

    def values(self, layer: int) -> torch.Tensor:
        """[P, H_kv, hd] the recorded run's values (affine in the normed input, biases included)."""
        weights = qkv_weights(self.adapter, layer)
        frozen = self.frozen[layer]
        positions = torch.arange(frozen.resid.shape[0])
        x = self.normed(layer, frozen.resid, positions, with_bias=True)
        return _linear(x, weights.w_v, weights.b_v).view(len(positions), -1, self.adapter.head_dim)

    def _side(self, layer: int, vectors: torch.Tensor, positions: torch.Tensor, include_bias: bool, side: str):
        adapter, weights, frozen = self.adapter, qkv_weights(self.adapter, layer), self.frozen[layer]
        w, b = (weights.w_q, weights.b_q) if side == "q" else (weights.w_k, weights.b_k)
        x = self.normed(layer, vectors, positions, with_bias=include_bias)
        projected = _linear(x, w, b if include_bias else None)
        projected = projected.view(*projected.shape[:-1], -1, adapter.head_dim)
        attn = adapter.layers[layer].attn
        qk_norm = getattr(attn, "q_norm" if side == "q" else "k_norm", None)
        if qk_norm is not None:  # per-head RMSNorm (Gemma 3, Qwen 3), scale frozen at the full vector
            all_positions = torch.arange(frozen.resid.shape[0])
            full = _linear(self.normed(layer, frozen.resid, all_positions, with_bias=True), w, b)
            full = full.view(len(all_positions), -1, adapter.head_dim)[positions]
            projected = apply_frozen(qk_norm, projected, norm_scale(qk_norm, full),
                                     bias_share=1.0 if include_bias else 0.0)
        return self._rotate(layer, projected, positions, side)

    def _rotate(self, layer: int, x: torch.Tensor, positions: torch.Tensor, side: str) -> torch.Tensor:
        rope = self.frozen[layer].position_embeddings
        if rope is None:
            return x
        cos, sin = (t[0, positions] for t in rope)  # [P', rot]
        apply = importlib.import_module(type(self.adapter.layers[layer].attn).__module__).apply_rotary_pos_emb
        shape = x.shape  # [..., P', H, hd]
        flat = x.reshape(-1, *shape[-3:]).transpose(1, 2)  # [N, H, P', hd]
        rotated, _ = apply(flat, flat, cos[None], sin[None])
        return rotated.transpose(1, 2).reshape(shape)


def attention_maps(handle: ModelHandle, ids: list[int]) -> AttentionMaps:
    """The recorded maps of ``ids`` (cached: QK attribution and information flow share one forward)."""
    return cached(handle, "attention_maps", (tuple(ids),), lambda: AttentionMaps(handle, ids))
