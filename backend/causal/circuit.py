"""Component-level attribution graph (EAP, EAP-IG) and circuits with measured faithfulness.

Edges are those of the component forward (components.py): sender output -> receiver input,
over the input embeddings, every head, every MLP and the logits. Metric m: see pairs.py
(default the logit difference answer - wrong at the last position), normalized (0 on the
corrupted run, 1 on the clean run) when the corruption moves it by at least MIN_SPAN.

- EAP (Syed et al. 2023): score(s->r) = (out_s(corrupt) - out_s(clean)) · dm/d in_r at the
  clean run, the first-order change in m when that edge alone is corrupted.
- EAP-IG (Hanna et al. 2024), the default: the same with dm/d in_r averaged over ``steps``
  runs whose input embeddings go from corrupted to clean, alpha = k/steps for k = 0..steps-1,
  as the authors' code (``get_scores_eap_ig``) does; EAP's single gradient at the clean run
  gets the sign of some edges wrong that are not into the logits.
- Circuit: the N edges with the largest |score|, then (by default) pruned as the EAP-IG
  code's ``apply_topn(prune=True)``: components without an incoming or an outgoing edge in
  the circuit are removed with their edges, repeatedly. Faithfulness: m of the clean run with
  every edge outside the circuit patched to its corrupted value (measured: one forward).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from backend.causal.components import ComponentReplay, ComponentRun, Layout, component_forward, layout
from backend.causal.pairs import (
    AnswerChoice,
    Metric,
    Scale,
    check_pair,
    choose_answer_wrong,
    default_answer_wrong,
    faithfulness_note,
    make_metric,
    make_scale,
    remember_suggestion,
    suggestion_ready,
)
from backend.errors import UserInputError
from backend.runtime.cache import cache_named, cached, is_cached
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.norms import apply_frozen, norm_scale
from backend.runtime.prompts import token_texts
from backend.runtime.results import JsonResult

METHODS = ("eap-ig", "eap")
MAX_LISTED_EDGES = 50_000
scored_cache = cache_named("scored_pairs", 4)  # each holds the corrupted outputs of a pair
circuit_cache = cache_named("circuits", 8)


# ---------------------------------------------------------------- scores


@dataclass
class ScoredPair:
    """Everything a circuit needs, computed once per (pair, method, metric)."""

    clean_ids: torch.Tensor
    metric: Metric
    scale: Scale
    scores: np.ndarray  # [S, R, P] in the scale's units, 0 where no edge
    corrupt_outputs: torch.Tensor
    direct_logit: dict[str, dict[str, float]]
    tokens: list[str]
    allowed: np.ndarray  # [S, R]
    seconds: float


def _receiver_gradients(run: ComponentRun, divisor: float) -> torch.Tensor:
    grads = torch.autograd.grad(run.value / divisor, run.inputs)
    return torch.cat([g.detach() for g in grads])  # [R, P, d]


def _direct_logit(handle: ModelHandle, clean: ComponentRun, metric: Metric) -> dict[str, dict[str, float]]:
    """Each sender's direct effect on the answer (and wrong) logit at the last position,
    through the final norm frozen at the clean run (before any soft-capping)."""
    module = handle.adapter.final_norm
    scale = norm_scale(module, clean.final_read[-1])
    normed = apply_frozen(module, clean.outputs[:, -1], scale, bias_share=0.0)
    tokens = [metric.answer] + ([metric.wrong] if metric.wrong is not None else [])
    unembed = handle.adapter.unembed_weight()[tokens]
    effects = (normed.to(unembed.dtype) @ unembed.T).double().cpu().numpy()
    names = layout(handle).senders
    return {name: dict(zip(("answer", "wrong"), map(float, row))) for name, row in zip(names, effects)}


def score_pair(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str | None, method: str = "eap-ig",
               steps: int = 5, metric: str = "logit_diff", progress: Progress | None = None) -> ScoredPair:
    """Edge scores for one clean/corrupted pair (cached)."""
    if method not in METHODS:
        raise UserInputError(f"Unknown method '{method}'; choose from {', '.join(METHODS)}.")
    steps = 1 if method == "eap" else int(steps)
    if not 1 <= steps <= 100:
        raise UserInputError("EAP-IG needs between 1 and 100 integration steps.")
    clean_ids, corrupt_ids = check_pair(handle, clean, corrupt)
    measured = make_metric(handle, answer, wrong, metric)
    return cached(handle, *_scored_key(clean, corrupt, measured, method, steps),
                  lambda: _score(handle, clean_ids, corrupt_ids, measured, method, steps, progress), scored_cache)


def is_scored(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str | None, method: str,
              steps: int, metric: str = "logit_diff") -> bool:
    """Whether score_pair with these arguments would return at once (already in the cache)."""
    steps = 1 if method == "eap" else int(steps)
    try:
        measured = make_metric(handle, answer, wrong, metric)
    except UserInputError:
        return False
    return is_cached(handle, *_scored_key(clean, corrupt, measured, method, steps), scored_cache)


def _scored_key(clean: str, corrupt: str, metric: Metric, method: str, steps: int) -> tuple[str, tuple]:
    """score_pair's cache entry (analysis name, parts), shared by is_scored and the suggestion."""
    return "scored_pair", (clean, corrupt, metric, method, steps)


