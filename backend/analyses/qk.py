"""QK attribution: why a head attends from a query position to a key position.

With the norm scales frozen at the prompt's run, a head's pre-softmax score is bilinear in
the residual streams at the two positions:

    score(q, k) = scaling · Q(x_q) · K(x_k),   Q(x) = RoPE_q(qknorm(W_q norm(x) + b_q))

and each residual stream is the sum of the outputs of the components upstream of the head
(the input embeddings, every earlier head, every earlier MLP; ``causal.components``), so

    score = Σ_{c, c'} scaling · Q_c · K_c'   over c, c' in components + {bias}

where Q_c is c's output through the query map's linear part and "bias" the map's constant
(norm and projection biases). The terms sum to the score exactly (``residual`` reports the
float error). Gemma 2 caps scores with tanh after this point: ``score`` is the score before
the cap, ``capped`` after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backend.causal.components import ComponentReplay, layout
from backend.errors import UserInputError
from backend.runtime.attention import AttentionMaps, attention_maps
from backend.runtime.cache import cached
from backend.runtime.models import ModelHandle
from backend.runtime.prompts import encode_prompt, token_texts
from backend.runtime.results import JsonResult

BIAS = "bias"


@dataclass
class QKAttribution(JsonResult):
    layer: int
    head: int
    query: int
    key: int
    tokens: list[str]
    score: float  # scaling · q · k, before any soft-cap
    capped: float  # after Gemma 2's attention soft-cap (= score elsewhere)
    probability: float  # the model's attention weight from query to key
    terms: list[dict]  # {query, key, value}: the largest |value| pairs
    rest: float  # the sum of the pairs not listed
    residual: float  # score - (sum of every pair): float error only
    query_side: list[dict]  # {component, value}: each query-side component with the whole key side
    key_side: list[dict]  # {component, value}: each key-side component with the whole query side
    comparison: dict | None  # another key: {key, score, difference, terms, query_side, key_side}


def component_outputs(handle: ModelHandle, ids: list[int]) -> tuple[list[str], torch.Tensor]:
    """Names and outputs [S, P, d] of every sender (input embeddings, heads with their biases,
    MLPs) of the component forward (causal.components), which sum to each receiver's input."""
    def compute() -> tuple[list[str], torch.Tensor]:
        replay = ComponentReplay(handle, shared=True)
        with torch.no_grad():
            run = replay.run(handle.ids(ids), lambda handle, final: final.sum(-1))
        return layout(handle).senders, run.outputs.detach()

    return cached(handle, "component_outputs", (tuple(ids),), compute)


def _check(handle: ModelHandle, n_tokens: int, layer: int, head: int, query: int, key: int) -> None:
    adapter = handle.adapter
    if not 0 <= layer < adapter.n_layers:
        raise UserInputError(f"No layer {layer}: layers 0..{adapter.n_layers - 1}.")
    if not 0 <= head < adapter.n_heads:
        raise UserInputError(f"No head {head}: heads 0..{adapter.n_heads - 1}.")
    if not 0 <= query < n_tokens:
        raise UserInputError(f"Query position {query} is outside the prompt's {n_tokens} tokens (0..{n_tokens - 1}).")
    if not 0 <= key < n_tokens:
        raise UserInputError(f"Key position {key} is outside the prompt's {n_tokens} tokens (0..{n_tokens - 1}).")
    if key > query:
        raise UserInputError(f"Key position {key} comes after query position {query}: a causal head never "
                             "attends forward.")


def _side_parts(maps: AttentionMaps, outputs: torch.Tensor, layer: int, position: int, head: int,
                side: str) -> torch.Tensor:
    """[C + 1, hd]: each component's part of the head's query (or key) at ``position``, then the constant."""
    at = torch.tensor([position])
    vectors = outputs[:, position:position + 1, :]  # [C, 1, d]
    project = maps.queries if side == "q" else maps.keys
    parts = project(layer, vectors, at, include_bias=False)[:, 0]  # [C, H', hd]
    constant = project(layer, torch.zeros_like(vectors[:1]), at, include_bias=True)[:, 0]
    index = head if side == "q" else head // (maps.adapter.n_heads // maps.adapter.n_kv_heads)
    return torch.cat([parts, constant])[:, index]


