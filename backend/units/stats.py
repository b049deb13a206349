"""Streaming per-unit statistics of one layer, updated batch by batch (pure torch, no model).

For every unit of the layer, over all documents seen so far:

* ``top``: the TOP documents with the largest per-document maximum activation (one example
  per document, as Neuronpedia shows them), each with the position of that maximum and a
  window of WINDOW activations around it (int8, scaled by the window's largest magnitude).
* ``bins``: for each of N_BINS equal-width activation bins (0, 0.2 max], ..., (0.8 max, max]
  (max = the unit's largest activation), up to PER_BIN documents whose maximum falls in it,
  chosen by bottom-k sampling with a fixed pseudo-random key per (document, unit). A
  document's bin is recomputed whenever the running maximum grows, so every reported
  example lies in its bin of the final maximum; samples are uniform among the documents seen
  after the maximum last moved them (documents dropped from a bin earlier are not recalled).
* ``hist``: counts of all token activations in signed log10 bins (HIST_PER_DECADE per
  decade from 10^HIST_LOG_MIN to 10^HIST_LOG_MAX, magnitudes outside clipped to the end
  bins, smaller magnitudes in one central "about zero" bin).
* ``active``: how many tokens had an activation > 0; ``tokens``: how many tokens were seen.

Invalid positions (padding, and the document-start token, the attention sink) never count.
Everything is deterministic given the batches, so a resumed build equals an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

TOP = 20
N_BINS = 5
PER_BIN = 5
WINDOW = 32
BEFORE = 23  # window = positions [max_pos - BEFORE, max_pos - BEFORE + WINDOW), clipped at 0
HIST_LOG_MIN, HIST_LOG_MAX, HIST_PER_DECADE = -2, 3, 10
HIST_SIDE = (HIST_LOG_MAX - HIST_LOG_MIN) * HIST_PER_DECADE
HIST_BINS = 2 * HIST_SIDE + 1


@dataclass
class Examples:
    """Slots of examples, [slots, units] (q: [slots, WINDOW, units]). Empty slots: doc = -1."""

    act: torch.Tensor  # float32, the document's maximum activation
    doc: torch.Tensor  # int32, document index in the index's token store
    pos: torch.Tensor  # int32, position of the maximum in the document
    start: torch.Tensor  # int32, first position of the window
    scale: torch.Tensor  # float32, window value = q * scale
    q: torch.Tensor  # int8 [slots, WINDOW, units]
    key: torch.Tensor  # float32 sampling key (used by the bins)

    @classmethod
    def empty(cls, slots: int, units: int) -> Examples:
        return cls(
            act=torch.full((slots, units), float("-inf")),
            doc=torch.full((slots, units), -1, dtype=torch.int32),
            pos=torch.zeros(slots, units, dtype=torch.int32),
            start=torch.zeros(slots, units, dtype=torch.int32),
            scale=torch.zeros(slots, units),
            q=torch.zeros(slots, WINDOW, units, dtype=torch.int8),
            key=torch.full((slots, units), float("inf")),
        )

    def cat(self, other: Examples) -> Examples:
        return Examples(**{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)])
                           for f in fields(self)})

    def take(self, index: torch.Tensor) -> Examples:
        """Rows ``index`` [k, units] of every field (per unit)."""
        picked = {f.name: getattr(self, f.name).gather(0, index) for f in fields(self) if f.name != "q"}
        picked["q"] = self.q.gather(0, index[:, None, :].expand(-1, WINDOW, -1))
        return Examples(**picked)


@dataclass
class LayerStats:
    layer: int
    top: Examples
    bins: Examples  # N_BINS * PER_BIN slots, bin b in slots [b * PER_BIN, (b + 1) * PER_BIN)
    hist: torch.Tensor  # int64 [HIST_BINS, units]
    active: torch.Tensor  # int64 [units]
    tokens: int = 0

    @classmethod
    def empty(cls, layer: int, units: int) -> LayerStats:
        return cls(layer=layer, top=Examples.empty(TOP, units), bins=Examples.empty(N_BINS * PER_BIN, units),
                   hist=torch.zeros(HIST_BINS, units, dtype=torch.int64),
                   active=torch.zeros(units, dtype=torch.int64))

    def update(self, acts: torch.Tensor, valid: torch.Tensor, docs: torch.Tensor) -> None:
        """Fold in a batch: ``acts`` [B, P, units], ``valid`` [B, P] bool, ``docs`` [B] document indices."""
        acts = acts.detach().float()
        candidates = document_maxima(acts, valid, docs, self.layer)
        self.top = select_top(self.top.cat(candidates))
        self.bins = select_bins(self.bins.cat(candidates), running_max=self.top.act[0])
        values = acts[valid]  # [tokens, units]
        self.hist += histogram(values)
        self.active += (values > 0).sum(0)
        self.tokens += int(values.shape[0])


def document_maxima(acts: torch.Tensor, valid: torch.Tensor, docs: torch.Tensor, layer: int) -> Examples:
    """One candidate example per (document, unit): the maximum over valid positions."""
    batch, positions, units = acts.shape
    masked = acts.masked_fill(~valid[:, :, None], float("-inf"))
    act, pos = masked.max(dim=1)  # [B, units]
    start = (pos - BEFORE).clamp(min=0)
    padded = torch.cat([acts.masked_fill(~valid[:, :, None], 0.0), acts.new_zeros(batch, WINDOW, units)], dim=1)
    offsets = torch.arange(WINDOW)[None, :, None]
    window = padded.gather(1, start[:, None, :] + offsets)  # [B, WINDOW, units]
    scale = (window.abs().amax(dim=1) / 127).clamp(min=1e-30)
    q = (window / scale[:, None, :]).round().clamp(-127, 127).to(torch.int8)
    doc = docs.to(torch.int32)[:, None].expand(batch, units)
    has_valid = valid.any(dim=1)[:, None].expand(batch, units)
    return Examples(
        act=act.masked_fill(~has_valid, float("-inf")),
        doc=doc.masked_fill(~has_valid, -1).contiguous(),
        pos=pos.to(torch.int32), start=start.to(torch.int32), scale=scale, q=q,
        key=sampling_key(docs, layer, units),
    )


def sampling_key(docs: torch.Tensor, layer: int, units: int) -> torch.Tensor:
    """A fixed pseudo-random number in [0, 1) per (document, layer, unit) [B, units]: a 32-bit
    integer hash, so the bin samples do not depend on batch order or on a random state."""
    mask = 0xFFFFFFFF
    h = (docs.to(torch.int64)[:, None] * 0x9E3779B1 + torch.arange(units)[None, :] * 0x85EBCA77
         + layer * 0xC2B2AE3D) & mask
    for multiplier, shift in ((0x7FEB352D, 15), (0x846CA68B, 16)):
        h = ((h ^ (h >> shift)) * multiplier) & mask
    h = h ^ (h >> 16)
    return h.to(torch.float64).div(2.0 ** 32).to(torch.float32)


def select_top(pool: Examples) -> Examples:
    """The TOP largest document maxima per unit (ties: the earlier slot, i.e. the earlier document)."""
    order = torch.sort(pool.act, dim=0, descending=True, stable=True).indices[:TOP]
    return pool.take(order)


def select_bins(pool: Examples, running_max: torch.Tensor) -> Examples:
    """Per bin of the running maximum, the PER_BIN examples with the smallest keys."""
    level = torch.where(pool.act > 0, pool.act / running_max.clamp(min=1e-30)[None, :], torch.tensor(-1.0))
    bin_of = torch.where(pool.act > 0, (level * N_BINS).floor().clamp(max=N_BINS - 1), torch.tensor(-1.0))
    chosen, empty = [], []
    for b in range(N_BINS):
        keys = torch.where(bin_of == b, pool.key, torch.tensor(float("inf")))
        ordered = torch.sort(keys, dim=0, stable=True)
        chosen.append(ordered.indices[:PER_BIN])
        empty.append(ordered.values[:PER_BIN].isinf())
    picked = pool.take(torch.cat(chosen))
    unused = torch.cat(empty)
    picked.doc = picked.doc.masked_fill(unused, -1)
    picked.act = picked.act.masked_fill(unused, float("-inf"))
    picked.key = picked.key.masked_fill(unused, float("inf"))
    return picked


def histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts [HIST_BINS, units] of ``values`` [tokens, units] in signed log10 bins."""
    return torch.zeros(HIST_BINS, values.shape[1], dtype=torch.int64).scatter_add_(
        0, histogram_bin(values), torch.ones_like(values, dtype=torch.int64))


def histogram_bin(values: torch.Tensor) -> torch.Tensor:
    """Bin index of each value: HIST_SIDE is "about zero", above it the positive log bins."""
    magnitude = values.abs()
    step = ((magnitude.clamp(min=1e-30).log10() - HIST_LOG_MIN) * HIST_PER_DECADE).floor()
    step = step.clamp(0, HIST_SIDE - 1).to(torch.int64)
    index = torch.where(values > 0, HIST_SIDE + 1 + step, HIST_SIDE - 1 - step)
    return torch.where(magnitude < 10.0 ** HIST_LOG_MIN, torch.full_like(index, HIST_SIDE), index)


def histogram_edges() -> list[float]:
    """Lower magnitude edge of each positive log bin (the negative side mirrors them)."""
    return [10.0 ** (HIST_LOG_MIN + i / HIST_PER_DECADE) for i in range(HIST_SIDE)]
