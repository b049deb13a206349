"""Frozen-gain linearization of the shared model at a clean run (DESIGN.md).

``record_frozen`` runs the clean prompt once and keeps what the linearization freezes:
- attention patterns, by keeping the clean queries and keys (the value path stays live);
- every normalization's scale (1/rms, or 1/std after centring for LayerNorm);
- each MLP nonlinearity's gain by the identity rule act(z) = (act(z)/z)·z; for a gated MLP
  act(g)·u the product is split equally: h = ½·(act(g)·u/g)·g + ½·act(g)·u.

``LinearReplay`` replays the model with those frozen, through hooks on the shared instance
(inside a context manager, under its lock). The replayed model is affine in every node's
value: at the clean input it reproduces the clean activations, and by Euler's theorem each
node's value = Σ (gradient × value) over its sources + the value at all-zero sources (bias).

In *direct* mode the embeddings (input of block 0) and every MLP's neurons (input of its
down projection) are leaves: gradients then pass only through the residual stream and the
frozen attention, never through another MLP, which is what a graph edge measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from backend.runtime.hooks import Hook, embed_leaf, hooked, read_site
from backend.runtime.models import ModelHandle
from backend.runtime.norms import apply_frozen, norm_modules, norm_scale

GATE_LIMIT = 0.5  # act(z)/z as z -> 0 for SiLU and GELU (both tanh and erf forms)


@dataclass
class Frozen:
    """What the clean run froze, keyed by module id; tensors have batch dimension 1."""

    input_ids: torch.Tensor
    norm_scale: dict[int, torch.Tensor] = field(default_factory=dict)
    qk: dict[int, torch.Tensor] = field(default_factory=dict)
    gains: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)


@dataclass
class Leaves:
    """Values for the leaves of a direct-mode replay, each [B, P, ...]; None = the replayed
    clean value."""

    embed: torch.Tensor | None = None
    neurons: list[torch.Tensor | None] | None = None


@dataclass
class LinearRun:
    """One replayed forward. ``neurons[l]`` is layer l's linearized neuron value (in the
    autograd graph); ``neuron_inputs[l]`` is what the down projection received: the leaf in
    direct mode, else ``neurons[l]`` itself. ``embed`` is block 0's input (a leaf in either
    mode). ``final`` is the final-normed residual stream; ``logits`` the last position's
    logits before any soft-capping. ``heads[l]`` (if captured) is the o_proj input [B,P,H*hd];
    ``reads[l]`` (if captured) the residual stream layer l's MLP reads (its norm's input),
    and ``reads[L]`` the one the unembedding reads (the final norm's input)."""

    embed: torch.Tensor
    neurons: list[torch.Tensor]
    neuron_inputs: list[torch.Tensor]
    final: torch.Tensor
    logits: torch.Tensor
    heads: list[torch.Tensor] | None = None
    reads: list[torch.Tensor] | None = None


def _gains(act, g: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    a = act(g)
    ratio = torch.where(g != 0, a / torch.where(g != 0, g, torch.ones_like(g)), torch.full_like(g, GATE_LIMIT))
    if u is None:
        return ratio, None
    return ratio * u, a  # h = ½·k_g·g + ½·k_u·u


@torch.no_grad()
def record_frozen(handle: ModelHandle, input_ids: torch.Tensor, extra_hooks: list[Hook] | None = None) -> Frozen:
    """Run the clean prompt (batch 1) and keep the frozen quantities; ``extra_hooks`` may
    read more of the same clean run."""
    frozen = Frozen(input_ids=input_ids)
    mlp_inputs: dict[int, torch.Tensor] = {}

    def keep_norm(module, args, output):
        frozen.norm_scale[id(module)] = norm_scale(module, args[0])

    def keep_output(store: dict, module, args, output):
        store[id(module)] = output.detach()

    hooks = [Hook(m, "forward", keep_norm) for m in norm_modules(handle.adapter.base)]
    for parts in handle.adapter.layers:
        hooks += [Hook(module, "forward", partial(keep_output, frozen.qk)) for module, _ in parts.qk]
        hooks += [Hook(m, "forward", partial(keep_output, mlp_inputs)) for m in (parts.gate, parts.up) if m is not None]
    with hooked(handle, hooks + list(extra_hooks or [])):
        handle.adapter.base(input_ids, use_cache=False)
    for parts in handle.adapter.layers:
        up = mlp_inputs[id(parts.up)] if parts.up is not None else None
        frozen.gains.append(_gains(parts.act, mlp_inputs[id(parts.gate)], up))
    return frozen


class LinearReplay:
    """One replay of the frozen clean prompt. Its hooks keep their state on this object:
    the MLP inputs of the layer in progress, the neurons, leaves and captured tensors."""

    def __init__(self, handle: ModelHandle, frozen: Frozen, *, direct: bool, leaves: Leaves | None = None,
                 freeze_attention: bool = True, capture_heads: bool = False, capture_reads: bool = False) -> None:
        self.handle, self.frozen, self.direct = handle, frozen, direct
        self.leaves = leaves or Leaves()
        self.freeze_attention = freeze_attention
        n_layers = handle.adapter.n_layers
        self.mlp_inputs: dict[int, torch.Tensor] = {}
        self.neurons: list = [None] * n_layers
        self.neuron_inputs: list = [None] * n_layers
        self.heads: list | None = [None] * n_layers if capture_heads else None
        self.reads: list | None = [None] * (n_layers + 1) if capture_reads else None
        self.embed: torch.Tensor | None = None

    # ------------------------------------------------------------ hooks
    def _replay_norm(self, module, args, output):
        return apply_frozen(module, args[0], self.frozen.norm_scale[id(module)])

    def _replay_qk(self, mask: torch.Tensor | None, module, args, output):
        clean = self.frozen.qk[id(module)].expand_as(output)
        return clean if mask is None else torch.where(mask.to(output.device), clean, output)

    def _keep_mlp_input(self, module, args, output):
        self.mlp_inputs[id(module)] = output

    def _replay_neurons(self, layer: int, module, args):
        parts = self.handle.adapter.layers[layer]
        gain, up_gain = self.frozen.gains[layer]
        g = self.mlp_inputs[id(parts.gate)]
        value = gain * g if up_gain is None else 0.5 * gain * g + 0.5 * up_gain * self.mlp_inputs[id(parts.up)]
        self.neurons[layer] = value
        if self.direct:
            override = self.leaves.neurons[layer] if self.leaves.neurons is not None else None
            value = (value if override is None else override).detach().clone().requires_grad_(True)
        self.neuron_inputs[layer] = value
        return (value,) + tuple(args[1:])

    def _keep_embed(self, leaf: torch.Tensor) -> None:
        self.embed = leaf

    def _keep(self, store: list, index: int, tensor: torch.Tensor) -> None:
        store[index] = tensor

    def _mlp_hooks(self, layer: int) -> list[Hook]:
        """The MLP with its gains frozen; in direct mode its neurons are leaves."""
        parts = self.handle.adapter.layers[layer]
        hooks = [Hook(m, "forward", self._keep_mlp_input) for m in (parts.gate, parts.up) if m is not None]
        return hooks + [Hook(parts.down_proj, "pre", partial(self._replay_neurons, layer))]

    def hooks(self) -> list[Hook]:
        adapter = self.handle.adapter
        hooks = [Hook(m, "forward", self._replay_norm) for m in norm_modules(adapter.base)]
        hooks.append(embed_leaf(self.handle, keep=self._keep_embed, value=self.leaves.embed))
        for layer, parts in enumerate(adapter.layers):
            if self.freeze_attention:
                hooks += [Hook(module, "forward", partial(self._replay_qk, mask)) for module, mask in parts.qk]
            hooks += self._mlp_hooks(layer)
            if self.heads is not None:
                hooks.append(read_site(adapter.site("heads", layer), partial(self._keep, self.heads, layer)))
            if self.reads is not None:
                hooks.append(read_site(adapter.site("mlp_in", layer), partial(self._keep, self.reads, layer)))
        if self.reads is not None:
            hooks.append(read_site(adapter.site("final"), partial(self._keep, self.reads, adapter.n_layers)))
        return hooks

    def forward(self, batch: int = 1, extra_hooks: list[Hook] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The replay (with gradients): the final-normed residual stream and the last
        position's logits; ``extra_hooks`` run after the replay's own."""
        adapter = self.handle.adapter
        input_ids = self.frozen.input_ids.expand(batch, -1)
        with hooked(self.handle, self.hooks() + list(extra_hooks or [])), torch.enable_grad():
            final = adapter.base(input_ids, use_cache=False).last_hidden_state
            logits = adapter.unembed(final[:, -1])
        return final, logits

    def run(self, batch: int = 1, extra_hooks: list[Hook] | None = None) -> LinearRun:
        """The replay as a LinearRun (see ``forward``)."""
        final, logits = self.forward(batch, extra_hooks)
        return LinearRun(embed=self.embed, neurons=self.neurons, neuron_inputs=self.neuron_inputs, final=final,
                         logits=logits, heads=self.heads, reads=self.reads)


def linear_forward(handle: ModelHandle, frozen: Frozen, *, direct: bool, batch: int = 1, leaves: Leaves | None = None,
                   freeze_attention: bool = True, capture_heads: bool = False, capture_reads: bool = False,
                   extra_hooks: list[Hook] | None = None) -> LinearRun:
    """Replay the clean prompt through the frozen-gain linearization (see LinearReplay)."""
    replay = LinearReplay(handle, frozen, direct=direct, leaves=leaves, freeze_attention=freeze_attention,
                          capture_heads=capture_heads, capture_reads=capture_reads)
    return replay.run(batch, extra_hooks)
