"""The component forward: the model replayed with every receiver's input rebuilt from the
outputs of the components upstream of it, so each edge between components can be patched.

Senders are the input embeddings, every attention head and every MLP block; receivers are
every head, every MLP and the logits. A receiver's input is the sum of the outputs of the
senders upstream of it (constant biases are folded into the heads' outputs, and a
post-attention norm, as in Gemma, is split over the heads at its own scale), so an edge
s -> r is one term of that sum. Each head of a layer runs on its own copy of the residual
stream (attention runs once per head, batched), so every edge can be kept (this run's
sender output) or patched (another run's sender output) on its own. With every edge kept
it is the model's own forward. A run that patches nothing and takes no gradient needs no
copies: every head reads the same stream, so attention runs once and is only split at its
output projection (about a third of the time of the copied run).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from backend.causal.pairs import Metric
from backend.runtime.arch import parameter
from backend.runtime.hooks import Hook, edit_site, first_tensor, hooked
from backend.runtime.models import ModelHandle
from backend.runtime.norms import apply_frozen, norm_scale


@dataclass(frozen=True)
class Layout:
    """Senders and receivers in forward order; receiver r reads senders[:upstream[r]]."""

    senders: list[str]
    receivers: list[str]
    upstream: list[int]
    n_heads: int

    def allowed(self) -> np.ndarray:
        """[S, R] True where the edge exists."""
        return np.arange(len(self.senders))[:, None] < np.asarray(self.upstream)[None, :]

    def head_receivers(self, layer: int) -> int:
        return layer * (self.n_heads + 1)

    def mlp_receiver(self, layer: int) -> int:
        return layer * (self.n_heads + 1) + self.n_heads

    def receiver_of_sender(self) -> np.ndarray:
        """For each sender, its own receiver index (-1 for the input, which receives nothing)."""
        index = {name: i for i, name in enumerate(self.receivers)}
        return np.array([index.get(name, -1) for name in self.senders])


def layout(handle: ModelHandle) -> Layout:
    adapter = handle.adapter
    senders, receivers, upstream = ["input"], [], []
    for layer in range(adapter.n_layers):
        heads = [f"a{layer}.h{h}" for h in range(adapter.n_heads)]
        head_reads = len(senders)
        receivers += heads
        upstream += [head_reads] * adapter.n_heads
        senders += heads
        receivers.append(f"m{layer}")
        upstream.append(head_reads if adapter.parallel else len(senders))
        senders.append(f"m{layer}")
    receivers.append("logits")
    upstream.append(len(senders))
    return Layout(senders, receivers, upstream, adapter.n_heads)


@dataclass
class ComponentRun:
    outputs: torch.Tensor  # [S, P, d] sender outputs
    inputs: list[torch.Tensor]  # receiver inputs in order, grouped: heads [H,P,d] ([1,P,d] shared), MLP, logits [1,P,d]
    final_read: torch.Tensor  # [P, d] the final norm's input
    value: torch.Tensor  # the metric (scalar)


class ComponentReplay:
    """One component forward (batch 1). ``embed`` [1,P,d] replaces the input embeddings;
    ``keep`` [S,R,P] (1 = this run's sender output, 0 = ``corrupt_outputs``) patches edges
    (None keeps every edge). With grad mode on, the input is a leaf. ``shared``: the heads
    share one copy of the stream (only valid when nothing is patched and no receiver's
    gradient is wanted; then a head receiver's recorded input has batch 1, not H)."""

    def __init__(self, handle: ModelHandle, *, embed: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                 corrupt_outputs: torch.Tensor | None = None, shared: bool = False) -> None:
        if shared and keep is not None:
            raise ValueError("a patched run needs one stream per head")
        self.handle, self.layout = handle, layout(handle)
        self.embed, self.keep, self.corrupt_outputs = embed, keep, corrupt_outputs
        self.shared = shared
        self.outputs: list[torch.Tensor] = []
        self.totals: list[torch.Tensor] = []  # totals[n-1] = sum of outputs[:n]
        self.inputs: list[torch.Tensor] = []
        self.head_parts: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------ bookkeeping
    def _add_senders(self, values: torch.Tensor) -> None:
        for value in values:
            self.outputs.append(value)
            self.totals.append(value if not self.totals else self.totals[-1] + value)

    def _rebuild(self, first: int, count: int) -> torch.Tensor:
        """Inputs of receivers first .. first+count-1 (they share their upstream senders)."""
        n = self.layout.upstream[first]
        if self.keep is None:
            return self.totals[n - 1].unsqueeze(0).repeat(1 if self.shared else count, 1, 1)
        mask = self.keep[:n, first:first + count]
        this = torch.stack(self.outputs[:n])
        return torch.einsum("spd,scp->cpd", this, mask) + torch.einsum("spd,scp->cpd", self.corrupt_outputs[:n],
                                                                       1 - mask)

    def _receive(self, first: int, count: int, module, args):
        value = self._rebuild(first, count)
        self.inputs.append(value)
        return (value,) + tuple(args[1:])

    # ------------------------------------------------------------ hooks
    def _take_input(self, tensor: torch.Tensor) -> torch.Tensor:
        value = tensor if self.embed is None else self.embed.to(tensor.dtype)
        if torch.is_grad_enabled():
            value = value.detach().requires_grad_(True)
        self._add_senders(value[0].unsqueeze(0))
        return value

    def _split_heads(self, layer: int, module, args) -> None:
        adapter = self.handle.adapter
        n_heads = adapter.n_heads
        weight = adapter.o_proj_weight(layer).view(adapter.d_model, n_heads, adapter.head_dim)
        bias = parameter(adapter.layers[layer].o_proj, "bias")
        z = args[0].view(args[0].shape[0], args[0].shape[1], n_heads, adapter.head_dim)
        if self.shared:
            own = z[0].transpose(0, 1)  # the one copy's heads: [H, P, hd]
        else:
            own = z[torch.arange(n_heads), :, torch.arange(n_heads)]  # copy h, head h: [H, P, hd]
        parts = torch.einsum("hpk,dhk->hpd", own, weight)
        self.head_parts[layer] = parts if bias is None else parts + bias / n_heads

    def _sum_heads(self, layer: int, is_output: bool, module, args, output):
        total = self.head_parts[layer].sum(0, keepdim=True)
        if is_output:
            self._add_senders(self.head_parts[layer])
        return (total,) + tuple(output[1:]) if isinstance(output, tuple) else total

    def _post_norm_heads(self, layer: int, module, args, output):
        scale = norm_scale(module, args[0])
        parts = apply_frozen(module, self.head_parts[layer], scale, bias_share=1.0 / self.handle.adapter.n_heads)
        self._add_senders(parts)
        return parts.sum(0, keepdim=True)

    def _mlp_output(self, module, args, output) -> None:
        self._add_senders(first_tensor(output)[0].unsqueeze(0))

    def hooks(self) -> list[Hook]:
        adapter, lay = self.handle.adapter, self.layout
        hooks = [edit_site(adapter.site("resid_pre", 0), self._take_input)]
        for layer, parts in enumerate(adapter.layers):
            separate_post_norm = parts.attn_out is not parts.attn
            hooks += [
                Hook(parts.attn_norm, "pre", partial(self._receive, lay.head_receivers(layer), adapter.n_heads)),
                Hook(parts.o_proj, "pre", partial(self._split_heads, layer)),
                Hook(parts.attn, "forward", partial(self._sum_heads, layer, not separate_post_norm)),
                Hook(parts.mlp_norm, "pre", partial(self._receive, lay.mlp_receiver(layer), 1)),
                Hook(parts.mlp_out, "forward", self._mlp_output),
            ]
            if separate_post_norm:
                hooks.append(Hook(parts.attn_out, "forward", partial(self._post_norm_heads, layer)))
        hooks.append(Hook(adapter.final_norm, "pre", partial(self._receive, len(lay.receivers) - 1, 1)))
        return hooks

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The final-normed residual stream [1, P, d], recording the senders' outputs and the
        receivers' inputs (read them with ``measured``)."""
        with hooked(self.handle, self.hooks()):
            return self.handle.adapter.base(ids, use_cache=False).last_hidden_state

    def measured(self, final: torch.Tensor, metric: Metric) -> ComponentRun:
        """The run just forwarded, with ``metric`` read from its ``final`` stream (a caller may
        look at the stream first, e.g. to choose the metric's tokens)."""
        value = metric(self.handle, final)[0]
        return ComponentRun(torch.stack(self.outputs), self.inputs, self.inputs[-1][0], value)

    def run(self, ids: torch.Tensor, metric: Metric) -> ComponentRun:
        return self.measured(self.forward(ids), metric)


def component_forward(handle: ModelHandle, ids: torch.Tensor, metric: Metric, *, embed: torch.Tensor | None = None,
                      keep: torch.Tensor | None = None, corrupt_outputs: torch.Tensor | None = None) -> ComponentRun:
    """One component forward (see ComponentReplay); the heads share one stream when the run
    patches nothing and grad mode is off."""
    shared = keep is None and not torch.is_grad_enabled()
    return ComponentReplay(handle, embed=embed, keep=keep, corrupt_outputs=corrupt_outputs,
                           shared=shared).run(ids, metric)
