"""A unit's dashboard: where it fires across the corpus, what it writes, what it is called.

Everything comes from the index (examples, bins, histogram, density) and from the weights
(logit effects: the unit's output direction through the final norm's weight and the
unembedding, see ``analyses.neurons.direction_logit_scores``), plus, when a prompt is
given, the unit's activation over that prompt beside its corpus range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backend.analyses.neurons import direction_logit_scores
from backend.runtime.cache import cache_named, cached
from backend.runtime.hooks import hooked
from backend.runtime.models import ModelHandle
from backend.runtime.prompts import encode_prompt, starts_with_special, token_texts
from backend.runtime.results import JsonResult
from backend.units import stats
from backend.units.index import UnitIndex
from backend.units.labels import auto_label
from backend.units.unitset import Neurons, UnitSet

N_LOGITS = 10


@dataclass
class UnitDashboard(JsonResult):
    model: str
    kind: str
    layer: int
    index: int
    name: str
    label: str  # the edited label when there is one, else the automatic one
    auto_label: str
    density: float  # fraction of indexed tokens with activation > 0
    max_act: float  # largest activation over the corpus
    top_examples: list[dict]  # {tokens, acts, max_act, max_pos, doc, start, text, sink}
    bin_examples: list[dict]  # the same, with {bin, low, high}; highest bin first
    histogram: dict
    top_logits: list[list]  # [[token, value]], most promoted first
    bottom_logits: list[list]
    prompt: dict | None  # {tokens, acts, max, max_pos} on the current prompt
    corpus: dict  # {title, tokens, documents, directory}


def unit_dashboard(handle: ModelHandle, index: UnitIndex, layer: int, unit: int, *,
                   units: UnitSet | None = None, prompt: str | None = None,
                   edited_label: str | None = None) -> UnitDashboard:
    units = units or Neurons.of(handle)
    units.check(layer, unit)
    top = [_example(handle, index, e) for e in index.examples("top", layer, unit)]
    top.sort(key=lambda e: -e["max_act"])
    max_act = top[0]["max_act"] if top else 0.0
    bins = _bin_examples(handle, index, layer, unit, max_act)
    top_logits, bottom_logits = logit_effects(handle, units, layer, unit)
    automatic = auto_label(top, [token for token, _ in top_logits])
    return UnitDashboard(
        model=handle.name, kind=units.kind, layer=layer, index=unit, name=units.name(layer, unit),
        label=edited_label or automatic, auto_label=automatic, density=index.density(layer, unit),
        max_act=max_act, top_examples=top, bin_examples=bins, histogram=index.histogram(layer, unit),
        top_logits=top_logits, bottom_logits=bottom_logits,
        prompt=None if not prompt else prompt_activation(handle, units, prompt, layer, unit),
        corpus={"title": index.meta.get("corpus_title", index.spec["corpus"]),
                "tokens": index.meta.get("tokens_indexed"), "documents": index.n_docs,
                "directory": str(index.directory)},
    )


def _example(handle: ModelHandle, index: UnitIndex, stored: dict) -> dict:
    """One stored example as the CLI and pages show it: the window's tokens and activations,
    and ``text``, the document up to the window's end (what "load as prompt" loads)."""
    ids = index.doc_ids(stored["doc"]).tolist()
    start, acts = stored["start"], stored["acts"]
    window = ids[start:start + len(acts)]
    skip = 1 if starts_with_special(handle, ids) else 0
    return {"tokens": token_texts(handle, window), "acts": [float(a) for a in acts],
            "max_act": stored["act"], "max_pos": stored["pos"] - start, "doc": stored["doc"], "start": start,
            "text": handle.tokenizer.decode(ids[skip:start + len(acts)]), "sink": start == 0 and skip == 1}


