"""Tiny random models of every supported family, built from configs (no download).

Used by the unit tests and benchmarks: small enough for brute-force checks, with the same
module layout as the real architectures (GQA, qkv biases, Gemma post-norms, GPT-2 Conv1D,
GPT-NeoX parallel residual).
"""

from __future__ import annotations

import threading
from functools import lru_cache

import torch

from backend.runtime.arch import build_adapter
from backend.runtime.models import ModelHandle

FAMILIES = ("llama", "qwen2", "gemma2", "gemma3", "gpt2", "gpt_neox", "gpt_neox_sequential")
_CORPUS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "The opposite of hot is cold, and the opposite of up is down.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
]


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences (deterministic, ~300 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def tiny_config(family: str, vocab_size: int):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3)
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        return LlamaConfig(**common, **heads, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, **heads, tie_word_embeddings=False)
    if family == "gemma2":
        return Gemma2Config(**common, **heads, head_dim=8, sliding_window=4, query_pre_attn_scalar=8)
    if family == "gemma3":
        return Gemma3TextConfig(**common, **heads, head_dim=8, sliding_window=4, query_pre_attn_scalar=8)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    if family.startswith("gpt_neox"):
        return GPTNeoXConfig(
            **common,
            num_attention_heads=4,
            rotary_pct=0.5,
            use_parallel_residual=family == "gpt_neox",
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown tiny family {family!r}")


def tiny_handle(family: str, seed: int = 0) -> ModelHandle:
    """A fresh random fp32 model of ``family`` on the CPU, wrapped as a ModelHandle."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(family, len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _randomize_norms(model)
    model.eval().requires_grad_(False)
    return ModelHandle(
        name=f"tiny-{family}",
        model=model,
        tokenizer=tokenizer,
        adapter=build_adapter(model),
        device=torch.device("cpu"),
        lock=threading.RLock(),
    )


def _randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights/biases start at 1/0; perturb them so tests see their effect."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith(("ln_f.weight", "ln_f.bias")):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def recorded_alone(handle: ModelHandle, ids: list[int], module_of, pre: bool = False) -> dict[int, torch.Tensor]:
    """Run ``ids`` alone through the model with hooks registered directly on
    ``module_of(layer_parts)`` of every layer (not through the code under test); returns each
    layer's input (``pre``) or output, [positions, ...]."""
    seen: dict[int, torch.Tensor] = {}
    removers = []
    for layer, parts in enumerate(handle.adapter.layers):
        module = module_of(parts)
        if pre:
            removers.append(module.register_forward_pre_hook(
                lambda m, args, layer=layer: seen.__setitem__(layer, args[0][0].detach().clone())))
        else:
            removers.append(module.register_forward_hook(
                lambda m, args, out, layer=layer: seen.__setitem__(layer, out[0].detach().clone())))
    try:
        with torch.no_grad():
            handle.model(torch.tensor([ids]))
    finally:
        for remover in removers:
            remover.remove()
    return seen
