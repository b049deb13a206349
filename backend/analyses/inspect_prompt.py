"""Prompt inspector: tokens, next-token distribution, the target's probability and rank,
and a greedy continuation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.runtime.cache import cached
from backend.runtime.models import ModelHandle
from backend.runtime.prompts import encode_prompt, resolve_token, token_text, token_texts
from backend.runtime.results import JsonResult


@dataclass
class PromptInspection(JsonResult):
    model: str
    prompt: str
    tokens: list[str]
    token_ids: list[int]
    top_predictions: list[dict]  # {token, id, prob}, most likely first
    target: dict  # {token, id, prob, rank}; rank 1 = top prediction
    continuation: str
    continuation_tokens: list[str]


def top_k(handle: ModelHandle, probs: torch.Tensor, k: int) -> list[dict]:
    values, ids = probs.topk(k)
    return [
        {"token": token_text(handle, int(i)), "id": int(i), "prob": float(v)} for v, i in zip(values, ids)
    ]


def target_summary(handle: ModelHandle, probs: torch.Tensor, target_id: int) -> dict:
    """Probability and 1-based rank of ``target_id`` under ``probs`` ([vocab])."""
    prob = probs[target_id]
    rank = int((probs > prob).sum()) + 1
    return {"token": token_text(handle, target_id), "id": target_id, "prob": float(prob), "rank": rank}


def choose_target(handle: ModelHandle, probs: torch.Tensor, target: str | None) -> int:
    """The typed target's id, or the top prediction when none is given."""
    return resolve_token(handle, target) if target else int(probs.argmax())


@torch.no_grad()
def greedy_continuation(handle: ModelHandle, ids: list[int], n_tokens: int) -> list[int]:
    if n_tokens <= 0:
        return []
    with handle.lock:
        out = handle.model.generate(
            torch.tensor([ids], device=handle.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=handle.device),
            max_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=handle.tokenizer.pad_token_id or handle.tokenizer.eos_token_id,
        )
    return out[0, len(ids):].tolist()


@torch.no_grad()
def _inspect(handle: ModelHandle, prompt: str, target: str | None, n_continue: int, top: int) -> PromptInspection:
    ids = encode_prompt(handle, prompt)
    logits = handle.logits(handle.ids(ids))[0, -1]
    probs = logits.float().softmax(-1)
    target_id = choose_target(handle, probs, target)
    continuation = greedy_continuation(handle, ids, n_continue)
    return PromptInspection(
        model=handle.name,
        prompt=prompt,
        tokens=token_texts(handle, ids),
        token_ids=ids,
        top_predictions=top_k(handle, probs, top),
        target=target_summary(handle, probs, target_id),
        continuation=handle.tokenizer.decode(continuation),
        continuation_tokens=token_texts(handle, continuation),
    )


def inspect_prompt(
    handle: ModelHandle, prompt: str, target: str | None = None, n_continue: int = 10, top: int = 20
) -> PromptInspection:
    """Inspect ``prompt`` (cached by model, prompt and settings)."""
    return cached(
        handle, "inspect", (prompt, target, n_continue, top), lambda: _inspect(handle, prompt, target, n_continue, top)
    )
