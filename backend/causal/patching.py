"""Activation patching, attribution patching (AtP) and relevance patching (RelP).

Setting (denoising): run the *corrupted* prompt, put back the *clean* value of one site,
and measure the metric at the last position (pairs.py; default the logit difference
answer - wrong), normalized so that 0 = the corrupted run and 1 = the clean run when the
corruption moves the metric by at least MIN_SPAN (else raw changes, with a warning).

Sites: ``resid_pre`` (block input), ``attn_out`` and ``mlp_out`` (what attention / the MLP
add to the residual stream), each per layer x position; ``heads`` (one head's output at
every position), per layer x head.

- exact: one patched forward per site, many sites per batched forward; ``exact_grid`` can
  report each finished batch, so a page fills the grid in as it is computed;
- AtP: (a_clean - a_corrupt) · ∂m/∂a on the corrupted run (one forward + one backward);
- RelP: the same with the gradient of the LRP-linearized corrupted run (frozen norm scales,
  identity rule on activations, half rule on gated products; attention kept, or frozen).

Each piece is cached (runtime.cache), so a page rerun (any click) recomputes nothing.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from backend.causal.pairs import Metric, Scale, check_pair, make_metric, make_scale
from backend.errors import UserInputError
from backend.runtime.cache import cached, is_cached
from backend.runtime.hooks import Hook, edit_site, embed_leaf, hooked, read_site
from backend.runtime.linearize import linear_forward, record_frozen
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import token_texts
from backend.runtime.results import JsonResult

SITES = ("resid_pre", "attn_out", "mlp_out", "heads")
METHODS = ("exact", "atp", "relp")
PartialGrid = Callable[[str, np.ndarray], None]  # (site, grid with NaN where not computed yet)


@dataclass
class PatchResult(JsonResult):
    model: str
    clean: str
    corrupt: str
    answer: str
    wrong: str | None
    tokens: list[str]  # clean tokens
    corrupt_tokens: list[str]
    metric: dict  # {kind, clean, corrupt, denominator, normalized, warning}
    grids: dict[str, dict[str, np.ndarray]]  # site -> method -> [layers, positions or heads], in the metric's scale
    pearson: dict  # site -> {"atp": r, "relp": r} (with the exact grid)
    seconds: dict  # method -> seconds (all sites)
    settings: dict = field(default_factory=dict)


@dataclass
class PatchPair:
    """A validated pair with its clean activations at every site and its scale."""

    clean_ids: list[int]
    corrupt_ids: list[int]
    metric: Metric
    clean_acts: dict[str, list[torch.Tensor]]  # site -> per layer [P, ...]
    scale: Scale
    # site -> [L, P]: where the clean activation equals the corrupted one bit for bit, so that
    # patching it changes nothing (every layer before the first differing token); not for heads
    unchanged: dict[str, np.ndarray] = field(default_factory=dict)
    shared_prefix: int = 0  # leading positions where every site of every layer is unchanged


# ---------------------------------------------------------------- the pair


def _capture_hooks(handle: ModelHandle, store: dict[str, list]) -> list[Hook]:
    """Hooks that keep every site's tensor (in the autograd graph when there is one)."""
    hooks = []
    for site in SITES:
        store[site] = [None] * handle.adapter.n_layers
        for layer in range(handle.adapter.n_layers):
            hooks.append(read_site(handle.adapter.site(site, layer), partial(store[site].__setitem__, layer)))
    return hooks


@torch.no_grad()
def _run_pair(handle: ModelHandle, clean_ids: list[int], corrupt_ids: list[int],
              metric: Metric) -> tuple[dict, dict, int, float, float]:
    """The clean run's activations at every site, where they equal the corrupted run's (per
    site, and the prefix they share), and the metric on both runs: one forward of the two
    prompts as a batch (equal lengths; two forwards of one took ~1.6x as long on 2 cores: a
    short prompt's forward mostly reads the weights)."""
    store: dict[str, list] = {}
    with hooked(handle, _capture_hooks(handle, store)):
        final = handle.final_residual(torch.tensor([clean_ids, corrupt_ids], device=handle.device))
    acts = {site: [t[0].detach().clone() for t in tensors] for site, tensors in store.items()}
    equal = {site: torch.stack([(t[0] == t[1]).all(-1) for t in store[site]]).cpu().numpy() for site in SITES}
    shared_prefix = min(int(np.argmin(row)) if not row.all() else row.size for mask in equal.values() for row in mask)
    clean_value, corrupt_value = (float(v) for v in metric(handle, final))
    return acts, {site: equal[site] for site in SITES if site != "heads"}, shared_prefix, clean_value, corrupt_value


