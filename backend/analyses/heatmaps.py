"""Layer x position heatmaps of one prompt, all from one cached forward pass, and the
drill-down behind a clicked cell.

Quantities (rows are labelled "emb" for the embeddings and "L{i}" for block i):
- ``target_prob``, ``target_rank``, ``second_prob``: logit lens of the target (and of a
  second token) on the residual stream after each block (lens.py);
- ``resid_norm``: L2 norm of the residual stream after each block (and of the embeddings);
- ``attn_norm``, ``mlp_norm``: L2 norm of what block i's attention / MLP adds;
- ``neuron``: activation of one chosen neuron (one row: its own layer).

Direct effects on the target use the model's own readout at that position: the final
norm's weight and its scale at the last block's output (frozen), and the unembedding of the
target minus the mean unembedding (so the effect is on logit - mean logit). For Gemma the
MLP/attention effects are taken before their post-norms (an approximation there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backend.analyses.lens import LensResult, logit_lens, row_labels
from backend.analyses.neurons import cached_trace
from backend.errors import UserInputError
from backend.runtime.cache import cached, is_cached
from backend.runtime.models import ModelHandle
from backend.runtime.norms import norm_scale, read_direction
from backend.runtime.prompts import encode_prompt, token_texts
from backend.runtime.results import JsonResult

QUANTITIES = ("target_prob", "target_rank", "second_prob", "resid_norm", "attn_norm", "mlp_norm", "neuron")
LENS_QUANTITIES = ("target_prob", "target_rank", "second_prob")


@dataclass
class Grid(JsonResult):
    quantity: str
    rows: list[str]
    tokens: list[str]
    values: np.ndarray  # [rows, positions]
    text: list[list[str]] | None = None  # the lens's top token per cell, where it applies


@dataclass
class CellDetail(JsonResult):
    layer: int  # block index; -1 for the embeddings row
    position: int
    lens_top: list[dict]  # {token, prob}: the logit lens's top 10 after this block
    neurons_by_activation: list[dict]  # {neuron, activation, effect}
    neurons_by_effect: list[dict]  # same rows, sorted by |direct effect on the target|
    heads_by_effect: list[dict]  # {head, effect}, sorted by |effect|


def _row_names(n_layers: int, with_embeddings: bool) -> list[str]:
    return row_labels(n_layers) if with_embeddings else [f"L{i}" for i in range(n_layers)]


def grid_labels(handle: ModelHandle, prompt: str, quantity: str,
                neuron: tuple[int, int] | None = None) -> tuple[list[str], list[str]]:
    """(row labels, tokens) of ``heatmap``'s grid, from the tokenizer alone (no forward)."""
    tokens = token_texts(handle, encode_prompt(handle, prompt))
    n_layers = handle.adapter.n_layers
    if quantity == "neuron":
        return [f"L{neuron[0]} N{neuron[1]}" if neuron else "neuron"], tokens
    return _row_names(n_layers, quantity not in ("attn_norm", "mlp_norm")), tokens


def heatmap_ready(handle: ModelHandle, prompt: str, quantity: str, target: str | None = None,
                  second: str | None = None) -> bool:
    """Whether ``heatmap`` would return at once (its forward pass is cached)."""
    if quantity in LENS_QUANTITIES:
        return is_cached(handle, "lens", (prompt, target, second))
    return is_cached(handle, "trace", (prompt,))


def heatmap(
    handle: ModelHandle,
    prompt: str,
    quantity: str,
    target: str | None = None,
    second: str | None = None,
    neuron: tuple[int, int] | None = None,
) -> Grid:
    """One layer x position grid of ``quantity`` for ``prompt`` (cached trace and lens)."""
    if quantity not in QUANTITIES:
        raise UserInputError(f"Unknown quantity '{quantity}'; choose one of {', '.join(QUANTITIES)}.")
    if quantity in LENS_QUANTITIES:  # the lens's own forward: no full trace
        if quantity == "second_prob" and not second:
            raise UserInputError("The second token's probability needs a second token.")
        lens = logit_lens(handle, prompt, target, second)
        values = {"target_prob": lens.target_prob, "target_rank": lens.target_rank, "second_prob": lens.second_prob}
        return Grid(quantity, lens.layers, lens.tokens, np.asarray(values[quantity], dtype=np.float32), lens.top_token)
    trace = cached_trace(handle, prompt)
    n_layers = handle.adapter.n_layers
    if quantity == "resid_norm":
        return Grid(quantity, _row_names(n_layers, True), trace.tokens, np.linalg.norm(trace.resid, axis=-1))
    if quantity in ("attn_norm", "mlp_norm"):
        source = trace.attn_out if quantity == "attn_norm" else trace.mlp_out
        return Grid(quantity, _row_names(n_layers, False), trace.tokens, np.linalg.norm(source, axis=-1))
    if neuron is None:
        raise UserInputError("The neuron heatmap needs a neuron: give its layer and index.")
    layer, index = neuron
    if not 0 <= layer < n_layers or not 0 <= index < handle.adapter.d_mlp:
        raise UserInputError(f"No neuron L{layer}/N{index} in this model.")
    return Grid(quantity, [f"L{layer} N{index}"], trace.tokens, trace.neurons[layer, :, index][None].copy())


