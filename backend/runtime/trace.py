"""The trace API: run one prompt and return, on request, what happened inside as arrays."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from backend.runtime.hooks import Hook, hooked, read_site
from backend.runtime.models import ModelHandle
from backend.runtime.prompts import encode_prompt, token_texts


@dataclass
class Trace:
    """One forward pass, batch 1. Shapes (L layers, P positions, H heads):

    resid: [L+1, P, d]   resid[l] = input of block l; resid[L] = last block's output (pre final norm)
    attn_out, mlp_out: [L, P, d]  what attention / the MLP add to the residual stream
    logits: [P, vocab]
    patterns: [L, H, P, P] attention probabilities (query x key), if asked
    head_out: [L, P, H, d] each head's share of the output projection (before any post-norm), if asked
    neurons: [L, P, d_mlp] MLP neuron activations (the down projection's input), if asked
    """

    token_ids: list[int]
    tokens: list[str]
    logits: np.ndarray
    resid: np.ndarray
    attn_out: np.ndarray
    mlp_out: np.ndarray
    patterns: np.ndarray | None = None
    head_out: np.ndarray | None = None
    neurons: np.ndarray | None = None


def _numpy(tensors: list[torch.Tensor]) -> np.ndarray:
    return torch.stack([t[0] for t in tensors]).float().cpu().numpy()


@torch.no_grad()
def residual_stream(handle: ModelHandle, ids: list[int]) -> torch.Tensor:
    """The residual stream of one run, [L+1, P, d] as ``Trace.resid`` (on the model's device),
    from the decoder stack alone: no other site is kept and no logits are computed."""
    n_layers = handle.adapter.n_layers
    kept: list = [None] * (n_layers + 1)
    hooks = [read_site(handle.adapter.site("resid_pre", layer), partial(kept.__setitem__, layer))
             for layer in range(n_layers)]
    hooks.append(read_site(handle.adapter.site("final"), partial(kept.__setitem__, n_layers)))
    with hooked(handle, hooks):
        handle.final_residual(handle.ids(ids))
    return torch.stack([t[0] for t in kept])


@torch.no_grad()
def run_trace(
    handle: ModelHandle,
    prompt: str,
    *,
    patterns: bool = False,
    heads: bool = False,
    neurons: bool = False,
) -> Trace:
    """Run ``prompt`` once with read-only hooks and collect the requested tensors."""
    adapter = handle.adapter
    ids = encode_prompt(handle, prompt)
    n_layers = adapter.n_layers
    kept: dict[str, list] = {name: [None] * (n_layers + 1) for name in ("resid_pre", "attn_out", "mlp_out", "patterns",
                                                                       "heads", "neurons")}

    def keep(name: str, layer: int, tensor: torch.Tensor) -> None:
        kept[name][layer] = tensor.detach()

    def keep_pattern(layer: int, module, args, output) -> None:
        kept["patterns"][layer] = output[1].detach()

    wanted = ["resid_pre", "attn_out", "mlp_out"] + (["heads"] if heads else []) + (["neurons"] if neurons else [])
    hooks: list[Hook] = [read_site(adapter.site(name, layer), partial(keep, name, layer))
                         for layer in range(n_layers) for name in wanted]
    if patterns:
        hooks += [
            Hook(parts.attn, "forward", partial(keep_pattern, layer)) for layer, parts in enumerate(adapter.layers)
        ]
    hooks.append(read_site(adapter.site("final"), partial(keep, "resid_pre", n_layers)))
    with hooked(handle, hooks):
        logits = handle.logits(handle.ids(ids))[0]

    trace = Trace(
        token_ids=ids,
        tokens=token_texts(handle, ids),
        logits=logits.float().cpu().numpy(),
        resid=_numpy(kept["resid_pre"]),
        attn_out=_numpy(kept["attn_out"][:n_layers]),
        mlp_out=_numpy(kept["mlp_out"][:n_layers]),
    )
    if patterns:
        if any(p is None for p in kept["patterns"][:n_layers]):
            raise RuntimeError("attention weights unavailable: load the model with attn_implementation='eager'")
        trace.patterns = _numpy(kept["patterns"][:n_layers])
    if heads:
        trace.head_out = _split_heads(handle, kept["heads"][:n_layers])
    if neurons:
        trace.neurons = _numpy(kept["neurons"][:n_layers])
    return trace


def _split_heads(handle: ModelHandle, head_in: list[torch.Tensor]) -> np.ndarray:
    """Per-head outputs: z_h @ W_O[:, h]^T for each head h (their sum + bias = o_proj output)."""
    adapter = handle.adapter
    out = []
    for layer, z in enumerate(head_in):
        weight = adapter.o_proj_weight(layer)  # [d, H*hd]
        z_heads = z[0].reshape(z.shape[1], adapter.n_heads, adapter.head_dim)
        w_heads = weight.reshape(weight.shape[0], adapter.n_heads, adapter.head_dim)
        out.append(torch.einsum("phk,dhk->phd", z_heads, w_heads))
    return torch.stack(out).float().cpu().numpy()