def _divisor(clean_run: ComponentRun, corrupt_run: ComponentRun, metric: Metric) -> float:
    """What the metric is divided by before its gradient: the clean − corrupted span when normalized."""
    scale = make_scale(float(clean_run.value.detach()), float(corrupt_run.value), metric.label)
    return scale.span if scale.normalized else 1.0


def _integrated_gradients(handle, clean_t, metric: Metric, clean_run: ComponentRun, corrupt_run: ComponentRun,
                          steps: int, report) -> torch.Tensor:
    """The receivers' gradients averaged over the inputs corrupt + (k / steps)(clean − corrupt),
    k = 0 .. steps − 1 (EAP-IG's left Riemann sum on the input embeddings)."""
    divisor = _divisor(clean_run, corrupt_run, metric)
    clean_embed, corrupt_embed = clean_run.outputs[0:1], corrupt_run.outputs[0:1]
    grads = None
    with torch.enable_grad():
        for k in range(steps):
            report(0.1 + 0.9 * k / steps, f"gradients: step {k + 1}/{steps}")
            embed = corrupt_embed + (k / steps) * (clean_embed - corrupt_embed)
            step_grads = _receiver_gradients(component_forward(handle, clean_t, metric, embed=embed), divisor)
            grads = step_grads if grads is None else grads + step_grads
    assert grads is not None
    return grads / steps


def _score(handle, clean_ids, corrupt_ids, metric: Metric, method: str, steps: int, progress) -> ScoredPair:
    report = progress or (lambda fraction, message: None)
    start = time.perf_counter()
    clean_t, corrupt_t = handle.ids(clean_ids), handle.ids(corrupt_ids)
    report(0.0, "clean and corrupted runs")
    with torch.no_grad():  # each pass takes the model's lock itself, so other requests interleave
        corrupt_run = component_forward(handle, corrupt_t, metric)
    if method == "eap":  # EAP's one gradient is taken at the clean input: the clean run gives it too
        with torch.enable_grad():
            clean_run = component_forward(handle, clean_t, metric)
        return _eap_scored(handle, clean_ids, clean_run, corrupt_run, metric, start)
    with torch.no_grad():
        clean_run = component_forward(handle, clean_t, metric)
    grads = _integrated_gradients(handle, clean_t, metric, clean_run, corrupt_run, steps, report)
    report(1.0, "scored")
    return _scored(handle, clean_ids, clean_run, corrupt_run, grads, metric, start)