def _summarize(terms: np.ndarray, names: list[str], top: int) -> dict:
    order = np.argsort(-np.abs(terms), axis=None, kind="stable")
    listed = [{"query": names[i], "key": names[j], "value": float(terms[i, j])}
              for i, j in (np.unravel_index(flat, terms.shape) for flat in order[:top])]
    query_side, key_side = terms.sum(1), terms.sum(0)
    return {
        "terms": listed,
        "rest": float(terms.sum() - sum(t["value"] for t in listed)),
        "query_side": [{"component": names[i], "value": float(query_side[i])}
                       for i in np.argsort(-np.abs(query_side), kind="stable")[:top]],
        "key_side": [{"component": names[i], "value": float(key_side[i])}
                     for i in np.argsort(-np.abs(key_side), kind="stable")[:top]],
    }


@torch.no_grad()
def qk_attribution(handle: ModelHandle, prompt: str, layer: int, head: int, query: int, key: int, *,
                   compare_key: int | None = None, top: int = 30) -> QKAttribution:
    """The score of ``head`` in ``layer`` from ``query`` to ``key`` as (query-side component) x
    (key-side component) terms; ``compare_key``: the same for another key, and the difference
    (why ``key`` over ``compare_key``). Negative positions count from the end."""
    ids = encode_prompt(handle, prompt)
    n = len(ids)
    query, key = query % n if query < 0 else query, key % n if key < 0 else key
    _check(handle, n, layer, head, query, key)
    if compare_key is not None:
        compare_key = compare_key % n if compare_key < 0 else compare_key
        _check(handle, n, layer, head, query, compare_key)
    maps = attention_maps(handle, ids)
    senders, outputs = component_outputs(handle, ids)
    upstream = layout(handle).upstream[layout(handle).head_receivers(layer)]
    names = senders[:upstream] + [BIAS]
    outputs = outputs[:upstream].to(maps.frozen[layer].resid.dtype)
    scaling = maps.scaling(layer)
    q_parts = _side_parts(maps, outputs, layer, query, head, "q")

    def pairs(key_position: int) -> np.ndarray:
        k_parts = _side_parts(maps, outputs, layer, key_position, head, "k")
        return (scaling * q_parts.double() @ k_parts.double().T).numpy()  # [C + 1, C + 1]

    terms = pairs(key)
    whole = _whole_score(maps, layer, head, query, key)
    cap = maps.softcap(layer)
    score = float(terms.sum())
    pattern = maps.frozen[layer].pattern
    comparison = None
    if compare_key is not None:
        other = pairs(compare_key)
        comparison = {"key": compare_key, "score": float(other.sum()), "difference": float(terms.sum() - other.sum()),
                      **_summarize(terms - other, names, top)}
    return QKAttribution(
        layer=layer, head=head, query=query, key=key, tokens=token_texts(handle, ids), score=score,
        capped=float(np.tanh(score / cap) * cap) if cap else score,
        probability=float(pattern[head, query, key]) if pattern is not None else float("nan"),
        residual=whole - score, comparison=comparison, **_summarize(terms, names, top),
    )


def _whole_score(maps: AttentionMaps, layer: int, head: int, query: int, key: int) -> float:
    """The score from the whole residual streams (not split), for the residual check."""
    resid = maps.frozen[layer].resid
    q = maps.queries(layer, resid[query:query + 1], torch.tensor([query]), include_bias=True)[0, head]
    kv = head // (maps.adapter.n_heads // maps.adapter.n_kv_heads)
    k = maps.keys(layer, resid[key:key + 1], torch.tensor([key]), include_bias=True)[0, kv]
    return float(maps.scaling(layer) * (q.double() @ k.double()))


def score_rows(maps: AttentionMaps, layer: int) -> torch.Tensor:
    """[H, P, P] every head's scores from the whole residual streams (causal entries only
    meaningful), through the same maps: what the model's softmax sees (before a soft-cap)."""
    resid = maps.frozen[layer].resid
    positions = torch.arange(resid.shape[0])
    q = maps.queries(layer, resid, positions, include_bias=True)  # [P, H, hd]
    k = maps.keys(layer, resid, positions, include_bias=True)  # [P, Hkv, hd]
    k = k.repeat_interleave(maps.adapter.n_heads // maps.adapter.n_kv_heads, dim=1)
    return maps.scaling(layer) * torch.einsum("qhd,khd->hqk", q, k)


def strongest_key(handle: ModelHandle, prompt: str, layer: int, head: int, query: int) -> int:
    """The key position ``head`` attends to most from ``query`` (the model's own weights)."""
    ids = encode_prompt(handle, prompt)
    _check(handle, len(ids), layer, head, query, 0)
    maps = attention_maps(handle, ids)
    return int(maps.frozen[layer].pattern[head, query].argmax())