def prepare_pair(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str | None,
                 metric: str = "logit_diff") -> PatchPair:
    """Validate the pair and run both prompts once (cached)."""
    clean_ids, corrupt_ids = check_pair(handle, clean, corrupt)
    measured = make_metric(handle, answer, wrong, metric)

    def compute() -> PatchPair:
        clean_acts, unchanged, shared, clean_value, corrupt_value = _run_pair(handle, clean_ids, corrupt_ids, measured)
        return PatchPair(clean_ids, corrupt_ids, measured, clean_acts,
                         make_scale(clean_value, corrupt_value, measured.label), unchanged, shared)

    return cached(handle, "patch_pair", (clean, corrupt, measured), compute)


# ---------------------------------------------------------------- exact patching


def grid_shape(handle: ModelHandle, site: str, n_pos: int) -> tuple[int, int]:
    return handle.adapter.n_layers, handle.adapter.n_heads if site == "heads" else n_pos


def _patch_hooks(handle: ModelHandle, site: str, jobs: list[tuple[int, int]], clean_acts: dict,
                 offset: int = 0) -> list[Hook]:
    """Hooks making row r of the batch the corrupted run with site jobs[r] set to clean; the
    batch's positions start at ``offset`` (a continuation of a cached prefix)."""
    adapter = handle.adapter
    hooks = []
    for layer in sorted({l for l, _ in jobs}):
        rows = torch.tensor([r for r, (l, _) in enumerate(jobs) if l == layer])
        index = torch.tensor([i for l, i in jobs if l == layer])
        clean = clean_acts[site][layer]

        def patch(tensor: torch.Tensor, rows=rows, index=index, clean=clean) -> torch.Tensor:
            tensor = tensor.clone()
            if site == "heads":
                view = tensor.view(tensor.shape[0], tensor.shape[1], adapter.n_heads, adapter.head_dim)
                clean_heads = clean.view(clean.shape[0], adapter.n_heads, adapter.head_dim)
                view[rows, :, index] = clean_heads[offset:, index].transpose(0, 1)
            else:
                tensor[rows, index - offset] = clean[index]
            return tensor

        hooks.append(edit_site(adapter.site(site, layer), patch))
    return hooks


# Patched runs per forward. 16 is as fast in total as 64 (SmolLM2, resid_pre, 2 cores: 23.1 s
# against 22.7 s) and bounds what one batch holds the model after a page is left or cancelled
# (the run stops at its next progress report): 0.95 s against 3.4 s.
EXACT_BATCH = 16


def _exact_batches(handle: ModelHandle, pair: PatchPair, site: str, batch_size: int) -> list[tuple[int, list]]:
    """(first position computed, jobs) per patched forward. A cell whose clean activation
    equals the corrupted one is no run at all. A position's cells (one per layer) share a
    forward that continues the corrupted run's cached prefix before that position: nothing
    there can change, and the run computes only the positions from it on. A head is patched
    at every position, of which those of the shared prefix change nothing: its runs continue
    the shared prefix."""
    n_layers, n_cols = grid_shape(handle, site, len(pair.corrupt_ids))
    if site == "heads":
        jobs = [(l, i) for l in range(n_layers) for i in range(n_cols)]
        first = min(pair.shared_prefix, len(pair.corrupt_ids) - 1)
        return [(first, jobs[start:start + batch_size]) for start in range(0, len(jobs), batch_size)]
    batches = []
    for position in range(n_cols):
        jobs = [(l, position) for l in range(n_layers) if not pair.unchanged[site][l, position]]
        batches += [(position, jobs[start:start + batch_size]) for start in range(0, len(jobs), batch_size)]
    return batches


@torch.no_grad()
def _exact_raw(handle: ModelHandle, pair: PatchPair, site: str, batch_size: int, progress: Progress,
               on_partial: PartialGrid | None) -> np.ndarray:
    n_layers, n_cols = grid_shape(handle, site, len(pair.corrupt_ids))
    values = np.full((n_layers, n_cols), np.nan)
    if site != "heads":
        values[pair.unchanged[site]] = pair.scale.corrupt  # patching an equal value is the corrupted run
    batches = _exact_batches(handle, pair, site, batch_size)
    done = int(np.isfinite(values).sum())
    prefix_start, prefix = 0, None  # the corrupted prefix's cache, shared by a position's batches
    for start, jobs in batches:
        past = None
        if start > 0:
            if start != prefix_start:
                prefix_start, prefix = start, handle.prefix_cache(pair.corrupt_ids[:start])
            past = copy.deepcopy(prefix)
            past.batch_repeat_interleave(len(jobs))
        with hooked(handle, _patch_hooks(handle, site, jobs, pair.clean_acts, offset=start)):
            final = handle.final_residual(handle.ids(pair.corrupt_ids[start:], len(jobs)), past)
        layers, columns = zip(*jobs)
        values[list(layers), list(columns)] = pair.metric(handle, final).double().cpu().numpy()
        done += len(jobs)
        progress(done / values.size, f"exact {site}: {done}/{values.size}")
        if on_partial is not None:
            on_partial(site, pair.scale(values))
    return values