def _eap_scored(handle, clean_ids, clean_run: ComponentRun, corrupt_run: ComponentRun, metric: Metric,
                start: float) -> ScoredPair:
    """EAP from a clean run taken with grad mode on (its receivers' gradients) and a corrupted run."""
    with torch.enable_grad():
        grads = _receiver_gradients(clean_run, _divisor(clean_run, corrupt_run, metric))
    clean_run = ComponentRun(clean_run.outputs.detach(), [], clean_run.final_read.detach(), clean_run.value.detach())
    return _scored(handle, clean_ids, clean_run, corrupt_run, grads, metric, start)


def _scored(handle, clean_ids, clean_run: ComponentRun, corrupt_run: ComponentRun, grads: torch.Tensor,
            metric: Metric, start: float) -> ScoredPair:
    """Edge scores (corrupted − clean sender output) · receiver gradient, per position."""
    scale = make_scale(float(clean_run.value), float(corrupt_run.value), metric.label)
    diff = corrupt_run.outputs - clean_run.outputs
    scores = torch.einsum("spd,rpd->srp", diff.double(), grads.double()).cpu().numpy()
    allowed = layout(handle).allowed()
    scores *= allowed[:, :, None]
    return ScoredPair(clean_ids=handle.ids(clean_ids), metric=metric, scale=scale, scores=scores,
                      corrupt_outputs=corrupt_run.outputs, direct_logit=_direct_logit(handle, clean_run, metric),
                      tokens=token_texts(handle, clean_ids), allowed=allowed, seconds=time.perf_counter() - start)


def suggest_tokens_scoring_eap(handle: ModelHandle, clean: str, corrupt: str, answer: str | None = None,
                               metric: str = "logit_diff") -> AnswerChoice:
    """pairs.default_answer_wrong's choice, read from EAP's own clean and corrupted runs, and
    EAP's scores for that choice cached on the way (``score_pair(..., "eap")`` then returns at
    once). The circuit page needs both for its first look on a new prompt; one pair of runs
    serving both saves the suggestion's own forward (1.16 s -> 0.97 s on 2 CPU cores). The
    component runs equal the plain forward up to float rounding, so the choice is the same
    except in an exact tie. A metric the runs cannot normalize is left for score_pair to report."""
    if suggestion_ready(handle, clean, corrupt, answer):
        return default_answer_wrong(handle, clean, corrupt, answer)  # cached: EAP is scored where asked
    start = time.perf_counter()
    clean_ids, corrupt_ids = check_pair(handle, clean, corrupt)
    corrupt_replay, clean_replay = ComponentReplay(handle, shared=True), ComponentReplay(handle)
    with torch.no_grad():
        corrupt_final = corrupt_replay.forward(handle.ids(corrupt_ids))
    with torch.enable_grad():
        clean_final = clean_replay.forward(handle.ids(clean_ids))
    choice = choose_answer_wrong(handle, clean_final[0, -1], corrupt_final[0, -1], answer)
    remember_suggestion(handle, clean, corrupt, answer, choice)
    try:
        measured = make_metric(handle, choice.answer, choice.wrong, metric)
        key = _scored_key(clean, corrupt, measured, "eap", 1)
        if not is_cached(handle, *key, scored_cache):
            with torch.enable_grad():
                clean_run = clean_replay.measured(clean_final, measured)
            with torch.no_grad():
                corrupt_run = corrupt_replay.measured(corrupt_final, measured)
            scored = _eap_scored(handle, clean_ids, clean_run, corrupt_run, measured, start)
            cached(handle, *key, lambda: scored, scored_cache)
    except UserInputError:
        pass  # e.g. both runs give the same metric: score_pair says so where the page asks for the scores
    return choice


# ---------------------------------------------------------------- circuits and faithfulness


