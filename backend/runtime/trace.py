"""The trace API: run one prompt and return, on request, what happened inside as arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backend.runtime.hooks import Hook, first_tensor, hooked
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
    resid_in: list = [None] * n_layers
    attn_out: list = [None] * n_layers
    mlp_out: list = [None] * n_layers
    pattern_list: list = [None] * n_layers
    head_in: list = [None] * n_layers
    neuron_list: list = [None] * n_layers
    final: list = [None]

    def keep(store: list, layer: int, take_input: bool = False, second: bool = False):
        def fn(module, args, output=None):
            if take_input:
                store[layer] = args[0].detach()
            elif second:
                store[layer] = output[1].detach()
            else:
                store[layer] = first_tensor(output).detach()

        return fn

    hooks: list[Hook] = []
    for layer, parts in enumerate(adapter.layers):
        hooks += [
            Hook(parts.block, "pre", keep(resid_in, layer, take_input=True)),
            Hook(parts.attn_out, "forward", keep(attn_out, layer)),
            Hook(parts.mlp_out, "forward", keep(mlp_out, layer)),
        ]
        if patterns:
            hooks.append(Hook(parts.attn, "forward", keep(pattern_list, layer, second=True)))
        if heads:
            hooks.append(Hook(parts.o_proj, "pre", keep(head_in, layer, take_input=True)))
        if neurons:
            hooks.append(Hook(parts.down_proj, "pre", keep(neuron_list, layer, take_input=True)))
    hooks.append(Hook(adapter.layers[-1].block, "forward", keep(final, 0)))

    input_ids = torch.tensor([ids], device=handle.device)
    with hooked(handle, hooks):
        logits = handle.model(input_ids, use_cache=False).logits[0]

    trace = Trace(
        token_ids=ids,
        tokens=token_texts(handle, ids),
        logits=logits.float().cpu().numpy(),
        resid=_numpy(resid_in + final),
        attn_out=_numpy(attn_out),
        mlp_out=_numpy(mlp_out),
    )
    if patterns:
        if any(p is None for p in pattern_list):
            raise RuntimeError("attention weights unavailable: load the model with attn_implementation='eager'")
        trace.patterns = _numpy(pattern_list)
    if heads:
        trace.head_out = _split_heads(handle, head_in)
    if neurons:
        trace.neurons = _numpy(neuron_list)
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
