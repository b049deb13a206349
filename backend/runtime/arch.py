"""Architecture adapter: where each part of a supported causal LM lives.

Every analysis reads and edits models through this map, never through model-specific
attribute names. Supported families: Llama (Llama, Mistral, Qwen2/3, SmolLM), Gemma 2/3,
GPT-2 and GPT-NeoX (Pythia; parallel attention + MLP).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from backend.errors import UserInputError

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "smollm3"}
GEMMA_LIKE = {"gemma2", "gemma3_text", "gemma3"}


@dataclass(frozen=True)
class LayerParts:
    """One transformer block.

    attn: the attention module (returns ``(output, weights)``; weights need eager attention).
    attn_out: the module whose output is what attention adds to the residual stream.
    o_proj: the output projection; its input is the heads' outputs concatenated.
    mlp_out: the module whose output is what the MLP adds to the residual stream.
    down_proj: the MLP's last projection; its input is the neuron activations.
    qk: modules whose outputs hold the queries and keys, each with a boolean mask over the
        last dimension marking the query/key part (None = the whole output). Freezing these
        outputs freezes the attention pattern and leaves the value path live.
    gate: the MLP's first projection (gate_proj, or c_fc / dense_h_to_4h when not gated).
    up: the up projection of a gated MLP (None otherwise).
    act: the MLP nonlinearity; neurons = act(gate(x)) * up(x), or act(gate(x)).
    mlp_norm: the norm in front of the MLP; its input is the residual stream the MLP reads.
    attn_norm: the norm in front of attention; its input is the residual stream attention reads.
    """

    block: nn.Module
    attn: nn.Module
    attn_out: nn.Module
    o_proj: nn.Module
    mlp: nn.Module
    mlp_out: nn.Module
    down_proj: nn.Module
    qk: tuple[tuple[nn.Module, torch.Tensor | None], ...]
    gate: nn.Module
    up: nn.Module | None
    act: Callable[[torch.Tensor], torch.Tensor]
    mlp_norm: nn.Module
    attn_norm: nn.Module


# Named places in the model where a tensor can be read or edited (see ArchAdapter.site):
SITES = {
    "resid_pre": "the residual stream entering block l (its input)",
    "attn_in": "the residual stream attention reads (its norm's input)",
    "heads": "the heads' outputs, concatenated (the output projection's input)",
    "attn_out": "what attention adds to the residual stream",
    "mlp_in": "the residual stream the MLP reads (its norm's input)",
    "mlp_normed": "the MLP's input after its norm (what transcoders read)",
    "neurons": "the MLP neurons (the down projection's input)",
    "mlp_out": "what the MLP adds to the residual stream",
    "final": "the residual stream the unembedding reads (the final norm's input); layer ignored",
}


@dataclass(frozen=True)
class Site:
    """A tensor in the forward pass: the first input ("pre") or the output ("forward") of ``module``."""

    name: str
    layer: int
    module: nn.Module
    kind: str


@dataclass(frozen=True)
class ArchAdapter:
    """``base`` is the decoder stack: its output is the final-normed residual stream."""

    family: str
    base: nn.Module
    embed: nn.Module
    layers: tuple[LayerParts, ...]
    final_norm: nn.Module
    unembed: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_mlp: int
    parallel: bool
    gated: bool
    final_softcap: float | None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def site(self, name: str, layer: int = 0) -> Site:
        """The named site (see SITES) of block ``layer``."""
        if name == "final":
            return Site(name, self.n_layers, self.final_norm, "pre")
        parts = self.layers[layer]
        module, kind = {
            "resid_pre": (parts.block, "pre"),
            "attn_in": (parts.attn_norm, "pre"),
            "heads": (parts.o_proj, "pre"),
            "attn_out": (parts.attn_out, "forward"),
            "mlp_in": (parts.mlp_norm, "pre"),
            "mlp_normed": (parts.mlp_norm, "forward"),
            "neurons": (parts.down_proj, "pre"),
            "mlp_out": (parts.mlp_out, "forward"),
        }[name]
        return Site(name, layer, module, kind)

    def o_proj_weight(self, layer: int) -> torch.Tensor:
        """Output projection as a [d_model, n_heads * head_dim] matrix."""
        return _linear_weight(self.layers[layer].o_proj)

    def down_proj_weight(self, layer: int) -> torch.Tensor:
        """MLP down projection as a [d_model, d_mlp] matrix: column i = neuron i's output direction."""
        return _linear_weight(self.layers[layer].down_proj)

    def unembed_weight(self) -> torch.Tensor:
        """Unembedding as a [vocab, d_model] matrix."""
        return _linear_weight(self.unembed)

    def logits_from_residual(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding and (Gemma 2) logit soft-capping: the model's own readout."""
        return self.logits_from_residual_normed(self.final_norm(resid))

    def logits_from_residual_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """Unembedding and soft-capping of an already final-normed residual stream."""
        logits = self.unembed(normed)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def parameter(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """A module's parameter as a real tensor, also when Accelerate offloaded it to disk or CPU
    (a sharded model keeps it on the meta device): then loaded for this read and copied."""
    value = getattr(module, name, None)
    if value is None or value.device.type != "meta":
        return value
    from accelerate.utils import align_module_device

    with align_module_device(module):
        return getattr(module, name).detach().clone()


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """Weight as [out, in] for both nn.Linear and GPT-2's Conv1D (stored [in, out])."""
    weight = parameter(module)
    return weight.T if type(module).__name__ == "Conv1D" else weight


def build_adapter(model: nn.Module) -> ArchAdapter:
    """Map a transformers causal LM onto the adapter, or raise UserInputError if unsupported."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if model_type in LLAMA_LIKE or model_type in GEMMA_LIKE:
        return _llama_or_gemma(model, text_config, gemma=model_type in GEMMA_LIKE)
    if model_type == "gpt2":
        return _gpt2(model, config)
    if model_type == "gpt_neox":
        return _gpt_neox(model, config)
    raise UserInputError(
        f"Architecture '{model_type}' is not supported; supported: "
        f"{', '.join(sorted(LLAMA_LIKE | GEMMA_LIKE | {'gpt2', 'gpt_neox'}))}."
    )


def _llama_or_gemma(model: nn.Module, config, gemma: bool) -> ArchAdapter:
    base = model.model.language_model if hasattr(model.model, "language_model") else model.model
    layers = tuple(
        LayerParts(
            block=layer,
            attn=layer.self_attn,
            attn_out=layer.post_attention_layernorm if gemma else layer.self_attn,
            o_proj=layer.self_attn.o_proj,
            mlp=layer.mlp,
            mlp_out=layer.post_feedforward_layernorm if gemma else layer.mlp,
            down_proj=layer.mlp.down_proj,
            qk=((layer.self_attn.q_proj, None), (layer.self_attn.k_proj, None)),
            gate=layer.mlp.gate_proj,
            up=layer.mlp.up_proj,
            act=layer.mlp.act_fn,
            mlp_norm=layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm,
            attn_norm=layer.input_layernorm,
        )
        for layer in base.layers
    )
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return ArchAdapter(
        family="gemma" if gemma else "llama",
        base=base,
        embed=base.embed_tokens,
        layers=layers,
        final_norm=base.norm,
        unembed=model.lm_head,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
        parallel=False,
        gated=True,
        final_softcap=getattr(config, "final_logit_softcapping", None),
    )


def _gpt2(model: nn.Module, config) -> ArchAdapter:
    base = model.transformer
    d_model = config.n_embd
    qk_mask = torch.arange(3 * d_model) < 2 * d_model  # c_attn output = [q | k | v]
    layers = tuple(
        LayerParts(
            block=block,
            attn=block.attn,
            attn_out=block.attn,
            o_proj=block.attn.c_proj,
            mlp=block.mlp,
            mlp_out=block.mlp,
            down_proj=block.mlp.c_proj,
            qk=((block.attn.c_attn, qk_mask),),
            gate=block.mlp.c_fc,
            up=None,
            act=block.mlp.act,
            mlp_norm=block.ln_2,
            attn_norm=block.ln_1,
        )
        for block in base.h
    )
    return ArchAdapter(
        family="gpt2",
        base=base,
        embed=base.wte,
        layers=layers,
        final_norm=base.ln_f,
        unembed=model.lm_head,
        n_heads=config.n_head,
        n_kv_heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        d_model=config.n_embd,
        d_mlp=config.n_inner or 4 * config.n_embd,
        parallel=False,
        gated=False,
        final_softcap=None,
    )


def _gpt_neox(model: nn.Module, config) -> ArchAdapter:
    base = model.gpt_neox
    head_dim = config.hidden_size // config.num_attention_heads
    # query_key_value output, viewed per head, is [q | k | v] of head_dim each
    qk_mask = (torch.arange(3 * config.hidden_size) % (3 * head_dim)) < 2 * head_dim
    layers = tuple(
        LayerParts(
            block=layer,
            attn=layer.attention,
            attn_out=layer.attention,
            o_proj=layer.attention.dense,
            mlp=layer.mlp,
            mlp_out=layer.mlp,
            down_proj=layer.mlp.dense_4h_to_h,
            qk=((layer.attention.query_key_value, qk_mask),),
            gate=layer.mlp.dense_h_to_4h,
            up=None,
            act=layer.mlp.act,
            mlp_norm=layer.post_attention_layernorm,
            attn_norm=layer.input_layernorm,
        )
        for layer in base.layers
    )
    return ArchAdapter(
        family="gpt_neox",
        base=base,
        embed=base.embed_in,
        layers=layers,
        final_norm=base.final_layer_norm,
        unembed=model.embed_out if hasattr(model, "embed_out") else model.lm_head,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_attention_heads,
        head_dim=head_dim,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
        parallel=bool(config.use_parallel_residual),
        gated=False,
        final_softcap=None,
    )