def ranked_edges(scored: ScoredPair, per_position: bool) -> np.ndarray:
    """Existing edges, best (largest |score|) first: rows (s, r), or (s, r, p) per position."""
    allowed = scored.allowed
    if per_position:
        rows = np.argwhere(np.broadcast_to(allowed[:, :, None], scored.scores.shape))
        values = scored.scores[tuple(rows.T)]
    else:
        rows = np.argwhere(allowed)
        values = scored.scores.sum(-1)[tuple(rows.T)]
    return rows[np.argsort(-np.abs(values), kind="stable")]


def prune_dangling(names: Layout, edges: np.ndarray) -> np.ndarray:
    """The edges left after removing, repeatedly, components without an incoming or an
    outgoing edge (the input always counts as having inputs, the logits are always kept), as
    the EAP-IG code's ``Graph.prune``. Rows (s, r) or (s, r, p); per position, a component
    is present when any of its edges at any position is."""
    if not len(edges):
        return edges
    own_receiver = names.receiver_of_sender()
    n_senders, n_receivers = len(names.senders), len(names.receivers)
    kept = np.ones(len(edges), dtype=bool)
    while True:
        present = np.zeros((n_senders, n_receivers), dtype=bool)
        present[edges[kept, 0], edges[kept, 1]] = True
        has_out = present.any(axis=1)
        receives = present.any(axis=0)
        has_in = np.where(own_receiver < 0, True, receives[np.maximum(own_receiver, 0)])
        node = has_out & has_in
        receiver_node = np.zeros(n_receivers, dtype=bool)
        receiver_node[own_receiver[own_receiver >= 0]] = node[own_receiver >= 0]
        receiver_node[-1] = True  # the logits
        still = kept & node[edges[:, 0]] & receiver_node[edges[:, 1]]
        if (still == kept).all():
            return edges[kept]
        kept = still


@torch.no_grad()
def circuit_metric(handle: ModelHandle, scored: ScoredPair, edges: np.ndarray) -> float:
    """The raw metric with only ``edges`` (rows (s, r) or (s, r, p)) kept clean."""
    n_senders, n_receivers, n_pos = scored.scores.shape
    keep = torch.zeros(n_senders, n_receivers, n_pos, dtype=scored.corrupt_outputs.dtype)
    if len(edges):
        index = torch.as_tensor(edges, dtype=torch.long)
        if index.shape[1] == 2:
            keep[index[:, 0], index[:, 1], :] = 1.0
        else:
            keep[index[:, 0], index[:, 1], index[:, 2]] = 1.0
    run = component_forward(handle, scored.clean_ids, scored.metric, keep=keep.to(scored.corrupt_outputs.device),
                            corrupt_outputs=scored.corrupt_outputs)
    return float(run.value)


def faithfulness(handle: ModelHandle, scored: ScoredPair, edges: np.ndarray) -> float:
    """The circuit's metric in the pair's scale: normalized (0 corrupted, 1 clean), or the raw
    change from the corrupted run when normalizing is refused (pairs.make_scale)."""
    return float(scored.scale(circuit_metric(handle, scored, edges)))


def top_edges(handle: ModelHandle, scored: ScoredPair, n: int, per_position: bool = False,
              prune: bool = True) -> tuple[list[dict], list[dict]]:
    """The nodes and the top-``n`` edges (pruned when asked) from the scores alone, before
    any faithfulness is measured: what a page draws first."""
    names = layout(handle)
    ranked = ranked_edges(scored, per_position)
    edges = prune_dangling(names, ranked[:n]) if prune else ranked[:n]
    return node_dicts(names), edge_dicts(scored, names, edges, per_position)


def edge_dicts(scored: ScoredPair, names: Layout, rows: np.ndarray, per_position: bool) -> list[dict]:
    values = scored.scores if per_position else scored.scores.sum(-1)
    edges = []
    for row in rows:
        edge = {"source": names.senders[row[0]], "target": names.receivers[row[1]], "score": float(values[tuple(row)])}
        if per_position:
            edge["position"] = int(row[2])
        edges.append(edge)
    return edges


