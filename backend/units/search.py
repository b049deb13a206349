"""Search units: which fire on this token in this context, which promote this token.

* ``fires_on``: every unit's activation at one position of a text, ranked by that activation
  relative to the unit's largest activation over the corpus ("relative", the default: a unit
  at 90% of its corpus maximum is about this token more than one that is merely large), or by
  the raw activation ("raw"; used when no index exists).
* ``promotes``: every unit ranked by how much its typical strong activation (its corpus
  maximum) raises the token's logit through the direct path, relative to the mean logit
  effect over the vocabulary (a shift of every logit changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.analyses.neurons import centred_token_effects
from backend.errors import UserInputError
from backend.runtime.models import ModelHandle
from backend.runtime.prompts import resolve_token
from backend.runtime.results import JsonResult
from backend.units.dashboard import auto_labels, unit_activations
from backend.units.index import UnitIndex
from backend.units.unitset import Neurons, UnitSet

RANKS = ("relative", "raw")


@dataclass
class SearchResult(JsonResult):
    query: dict  # what was asked (text, position, token, rank)
    units: list[dict]  # {layer, neuron, name, activation, relative, score, label}, best first


def fires_on(handle: ModelHandle, text: str, position: int = -1, *, index: UnitIndex | None = None,
             units: UnitSet | None = None, rank: str = "relative", k: int = 50) -> SearchResult:
    units = units or Neurons.of(handle)
    if rank not in RANKS:
        raise UserInputError(f"Unknown ranking '{rank}'; choose {' or '.join(RANKS)}.")
    if rank == "relative" and index is None:
        raise UserInputError("Ranking by activation relative to the corpus needs the corpus index: build it "
                             "(python -m backend index) or rank raw activations (--rank raw).")
    tokens, acts = unit_activations(handle, units, text)
    if not -len(tokens) <= position < len(tokens):
        raise UserInputError(f"Position {position} is outside the text's {len(tokens)} tokens "
                             f"(0..{len(tokens) - 1}, or negative from the end).")
    at = acts[:, position, :]  # [layers, width]
    corpus_max = index.max_act() if index is not None else None
    relative = None if corpus_max is None else np.where(corpus_max > 0, at / np.maximum(corpus_max, 1e-30), -np.inf)
    score = relative if rank == "relative" else at
    order = np.argsort(-score, axis=None, kind="stable")[:k]
    found = []
    for flat in order:
        layer, unit = divmod(int(flat), units.width)
        found.append(_entry(units, layer, unit, activation=float(at[layer, unit]),
                            relative=None if relative is None else float(relative[layer, unit]),
                            score=float(score[layer, unit])))
    return SearchResult(query={"text": text, "position": position % len(tokens), "token": tokens[position],
                               "rank": rank}, units=found)


def promotes(handle: ModelHandle, token: str, *, index: UnitIndex | None = None, units: UnitSet | None = None,
             k: int = 50) -> SearchResult:
    units = units or Neurons.of(handle)
    token_id = resolve_token(handle, token)
    effect = np.stack([centred_token_effects(handle, token_id, units.output_directions(handle, layer)).float().cpu()
                       .numpy() for layer in range(units.n_layers)])  # [layers, width]
    scale = index.max_act() if index is not None else np.ones_like(effect)
    score = effect * np.maximum(scale, 0)
    order = np.argsort(-score, axis=None, kind="stable")[:k]
    found = [_entry(units, *divmod(int(flat), units.width), logit_effect=float(effect.flat[flat]),
                    corpus_max=None if index is None else float(scale.flat[flat]), score=float(score.flat[flat]))
             for flat in order]
    return SearchResult(query={"token": token, "token_id": token_id,
                               "rank": "corpus max x logit effect" if index is not None else "logit effect"},
                        units=found)


def _entry(units: UnitSet, layer: int, unit: int, **values) -> dict:
    return {"layer": layer, units.kind: unit, "name": units.name(layer, unit), **values, "label": ""}


def with_labels(handle: ModelHandle, result: SearchResult, index: UnitIndex | None, edited: dict[str, str],
                units: UnitSet | None = None) -> SearchResult:
    """Fill each unit's label: the user's edited one, else the automatic one (needs the index)."""
    units = units or Neurons.of(handle)
    automatic = {} if index is None else auto_labels(handle, index, [(u["layer"], u[units.kind]) for u in result.units],
                                                     units)
    for entry in result.units:
        entry["label"] = edited.get(entry["name"]) or automatic.get(entry["name"], "")
    return result
