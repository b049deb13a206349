"""An independent forward pass of the Llama and GPT-2 families, written from the weights in
plain torch (no hooks, nothing from backend.runtime), with the frozen-gain linearization
applied by hand. Tests compare our graphs and relevance patching against it.

``ManualModel(model, family)``; ``clean(ids)`` runs the real computation and records what
the linearization freezes (attention probabilities, norm scales, MLP gains); ``run(...)``
replays linearly: every norm with its clean scale, attention with its clean
probabilities (``frozen_attention``) or live, every MLP nonlinearity by the identity rule
(gated: half to the gate, half to the up branch). ``neurons`` given per layer replace the
MLP activations (the leaves of direct mode); ``mlp_outputs(layer, h)`` given replaces each
MLP's output by a function of its normed input h (a transcoder); ``taps`` add zeros that require grad at
resid_pre / attn_out / mlp_out of each layer, so gradients there can be taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Clean:
    probs: list[torch.Tensor] = field(default_factory=list)  # per layer [H, P, P]
    scores: list[torch.Tensor] = field(default_factory=list)  # per layer [H, P, P] pre-softmax (scaled), unmasked
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # norm name -> [P, 1]
    gains: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)


@dataclass
class Out:
    logits: torch.Tensor  # [P, vocab] (no soft-capping)
    neurons: list[torch.Tensor]  # per layer [P, d_mlp] linearized values (before any replacement)
    taps: dict[tuple[str, int], torch.Tensor]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([-b, a], dim=-1)


class ManualModel:
    def __init__(self, model, family: str) -> None:
        assert family in ("llama", "gpt2")
        self.model, self.family, self.config = model, family, model.config

    # ------------------------------------------------------------ pieces
    def _norm(self, name: str, x: torch.Tensor, weight, bias, eps: float, clean: Clean | None, record: Clean | None):
        centred = x - x.mean(-1, keepdim=True) if self.family == "gpt2" else x
        if clean is not None:
            scale = clean.scales[name]
        else:
            scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
            if record is not None:
                record.scales[name] = scale.detach()
        y = centred * scale * weight
        return y + bias if bias is not None else y

    def _llama_attention(self, layer: int, h: torch.Tensor, clean, record, frozen_attention: bool):
        attn, cfg = self.model.model.layers[layer].self_attn, self.config
        n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        P = h.shape[0]
        q = (h @ attn.q_proj.weight.T + (attn.q_proj.bias if attn.q_proj.bias is not None else 0)).view(P, n_heads, hd)
        k = (h @ attn.k_proj.weight.T + (attn.k_proj.bias if attn.k_proj.bias is not None else 0)).view(P, n_kv, hd)
        v = (h @ attn.v_proj.weight.T + (attn.v_proj.bias if attn.v_proj.bias is not None else 0)).view(P, n_kv, hd)
        theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        angles = torch.arange(P, dtype=torch.float32)[:, None] * inv_freq[None]
        cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(n_heads // n_kv, dim=1), v.repeat_interleave(n_heads // n_kv, dim=1)
        probs = self._probs(layer, q, k, clean, record, frozen_attention)
        z = torch.einsum("hqk,khd->qhd", probs, v).reshape(P, n_heads * hd)
        return z, z @ attn.o_proj.weight.T

    def _gpt2_attention(self, layer: int, h: torch.Tensor, clean, record, frozen_attention: bool):
        attn, cfg = self.model.transformer.h[layer].attn, self.config
        P, n_heads = h.shape[0], cfg.n_head
        hd = cfg.n_embd // n_heads
        q, k, v = (h @ attn.c_attn.weight + attn.c_attn.bias).split(cfg.n_embd, dim=-1)
        q, k, v = (t.view(P, n_heads, hd) for t in (q, k, v))
        probs = self._probs(layer, q, k, clean, record, frozen_attention)
        z = torch.einsum("hqk,khd->qhd", probs, v).reshape(P, cfg.n_embd)
        return z, z @ attn.c_proj.weight + attn.c_proj.bias

    def _probs(self, layer, q, k, clean, record, frozen_attention):
        if clean is not None and frozen_attention:
            return clean.probs[layer]
        P, hd = q.shape[0], q.shape[-1]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        if record is not None:
            record.scores.append(scores.detach())
        scores = scores.masked_fill(torch.triu(torch.ones(P, P, dtype=torch.bool), 1), float("-inf"))
        probs = scores.softmax(-1)
        if record is not None:
            record.probs.append(probs.detach())
        return probs

    def _mlp(self, layer: int, h: torch.Tensor, clean, record):
        if self.family == "llama":
            mlp = self.model.model.layers[layer].mlp
            g, u = h @ mlp.gate_proj.weight.T, h @ mlp.up_proj.weight.T
            if clean is None:
                a = F.silu(g) * u
                if record is not None:
                    record.gains.append(((F.silu(g) / g * u).detach(), F.silu(g).detach()))
                return a
            k_gate, k_up = clean.gains[layer]
            return 0.5 * k_gate * g + 0.5 * k_up * u
        mlp = self.model.transformer.h[layer].mlp
        z = h @ mlp.c_fc.weight + mlp.c_fc.bias
        if clean is None:
            a = mlp.act(z)
            if record is not None:
                record.gains.append(((mlp.act(z) / z).detach(), None))
            return a
        return clean.gains[layer][0] * z

    def _down(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        if self.family == "llama":
            return a @ self.model.model.layers[layer].mlp.down_proj.weight.T
        mlp = self.model.transformer.h[layer].mlp
        return a @ mlp.c_proj.weight + mlp.c_proj.bias

    # ------------------------------------------------------------ whole passes
    def embed(self, ids: list[int]) -> torch.Tensor:
        if self.family == "llama":
            return self.model.model.embed_tokens.weight[ids]
        return self.model.transformer.wte.weight[ids] + self.model.transformer.wpe.weight[: len(ids)]

    def _forward(self, x: torch.Tensor, clean: Clean | None, record: Clean | None, frozen_attention: bool = True,
                 neurons: dict[int, torch.Tensor] | None = None, taps: bool = False,
                 mlp_outputs=None) -> Out:
        kept, tapped = [], {}
        self.sites: dict[tuple[str, int], torch.Tensor] = {}

        def tap(name: str, layer: int, t: torch.Tensor) -> torch.Tensor:
            self.sites[(name, layer)] = t.detach()
            if not taps:
                return t
            zero = torch.zeros_like(t, requires_grad=True)
            tapped[(name, layer)] = zero
            return t + zero

        for layer in range(self.config.num_hidden_layers):
            x = tap("resid_pre", layer, x)
            if self.family == "llama":
                block = self.model.model.layers[layer]
                h = self._norm(
                    f"in{layer}",
                    x,
                    block.input_layernorm.weight,
                    None,
                    block.input_layernorm.variance_epsilon,
                    clean,
                    record,
                )
                _, attn_out = self._llama_attention(layer, h, clean, record, frozen_attention)
                x = x + tap("attn_out", layer, attn_out)
                post = block.post_attention_layernorm
                h2 = self._norm(f"post{layer}", x, post.weight, None, post.variance_epsilon, clean, record)
            else:
                block = self.model.transformer.h[layer]
                h = self._norm(f"ln1_{layer}", x, block.ln_1.weight, block.ln_1.bias, block.ln_1.eps, clean, record)
                _, attn_out = self._gpt2_attention(layer, h, clean, record, frozen_attention)
                x = x + tap("attn_out", layer, attn_out)
                h2 = self._norm(f"ln2_{layer}", x, block.ln_2.weight, block.ln_2.bias, block.ln_2.eps, clean, record)
            a = self._mlp(layer, h2, clean, record)
            kept.append(a)
            if neurons is not None and layer in neurons:
                a = neurons[layer]
            out = self._down(layer, a) if mlp_outputs is None else mlp_outputs(layer, h2)
            x = x + tap("mlp_out", layer, out)
        if self.family == "llama":
            norm = self.model.model.norm
            final = self._norm("final", x, norm.weight, None, norm.variance_epsilon, clean, record)
        else:
            norm = self.model.transformer.ln_f
            final = self._norm("final", x, norm.weight, norm.bias, norm.eps, clean, record)
        return Out(final @ self.model.lm_head.weight.T, kept, tapped)

    def clean(self, ids: list[int]) -> tuple[Clean, Out]:
        """The real forward; records the frozen quantities, and ``sites`` holds the values at
        resid_pre / attn_out / mlp_out of each layer."""
        record = Clean()
        with torch.no_grad():
            out = self._forward(self.embed(ids), None, record)
        return record, out

    def run(self, clean: Clean, embed: torch.Tensor, *, frozen_attention: bool = True,
            neurons: dict[int, torch.Tensor] | None = None, taps: bool = False, mlp_outputs=None) -> Out:
        return self._forward(embed, clean, None, frozen_attention, neurons, taps, mlp_outputs)