def component_nodes(handle: ModelHandle) -> list[dict]:
    """Every node of the model's component graph (input, heads, MLPs, logits), no forward."""
    return node_dicts(layout(handle))


def node_dicts(names: Layout) -> list[dict]:
    nodes = [{"name": "input", "kind": "input", "layer": -1, "head": None}]
    for name in names.senders[1:]:
        layer, _, head = name[1:].partition(".h")
        nodes.append({"name": name, "kind": "head" if head else "mlp", "layer": int(layer),
                      "head": int(head) if head else None})
    nodes.append({"name": "logits", "kind": "logits", "layer": len(names.senders), "head": None})
    return nodes


def curve_points(n_edges: int, count: int = 16) -> list[int]:
    """0, then about ``count`` geometrically spaced circuit sizes up to every edge."""
    grid = np.unique(np.round(np.geomspace(1, n_edges, count)).astype(int)) if n_edges else []
    return [0] + [int(n) for n in grid]


@dataclass
class CircuitResult(JsonResult):
    model: str
    clean: str
    corrupt: str
    answer: str
    wrong: str | None
    method: str
    tokens: list[str]
    metric: dict  # {kind, clean, corrupt, denominator, normalized, warning}
    nodes: list[dict]  # {name, kind (input|head|mlp|logits), layer, head}
    edges: list[dict]  # {source, target, score[, position]}, largest |score| first (at most MAX_LISTED_EDGES)
    n_edges: int  # every edge of the graph
    circuit: list[dict]  # the top-N edges, after pruning dangling ones when asked
    faithfulness: float  # measured metric of the circuit, in the metric's scale
    curve: list[dict]  # [{n (top-N), kept (after pruning), faithfulness}]
    random_faithfulness: list[float]  # random edge sets with as many edges as the circuit
    direct_logit: dict  # sender -> {answer, wrong}: direct effect on the logits (clean run, last position)
    seconds: dict
    settings: dict = field(default_factory=dict)
    faithfulness_note: str | None = None  # overshoot or sign flip, in words