def _bin_examples(handle: ModelHandle, index: UnitIndex, layer: int, unit: int, max_act: float) -> list[dict]:
    found = []
    for stored in index.examples("bins", layer, unit):
        b = stored["slot"] // stats.PER_BIN
        found.append({**_example(handle, index, stored), "bin": b, "low": b * max_act / stats.N_BINS,
                      "high": (b + 1) * max_act / stats.N_BINS})
    return sorted(found, key=lambda e: (-e["bin"], -e["max_act"]))


def logit_effects(handle: ModelHandle, units: UnitSet, layer: int, unit: int,
                  k: int = N_LOGITS) -> tuple[list[list], list[list]]:
    """The k most promoted and most suppressed tokens by one unit of activation (direct path)."""
    scores = direction_logit_scores(handle, units.output_directions(handle, layer)[:, unit])
    scores = scores - scores.mean()  # a shift of every logit changes nothing
    top, bottom = scores.topk(k), scores.topk(k, largest=False)
    return ([[handle.tokenizer.decode([int(i)]), float(v)] for v, i in zip(top.values, top.indices)],
            [[handle.tokenizer.decode([int(i)]), float(v)] for v, i in zip(bottom.values, bottom.indices)])


_label_cache = cache_named("unit_labels", 50_000)


def auto_labels(handle: ModelHandle, index: UnitIndex, wanted: list[tuple[int, int]],
                units: UnitSet | None = None) -> dict[str, str]:
    """Automatic labels {name: label} of many units at once (cached per unit)."""
    units = units or Neurons.of(handle)
    labels, missing = {}, []
    for layer, unit in wanted:
        key = (str(index.directory), layer, unit)
        label = _label_cache.peek(key)
        if label is None:
            missing.append((layer, unit))
        else:
            labels[units.name(layer, unit)] = label
    by_layer: dict[int, list[int]] = {}
    for layer, unit in missing:
        by_layer.setdefault(layer, []).append(unit)
    for layer, unit_list in by_layer.items():
        with torch.no_grad():
            scores = direction_logit_scores(handle, units.output_directions(handle, layer)[:, unit_list])
            top = (scores - scores.mean(0)).topk(3, dim=0).indices  # [3, n]
        for column, unit in enumerate(unit_list):
            promoted = [handle.tokenizer.decode([int(i)]) for i in top[:, column]]
            examples = [_max_tokens(handle, index, e) for e in index.examples("top", layer, unit)]
            label = auto_label(examples, promoted)
            _label_cache.put((str(index.directory), layer, unit), label)
            labels[units.name(layer, unit)] = label
    return labels


def _max_tokens(handle: ModelHandle, index: UnitIndex, stored: dict) -> dict:
    """The token at an example's maximum and the one before it, in auto_label's format."""
    ids = index.doc_ids(stored["doc"])
    pos = stored["pos"]
    return {"tokens": token_texts(handle, [int(i) for i in ids[max(0, pos - 1):pos + 1]]), "max_pos": min(pos, 1)}


def unit_activations(handle: ModelHandle, units: UnitSet, prompt: str) -> tuple[list[str], np.ndarray]:
    """Every unit's activation over ``prompt``: tokens and [layers, positions, width] (cached)."""
    def compute() -> tuple[list[str], np.ndarray]:
        ids = encode_prompt(handle, prompt)
        kept: dict[int, torch.Tensor] = {}
        def record(layer: int, acts: torch.Tensor) -> None:
            kept[layer] = acts[0].float().cpu()

        with torch.no_grad(), hooked(handle, units.hooks(handle, record)):
            handle.adapter.base(handle.ids(ids), use_cache=False)
        return token_texts(handle, ids), np.stack([kept[layer].numpy() for layer in range(units.n_layers)])

    return cached(handle, "unit_activations", (units.key(), prompt), compute)


def prompt_activation(handle: ModelHandle, units: UnitSet, prompt: str, layer: int, unit: int) -> dict:
    tokens, acts = unit_activations(handle, units, prompt)
    values = acts[layer, :, unit]
    return {"tokens": tokens, "acts": values.tolist(), "max": float(values.max()), "max_pos": int(values.argmax())}