@torch.no_grad()
def target_readout(handle: ModelHandle, prompt: str, target_id: int) -> np.ndarray:
    """Per position, the vector v with (direct effect of a write x on target) = v · x: [P, d]."""
    trace = cached_trace(handle, prompt)
    unembed = handle.adapter.unembed_weight()
    norm = handle.adapter.final_norm
    direction = read_direction(norm, unembed[target_id] - unembed.mean(0))
    scale = norm_scale(norm, torch.as_tensor(trace.resid[-1], device=direction.device))  # [P, 1]
    return (scale * direction).cpu().numpy()


def cell_detail(
    handle: ModelHandle, prompt: str, row: int, position: int, target: str | None = None, top: int = 10
) -> CellDetail:
    """Drill-down for heatmap row ``row`` (0 = embeddings, i + 1 = block i) at ``position``."""
    return cached(handle, "cell", (prompt, row, position, target, top),
                  lambda: _cell_detail(handle, prompt, row, position, target, top))


def _cell_detail(handle: ModelHandle, prompt: str, row: int, position: int, target: str | None, top: int) -> CellDetail:
    n_pos = len(encode_prompt(handle, prompt))
    n_layers = handle.adapter.n_layers
    if not 0 <= row <= n_layers or not 0 <= position < n_pos:
        raise UserInputError(f"No cell at row {row}, position {position}.")
    lens: LensResult = logit_lens(handle, prompt, target)
    lens_top = [
        {"token": t, "prob": float(p)}
        for t, p in zip(lens.top10_tokens[row][position], lens.top10_probs[row, position])
    ]
    layer = row - 1
    if layer < 0:
        return CellDetail(-1, position, lens_top, [], [], [])
    trace = cached_trace(handle, prompt)
    readout = target_readout(handle, prompt, lens.target["id"])[position]  # [d]
    down = handle.adapter.down_proj_weight(layer).detach().cpu().numpy()  # [d, d_mlp]
    acts = trace.neurons[layer, position]
    effects = acts * (readout @ down)
    by_activation = np.argsort(-np.abs(acts))[:top]
    by_effect = np.argsort(-np.abs(effects))[:top]
    head_effects = trace.head_out[layer, position] @ readout  # [H]
    return CellDetail(
        layer=layer,
        position=position,
        lens_top=lens_top,
        neurons_by_activation=[
            {"neuron": int(i), "activation": float(acts[i]), "effect": float(effects[i])} for i in by_activation
        ],
        neurons_by_effect=[
            {"neuron": int(i), "activation": float(acts[i]), "effect": float(effects[i])} for i in by_effect
        ],
        heads_by_effect=[{"head": int(h), "effect": float(head_effects[h])} for h in np.argsort(-np.abs(head_effects))],
    )


def compare_grids(first: Grid, second: Grid) -> Grid:
    """Difference (first - second) of the same quantity on two prompts of equal token length."""
    if first.values.shape != second.values.shape:
        raise UserInputError(
            f"The prompts have {len(first.tokens)} and {len(second.tokens)} tokens; comparison needs equal lengths."
        )
    tokens = [a if a == b else f"{a}|{b}" for a, b in zip(first.tokens, second.tokens)]
    return Grid(f"{first.quantity} (difference)", first.rows, tokens, first.values - second.values)


def attention_pattern(handle: ModelHandle, prompt: str, layer: int) -> np.ndarray:
    """All heads' attention patterns of ``layer``: [H, query, key]."""
    if not 0 <= layer < handle.adapter.n_layers:
        raise UserInputError(f"No layer {layer}: the model has layers 0..{handle.adapter.n_layers - 1}.")
    return cached_trace(handle, prompt).patterns[layer]