def exact_grid(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str | None, site: str, *,
               metric: str = "logit_diff", batch_size: int = EXACT_BATCH, progress: Progress | None = None,
               on_partial: PartialGrid | None = None) -> np.ndarray:
    """Exact patching of every ``site`` cell, in the pair's scale (cached). ``on_partial``
    receives the grid after each batch (NaN where not computed yet)."""
    return timed_exact_grid(handle, clean, corrupt, answer, wrong, site, metric=metric, batch_size=batch_size,
                            progress=progress, on_partial=on_partial)[0]


def timed_exact_grid(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str | None, site: str, *,
                     metric: str = "logit_diff", batch_size: int = EXACT_BATCH, progress: Progress | None = None,
                     on_partial: PartialGrid | None = None) -> tuple[np.ndarray, float]:
    """``exact_grid`` and the seconds its computation took, cached with it (so a page that
    streamed the grid first still reports what it cost, not the cache read)."""
    if site not in SITES:
        raise UserInputError(f"Unknown site '{site}'; choose from {', '.join(SITES)}.")
    pair = prepare_pair(handle, clean, corrupt, answer, wrong, metric)
    report = progress or (lambda fraction, message: None)

    def compute() -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        raw = _exact_raw(handle, pair, site, batch_size, report, on_partial)
        return raw, time.perf_counter() - start

    raw, seconds = cached(handle, "patch_exact", (clean, corrupt, pair.metric, site, batch_size), compute)
    return pair.scale(raw), seconds


# ---------------------------------------------------------------- AtP and RelP


def _first_order(handle: ModelHandle, store: dict, grads: dict, clean_acts: dict) -> dict[str, np.ndarray]:
    """(a_clean - a_corrupt) · grad per site: [L, P] (heads: [L, H], summed over positions)."""
    adapter = handle.adapter
    out = {}
    for site in SITES:
        rows = []
        for layer in range(adapter.n_layers):
            diff = (clean_acts[site][layer] - store[site][layer][0].detach()) * grads[site][layer][0]
            if site == "heads":
                rows.append(diff.view(diff.shape[0], adapter.n_heads, adapter.head_dim).sum(dim=(0, 2)))
            else:
                rows.append(diff.sum(-1))
        out[site] = torch.stack(rows).double().cpu().numpy()
    return out


def _gradients(store: dict, value: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    flat = [t for site in SITES for t in store[site]]
    grads = torch.autograd.grad(value, flat, allow_unused=True)
    out, i = {}, 0
    for site in SITES:
        n = len(store[site])
        out[site] = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[i:i + n], store[site])]
        i += n
    return out


def _atp_raw(handle: ModelHandle, pair: PatchPair) -> dict[str, np.ndarray]:
    store: dict[str, list] = {}
    with hooked(handle, [embed_leaf(handle)] + _capture_hooks(handle, store)), torch.enable_grad():
        final = handle.adapter.base(handle.ids(pair.corrupt_ids), use_cache=False).last_hidden_state
        grads = _gradients(store, pair.metric(handle, final)[0])
    return _first_order(handle, store, grads, pair.clean_acts)


def _relp_raw(handle: ModelHandle, pair: PatchPair, freeze_attention: bool) -> dict[str, np.ndarray]:
    store: dict[str, list] = {}
    with handle.lock:
        frozen = record_frozen(handle, handle.ids(pair.corrupt_ids))
        run = linear_forward(handle, frozen, direct=False, freeze_attention=freeze_attention,
                             extra_hooks=_capture_hooks(handle, store))
        grads = _gradients(store, pair.metric(handle, run.final)[0])
    return _first_order(handle, store, grads, pair.clean_acts)


def approximate(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str | None, method: str, *,
                metric: str = "logit_diff", freeze_attention: bool = False) -> tuple[dict[str, np.ndarray], float]:
    """AtP or RelP grids of every site in the pair's scale, and the seconds it took (cached)."""
    if method not in ("atp", "relp"):
        raise UserInputError(f"Unknown approximation '{method}'; choose atp or relp.")
    pair = prepare_pair(handle, clean, corrupt, answer, wrong, metric)

    def compute() -> tuple[dict[str, np.ndarray], float]:
        start = time.perf_counter()
        raw = _atp_raw(handle, pair) if method == "atp" else _relp_raw(handle, pair, freeze_attention)
        return raw, time.perf_counter() - start

    raw, seconds = cached(handle, "patch_approx", (clean, corrupt, pair.metric, method,
                                                   method == "relp" and freeze_attention), compute)
    divisor = pair.scale.span if pair.scale.normalized else 1.0  # a first-order change, not a value
    return {site: grid / divisor for site, grid in raw.items()}, seconds