def circuit(
    handle: ModelHandle,
    clean: str,
    corrupt: str,
    answer: str,
    wrong: str | None,
    *,
    method: str = "eap-ig",
    steps: int = 5,
    metric: str = "logit_diff",
    top_n: int | None = None,
    target_faithfulness: float | None = None,
    top_fraction: float = 0.05,
    per_position: bool = False,
    prune: bool = True,
    n_random: int = 5,
    curve_size: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
) -> CircuitResult:
    """Score edges, pick a circuit (``top_n`` edges; else the smallest N on the curve reaching
    ``target_faithfulness``; else the top ``top_fraction``), prune it, and measure it."""
    report = progress or (lambda fraction, message: None)
    scored = score_pair(handle, clean, corrupt, answer, wrong, method, steps, metric,
                        progress=lambda f, m: report(0.6 * f, m))
    names = layout(handle)
    ranked = ranked_edges(scored, per_position)
    n_edges = len(ranked)
    if top_n is not None and not 0 <= top_n <= n_edges:
        raise UserInputError(f"The circuit size must be between 0 and {n_edges} edges (got {top_n}).")
    if target_faithfulness is not None and not 0 < target_faithfulness <= 1:
        raise UserInputError("The target faithfulness must be in (0, 1].")
    if not 0 < top_fraction <= 1:
        raise UserInputError("The circuit fraction must be in (0, 1].")

    def chosen(n: int) -> np.ndarray:
        return prune_dangling(names, ranked[:n]) if prune else ranked[:n]

    start = time.perf_counter()
    curve = []
    for k, n in enumerate(curve_points(n_edges, curve_size)):
        report(0.6 + 0.3 * k / (curve_size + 1), f"faithfulness curve: {k + 1} (N = {n})")
        edges = chosen(n)
        curve.append({"n": n, "kept": len(edges), "faithfulness": faithfulness(handle, scored, edges)})
    if top_n is None:
        reached = [
            p["n"] for p in curve if target_faithfulness is not None and p["faithfulness"] >= target_faithfulness
        ]
        top_n = reached[0] if reached else max(1, round(top_fraction * n_edges))
    circuit_edges = chosen(top_n)
    measured = next((p["faithfulness"] for p in curve if p["n"] == top_n), None)
    if measured is None:
        measured = faithfulness(handle, scored, circuit_edges)
        curve = sorted(curve + [{"n": top_n, "kept": len(circuit_edges), "faithfulness": measured}],
                       key=lambda p: p["n"])
    rng = np.random.default_rng(seed)
    random_values = []
    for k in range(n_random):
        report(0.9 + 0.1 * k / max(n_random, 1), f"random circuits: {k + 1}/{n_random}")
        random_values.append(
            faithfulness(handle, scored, ranked[rng.choice(n_edges, len(circuit_edges), replace=False)])
        )
    report(1.0, "done")
    return CircuitResult(
        model=handle.name, clean=clean, corrupt=corrupt, answer=answer, wrong=wrong, method=method,
        tokens=scored.tokens, metric={"kind": metric, **scored.scale.to_dict()},
        nodes=node_dicts(names), edges=edge_dicts(scored, names, ranked[:MAX_LISTED_EDGES], per_position),
        n_edges=n_edges, circuit=edge_dicts(scored, names, circuit_edges, per_position), faithfulness=measured,
        curve=curve, random_faithfulness=random_values, direct_logit=scored.direct_logit,
        seconds={"scores": scored.seconds, "faithfulness": time.perf_counter() - start},
        settings={"steps": 1 if method == "eap" else steps, "top_n": top_n, "target_faithfulness": target_faithfulness,
                  "top_fraction": top_fraction, "per_position": per_position, "prune": prune, "n_random": n_random,
                  "seed": seed, "metric": metric},
        faithfulness_note=faithfulness_note(measured, scored.scale),
    )


def cached_circuit(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str | None, *,
                   progress: Progress | None = None, **settings) -> CircuitResult:
    """``circuit`` through the result cache (pages rerun on every click)."""
    return cached(handle, "circuit", (clean, corrupt, answer, wrong, tuple(sorted(settings.items()))),
                  lambda: circuit(handle, clean, corrupt, answer, wrong, progress=progress, **settings), circuit_cache)


def edge_rows(handle: ModelHandle, edges: list[dict]) -> np.ndarray:
    """Edge dicts back to index rows (s, r) or (s, r, p)."""
    names = layout(handle)
    senders = {name: i for i, name in enumerate(names.senders)}
    receivers = {name: i for i, name in enumerate(names.receivers)}
    rows = [[senders[e["source"]], receivers[e["target"]]] + ([e["position"]] if "position" in e else [])
            for e in edges]
    return np.asarray(rows, dtype=int).reshape(len(rows), -1 if rows else 2)


def node_ablation(handle: ModelHandle, scored: ScoredPair, circuit_edges: list[dict], name: str) -> dict:
    """Measured effect of corrupt-ablating node ``name`` (its output replaced by the corrupted
    run's on every edge out of it): the metric of the whole model without it, and of the
    circuit without the edges that touch it."""
    names = layout(handle)
    if name not in names.senders and name not in names.receivers:
        raise UserInputError(f"No node '{name}' in this graph.")
    sender = names.senders.index(name) if name in names.senders else -1
    receiver = names.receivers.index(name) if name in names.receivers else -1
    circuit_rows = edge_rows(handle, circuit_edges)
    per_position = circuit_rows.shape[1] == 3
    everything = ranked_edges(scored, per_position)
    return {
        "model": faithfulness(handle, scored, everything[everything[:, 0] != sender]),
        "circuit": faithfulness(handle, scored, circuit_rows[(circuit_rows[:, 0] != sender)
                                                             & (circuit_rows[:, 1] != receiver)]),
    }
