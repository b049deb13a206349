"""Frozen-gain linearization of the shared model at a clean run (DESIGN.md).

``record_frozen`` runs the clean prompt once and keeps what the linearization freezes:
- attention patterns, by keeping the clean queries and keys (the value path stays live);
- every normalization's scale (1/rms, or 1/std after centring for LayerNorm);
- each MLP nonlinearity's gain by the identity rule act(z) = (act(z)/z)·z; for a gated MLP
  act(g)·u the product is split equally: h = ½·(act(g)·u/g)·g + ½·act(g)·u.

``linear_forward`` replays the model with those frozen, through hooks on the shared instance
(inside a context manager, under its lock). The replayed model is affine in every node's
value: at the clean input it reproduces the clean activations, and by Euler's theorem each
node's value = Σ (gradient × value) over its sources + the value at all-zero sources (bias).

In *direct* mode the embeddings (input of block 0) and every MLP's neurons (input of its
down projection) are leaves: gradients then pass only through the residual stream and the
frozen attention, never through another MLP, which is what a graph edge measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from backend.runtime.arch import parameter
from backend.runtime.hooks import Hook, hooked
from backend.runtime.models import ModelHandle

GATE_LIMIT = 0.5  # act(z)/z as z -> 0 for SiLU and GELU (both tanh and erf forms)


@dataclass
class Frozen:
    """What the clean run froze, keyed by module id; tensors have batch dimension 1."""

    input_ids: torch.Tensor
    norm_scale: dict[int, torch.Tensor] = field(default_factory=dict)
    qk: dict[int, torch.Tensor] = field(default_factory=dict)
    gains: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)


@dataclass
class LinearRun:
    """One replayed forward. ``neurons[l]`` is layer l's linearized neuron value (in the
    autograd graph); ``neuron_inputs[l]`` is what the down projection received: the leaf in
    direct mode, else ``neurons[l]`` itself. ``embed`` is block 0's input (a leaf in either
    mode, so gradients exist in both modes). ``final`` is the final-normed residual stream; ``logits`` the last position's
    logits before any soft-capping. ``heads[l]`` (if asked) is the o_proj input [B,P,H*hd];
    ``reads[l]`` (if asked) the residual stream layer l's MLP reads (its norm's input), and
    ``reads[L]`` the one the unembedding reads (the final norm's input)."""

    embed: torch.Tensor
    neurons: list[torch.Tensor]
    neuron_inputs: list[torch.Tensor]
    final: torch.Tensor
    logits: torch.Tensor
    heads: list[torch.Tensor] | None = None
    reads: list[torch.Tensor] | None = None


def norm_modules(handle: ModelHandle) -> list[nn.Module]:
    """Every normalization layer of the decoder stack (LayerNorm or *RMSNorm)."""
    return [
        m for m in handle.adapter.base.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
    ]


def _norm_parts(module: nn.Module) -> tuple[bool, torch.Tensor | None, torch.Tensor | None, float]:
    """(centred, effective weight, bias, eps) of a norm layer."""
    if isinstance(module, nn.LayerNorm):
        return True, parameter(module, "weight"), parameter(module, "bias"), module.eps
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
    weight = parameter(module, "weight")
    if weight is not None and type(module).__name__.startswith("Gemma"):
        weight = 1.0 + weight.float()  # Gemma scales by (1 + w)
    return False, weight, None, eps


def _centre(x: torch.Tensor, centred: bool) -> torch.Tensor:
    x = x.float()
    return x - x.mean(-1, keepdim=True) if centred else x


def _apply_norm(module: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    centred, weight, bias, _ = _norm_parts(module)
    y = _centre(x, centred) * scale
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def _gains(act, g: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    a = act(g)
    ratio = torch.where(g != 0, a / torch.where(g != 0, g, torch.ones_like(g)), torch.full_like(g, GATE_LIMIT))
    if u is None:
        return ratio, None
    return ratio * u, a  # h = ½·k_g·g + ½·k_u·u


@torch.no_grad()
def record_frozen(handle: ModelHandle, input_ids: torch.Tensor) -> Frozen:
    """Run the clean prompt (batch 1) and keep the frozen quantities."""
    frozen = Frozen(input_ids=input_ids)
    mlp_inputs: dict[int, torch.Tensor] = {}

    def keep_norm(module, args, output):
        centred, _, _, eps = _norm_parts(module)
        xc = _centre(args[0], centred)
        frozen.norm_scale[id(module)] = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)

    def keep_output(store: dict):
        def fn(module, args, output):
            store[id(module)] = output.detach()

        return fn

    hooks = [Hook(m, "forward", keep_norm) for m in norm_modules(handle)]
    for parts in handle.adapter.layers:
        hooks += [Hook(module, "forward", keep_output(frozen.qk)) for module, _ in parts.qk]
        hooks += [Hook(m, "forward", keep_output(mlp_inputs)) for m in (parts.gate, parts.up) if m is not None]
    with hooked(handle, hooks):
        handle.adapter.base(input_ids, use_cache=False)
    for parts in handle.adapter.layers:
        up = mlp_inputs[id(parts.up)] if parts.up is not None else None
        frozen.gains.append(_gains(parts.act, mlp_inputs[id(parts.gate)], up))
    return frozen


def _leaf(value: torch.Tensor) -> torch.Tensor:
    return value.detach().clone().requires_grad_(True)


def linear_forward(
    handle: ModelHandle,
    frozen: Frozen,
    *,
    direct: bool,
    batch: int = 1,
    embed_value: torch.Tensor | None = None,
    neuron_values: list[torch.Tensor | None] | None = None,
    capture_heads: bool = False,
    capture_reads: bool = False,
    freeze_attention: bool = True,
    extra_hooks: list[Hook] | None = None,
) -> LinearRun:
    """Replay the clean prompt through the frozen-gain linearization (with gradients).

    In direct mode, ``embed_value`` / ``neuron_values[l]`` (shape [B,P,...]) override the
    leaves' values; by default they take their clean (replayed) values. With
    ``freeze_attention=False`` queries and keys stay live (gradients pass through the
    softmax, as RelP's default). ``extra_hooks`` run after the replay hooks (e.g. to read
    the replayed activations).
    """
    adapter = handle.adapter
    n_layers = adapter.n_layers
    mlp_inputs: dict[int, torch.Tensor] = {}
    neurons: list = [None] * n_layers
    neuron_inputs: list = [None] * n_layers
    heads: list = [None] * n_layers
    reads: list = [None] * (n_layers + 1)
    embed: list = [None]

    def replay_norm(module, args, output):
        return _apply_norm(module, args[0], frozen.norm_scale[id(module)])

    def replay_qk(mask):
        def fn(module, args, output):
            clean = frozen.qk[id(module)].expand_as(output)
            return clean if mask is None else torch.where(mask.to(output.device), clean, output)

        return fn

    def keep_mlp_input(module, args, output):
        mlp_inputs[id(module)] = output

    def replay_neurons(layer: int, parts):
        def fn(module, args):
            gain, up_gain = frozen.gains[layer]
            g = mlp_inputs[id(parts.gate)]
            if up_gain is None:
                value = gain * g
            else:
                value = 0.5 * gain * g + 0.5 * up_gain * mlp_inputs[id(parts.up)]
            neurons[layer] = value
            if direct:
                override = neuron_values[layer] if neuron_values is not None else None
                value = _leaf(value if override is None else override)
            neuron_inputs[layer] = value
            return (value,) + tuple(args[1:])

        return fn

    def embed_leaf(module, args):
        value = _leaf(args[0] if embed_value is None else embed_value)
        embed[0] = value
        return (value,) + tuple(args[1:])

    def keep_input(store: list, layer: int):
        def fn(module, args):
            store[layer] = args[0]

        return fn

    hooks = [Hook(m, "forward", replay_norm) for m in norm_modules(handle)]
    hooks.append(Hook(adapter.layers[0].block, "pre", embed_leaf))
    for layer, parts in enumerate(adapter.layers):
        if freeze_attention:
            hooks += [Hook(module, "forward", replay_qk(mask)) for module, mask in parts.qk]
        hooks += [Hook(m, "forward", keep_mlp_input) for m in (parts.gate, parts.up) if m is not None]
        hooks.append(Hook(parts.down_proj, "pre", replay_neurons(layer, parts)))
        if capture_heads:
            hooks.append(Hook(parts.o_proj, "pre", keep_input(heads, layer)))
        if capture_reads:
            hooks.append(Hook(parts.mlp_norm, "pre", keep_input(reads, layer)))
    if capture_reads:
        hooks.append(Hook(adapter.final_norm, "pre", keep_input(reads, n_layers)))
    hooks += extra_hooks or []
    input_ids = frozen.input_ids.expand(batch, -1)
    with hooked(handle, hooks), torch.enable_grad():
        final = adapter.base(input_ids, use_cache=False).last_hidden_state
        logits = adapter.unembed(final[:, -1])
    return LinearRun(
        embed=embed[0],
        neurons=neurons,
        neuron_inputs=neuron_inputs,
        final=final,
        logits=logits,
        heads=heads if capture_heads else None,
        reads=reads if capture_reads else None,
    )