def approximation_ready(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str | None, method: str,
                        *, metric: str = "logit_diff", freeze_attention: bool = False) -> bool:
    """Whether ``approximate`` with these arguments would return at once (cached)."""
    try:
        measured = make_metric(handle, answer, wrong, metric)
    except UserInputError:
        return False
    return is_cached(handle, "patch_approx", (clean, corrupt, measured, method, method == "relp" and freeze_attention))


# ---------------------------------------------------------------- everything


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def patching(
    handle: ModelHandle,
    clean: str,
    corrupt: str,
    answer: str,
    wrong: str | None,
    *,
    methods: tuple[str, ...] = METHODS,
    sites: tuple[str, ...] = SITES,
    metric: str = "logit_diff",
    freeze_attention: bool = False,
    batch_size: int = EXACT_BATCH,
    progress: Progress | None = None,
    on_partial: PartialGrid | None = None,
) -> PatchResult:
    """All requested methods on all sites, in the pair's scale (each piece cached)."""
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise UserInputError(f"Unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}.")
    if set(sites) - set(SITES) or not sites:
        raise UserInputError(f"Unknown site(s) {sorted(set(sites) - set(SITES))}; choose from {', '.join(SITES)}.")
    report = progress or (lambda fraction, message: None)
    pair = prepare_pair(handle, clean, corrupt, answer, wrong, metric)
    grids: dict[str, dict] = {site: {} for site in sites}
    seconds: dict[str, float] = {}
    for method in ("atp", "relp"):
        if method in methods:
            report(0.01, f"{method}: one forward and one backward")
            grid, seconds[method] = approximate(handle, clean, corrupt, answer, wrong, method, metric=metric,
                                                freeze_attention=freeze_attention)
            for site in sites:
                grids[site][method] = grid[site]
    if "exact" in methods:
        seconds["exact"] = 0.0
        for k, site in enumerate(sites):
            grids[site]["exact"], took = timed_exact_grid(
                handle, clean, corrupt, answer, wrong, site, metric=metric, batch_size=batch_size,
                progress=lambda f, m, k=k: report(0.05 + 0.95 * (k + f) / len(sites), m), on_partial=on_partial)
            seconds["exact"] += took
    report(1.0, "done")
    correlation = {
        site: {m: pearson(grids[site][m], grids[site]["exact"]) for m in ("atp", "relp") if m in grids[site]}
        for site in sites if "exact" in grids[site]
    }
    return PatchResult(
        model=handle.name,
        clean=clean,
        corrupt=corrupt,
        answer=answer,
        wrong=wrong,
        tokens=token_texts(handle, pair.clean_ids),
        corrupt_tokens=token_texts(handle, pair.corrupt_ids),
        metric={"kind": metric, **pair.scale.to_dict()},
        grids={
            site: {m: np.asarray(g, dtype=np.float32) for m, g in by_method.items()}
            for site, by_method in grids.items()
        },
        pearson=correlation,
        seconds=seconds,
        settings={
            "methods": list(methods),
            "sites": list(sites),
            "freeze_attention": freeze_attention,
            "batch_size": batch_size,
            "metric": metric,
        },
    )


@torch.no_grad()
def patch_one(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str | None, site: str, layer: int,
              index: int, metric: str = "logit_diff") -> dict:
    """Patch a single site; returns the raw metric and its value in the pair's scale (a clicked cell)."""
    if site not in SITES:
        raise UserInputError(f"Unknown site '{site}'; choose from {', '.join(SITES)}.")
    pair = prepare_pair(handle, clean, corrupt, answer, wrong, metric)
    n_layers, n_cols = grid_shape(handle, site, len(pair.corrupt_ids))
    if not (0 <= layer < n_layers and 0 <= index < n_cols):
        raise UserInputError(f"No {site} site at layer {layer}, index {index}.")
    with hooked(handle, _patch_hooks(handle, site, [(layer, index)], pair.clean_acts)):
        final = handle.final_residual(handle.ids(pair.corrupt_ids))
    value = float(pair.metric(handle, final)[0])
    return {"value": value, "scaled": float(pair.scale(value)), **pair.scale.to_dict()}
