"""Component-level attribution graph (EAP, EAP-IG) and circuits with measured faithfulness.

Nodes: senders are the input embeddings, every attention head and every MLP block;
receivers are every head, every MLP and the logits. A receiver's input is the sum of the
outputs of the senders upstream of it (constant biases are folded into the heads' outputs,
and a post-attention norm, as in Gemma, is split over the heads at its own scale), so an
edge s -> r is one term of that sum.

The *component forward* replays the model with every receiver's input rebuilt from sender
outputs: each head of a layer runs on its own copy of the residual stream (attention runs
once per head, batched), so every edge can be kept (this run's sender output) or patched
(the corrupted run's sender output) on its own. With every edge kept it is the model's
own forward.

Metric m: logit difference answer - wrong at the last position, normalized (0 on the
corrupted run, 1 on the clean run).
- EAP (Syed et al. 2023): score(s->r) = (out_s(corrupt) - out_s(clean)) · dm/d in_r at the
  clean run, the first-order change in m when that edge alone is corrupted.
- EAP-IG (Hanna et al. 2024): the same with dm/d in_r averaged over ``steps`` runs whose
  input embeddings go from corrupted to clean (alpha = k/steps, k = 1..steps; steps=1 is EAP).
- Circuit: the N edges with the largest |score|. Faithfulness: m of the clean run with
  every edge outside the circuit patched to its corrupted value (measured: one forward).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from backend.runtime.arch import parameter
from backend.runtime.cache import BoundedCache
from backend.errors import UserInputError
from backend.runtime.hooks import Hook, first_tensor, hooked
from backend.runtime.linearize import _norm_parts
from backend.runtime.models import ModelHandle, Progress
from backend.causal.patching import _logit_difference, check_pair
from backend.runtime.prompts import resolve_token, token_texts
from backend.runtime.results import JsonResult

METHODS = ("eap", "eap-ig")
MAX_LISTED_EDGES = 50_000
context_cache = BoundedCache(max_entries=4)  # scored pairs (each holds the corrupted outputs)


# ---------------------------------------------------------------- graph layout


@dataclass(frozen=True)
class Layout:
    """Senders and receivers in forward order; receiver r reads senders[:upstream[r]]."""

    senders: list[str]
    receivers: list[str]
    upstream: list[int]
    n_heads: int

    def allowed(self) -> np.ndarray:
        """[S, R] True where the edge exists."""
        return np.arange(len(self.senders))[:, None] < np.asarray(self.upstream)[None, :]

    def head_receivers(self, layer: int) -> int:
        return layer * (self.n_heads + 1)

    def mlp_receiver(self, layer: int) -> int:
        return layer * (self.n_heads + 1) + self.n_heads


def layout(handle: ModelHandle) -> Layout:
    adapter = handle.adapter
    senders, receivers, upstream = ["input"], [], []
    for layer in range(adapter.n_layers):
        heads = [f"a{layer}.h{h}" for h in range(adapter.n_heads)]
        head_reads = len(senders)
        receivers += heads
        upstream += [head_reads] * adapter.n_heads
        senders += heads
        receivers.append(f"m{layer}")
        upstream.append(head_reads if adapter.parallel else len(senders))
        senders.append(f"m{layer}")
    receivers.append("logits")
    upstream.append(len(senders))
    return Layout(senders, receivers, upstream, adapter.n_heads)


# ---------------------------------------------------------------- the component forward


def _centre(x: torch.Tensor, centred: bool) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True) if centred else x


@dataclass
class ComponentRun:
    outputs: torch.Tensor  # [S, P, d] sender outputs
    inputs: list[torch.Tensor]  # receiver inputs in receiver order, grouped: heads [H,P,d], MLP [1,P,d], logits [1,P,d]
    final_read: torch.Tensor  # [P, d] the final norm's input
    ld: torch.Tensor  # scalar logit difference


def component_forward(
    handle: ModelHandle,
    ids: torch.Tensor,
    answer: int,
    wrong: int,
    *,
    embed: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    corrupt_outputs: torch.Tensor | None = None,
) -> ComponentRun:
    """One forward (batch 1) with every receiver's input rebuilt from sender outputs.

    ``embed`` [1,P,d] replaces the input embeddings. ``keep`` [S,R,P] (1 = this run's
    sender output, 0 = ``corrupt_outputs``) patches edges; None keeps every edge. Runs with
    gradients when torch grad mode is on (the input is then a leaf).
    """
    adapter, lay = handle.adapter, layout(handle)
    n_heads = adapter.n_heads
    outputs: list[torch.Tensor] = []
    totals: list[torch.Tensor] = []  # totals[n-1] = sum of outputs[:n]
    inputs: list[torch.Tensor] = []
    head_parts: dict[int, torch.Tensor] = {}

    def add_senders(values: torch.Tensor) -> None:
        for value in values:
            outputs.append(value)
            totals.append(value if not totals else totals[-1] + value)

    def rebuild(first: int, count: int) -> torch.Tensor:
        n = lay.upstream[first]
        if keep is None:
            return totals[n - 1].unsqueeze(0).repeat(count, 1, 1)
        mask = keep[:n, first:first + count]
        this = torch.stack(outputs[:n])
        return torch.einsum("spd,scp->cpd", this, mask) + torch.einsum("spd,scp->cpd", corrupt_outputs[:n], 1 - mask)

    def take_input(module, args):
        value = args[0] if embed is None else embed.to(args[0].dtype)
        if torch.is_grad_enabled():
            value = value.detach().requires_grad_(True)
        add_senders(value[0].unsqueeze(0))
        return (value,) + tuple(args[1:])

    def read_heads(layer: int):
        def fn(module, args):
            value = rebuild(lay.head_receivers(layer), n_heads)
            inputs.append(value)
            return (value,) + tuple(args[1:])

        return fn

    def split_heads(layer: int):
        weight = adapter.o_proj_weight(layer).view(adapter.d_model, n_heads, adapter.head_dim)
        bias = parameter(adapter.layers[layer].o_proj, "bias")

        def fn(module, args):
            z = args[0].view(n_heads, args[0].shape[1], n_heads, adapter.head_dim)
            own = z[torch.arange(n_heads), :, torch.arange(n_heads)]  # copy h, head h: [H, P, hd]
            parts = torch.einsum("hpk,dhk->hpd", own, weight)
            head_parts[layer] = parts if bias is None else parts + bias / n_heads

        return fn

    def sum_heads(layer: int, is_output: bool):
        def fn(module, args, output):
            total = head_parts[layer].sum(0, keepdim=True)
            if is_output:
                add_senders(head_parts[layer])
            return (total,) + tuple(output[1:]) if isinstance(output, tuple) else total

        return fn

    def post_norm_heads(layer: int):
        def fn(module, args, output):
            centred, weight, bias, eps = _norm_parts(module)
            scale = torch.rsqrt(_centre(args[0], centred).pow(2).mean(-1, keepdim=True) + eps)
            parts = _centre(head_parts[layer], centred) * scale
            parts = parts * weight if weight is not None else parts
            parts = parts + bias / n_heads if bias is not None else parts
            add_senders(parts)
            return parts.sum(0, keepdim=True)

        return fn

    def read_one(receiver: Callable[[], int]):
        def fn(module, args):
            value = rebuild(receiver(), 1)
            inputs.append(value)
            return (value,) + tuple(args[1:])

        return fn

    def mlp_output(module, args, output):
        add_senders(first_tensor(output)[0].unsqueeze(0))

    hooks = [Hook(adapter.layers[0].block, "pre", take_input)]
    for layer, parts in enumerate(adapter.layers):
        separate_post_norm = parts.attn_out is not parts.attn
        hooks += [
            Hook(parts.attn_norm, "pre", read_heads(layer)),
            Hook(parts.o_proj, "pre", split_heads(layer)),
            Hook(parts.attn, "forward", sum_heads(layer, not separate_post_norm)),
            Hook(parts.mlp_norm, "pre", read_one(lambda layer=layer: lay.mlp_receiver(layer))),
            Hook(parts.mlp_out, "forward", mlp_output),
        ]
        if separate_post_norm:
            hooks.append(Hook(parts.attn_out, "forward", post_norm_heads(layer)))
    hooks.append(Hook(adapter.final_norm, "pre", read_one(lambda: len(lay.receivers) - 1)))
    with hooked(handle, hooks):
        final = adapter.base(ids, use_cache=False).last_hidden_state
    ld = _logit_difference(handle, final, answer, wrong)[0]
    return ComponentRun(torch.stack(outputs), inputs, inputs[-1][0], ld)


# ---------------------------------------------------------------- scores


@dataclass
class ScoredPair:
    """Everything a circuit needs, computed once per (pair, method)."""

    clean_ids: torch.Tensor
    answer: int
    wrong: int
    ld_clean: float
    ld_corrupt: float
    scores: np.ndarray  # [S, R, P] normalized-metric units, 0 where no edge
    corrupt_outputs: torch.Tensor
    direct_logit: dict[str, dict[str, float]]
    tokens: list[str]
    allowed: np.ndarray  # [S, R]
    seconds: float

    def normalized(self, ld: float) -> float:
        return (ld - self.ld_corrupt) / (self.ld_clean - self.ld_corrupt)


def _receiver_gradients(run: ComponentRun, span: float) -> torch.Tensor:
    grads = torch.autograd.grad(run.ld / span, run.inputs)
    return torch.cat([g.detach() for g in grads])  # [R, P, d]


def _direct_logit(handle: ModelHandle, clean: ComponentRun, answer: int, wrong: int) -> dict[str, dict[str, float]]:
    """Each sender's direct effect on the answer and wrong logits at the last position, through
    the final norm frozen at the clean run (before any soft-capping)."""
    module = handle.adapter.final_norm
    centred, weight, bias, eps = _norm_parts(module)
    read = clean.final_read[-1]
    scale = torch.rsqrt(_centre(read, centred).pow(2).mean(-1, keepdim=True) + eps)
    normed = _centre(clean.outputs[:, -1], centred) * scale
    if weight is not None:
        normed = normed * weight
    unembed = handle.adapter.unembed_weight()[[answer, wrong]]
    effects = (normed.to(unembed.dtype) @ unembed.T).double().cpu().numpy()
    names = layout(handle).senders
    return {name: {"answer": float(a), "wrong": float(w)} for name, (a, w) in zip(names, effects)}


def score_pair(
    handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str, method: str = "eap", steps: int = 5,
    progress: Progress | None = None,
) -> ScoredPair:
    """Edge scores for one clean/corrupted pair (cached)."""
    if method not in METHODS:
        raise UserInputError(f"Unknown method '{method}'; choose from {', '.join(METHODS)}.")
    steps = 1 if method == "eap" else int(steps)
    if not 1 <= steps <= 100:
        raise UserInputError("EAP-IG needs between 1 and 100 integration steps.")
    clean_ids, corrupt_ids = check_pair(handle, clean, corrupt)
    answer_id, wrong_id = resolve_token(handle, answer), resolve_token(handle, wrong)
    if answer_id == wrong_id:
        raise UserInputError("The answer and wrong tokens are the same token.")
    key = (handle.name, id(handle), clean, corrupt, answer_id, wrong_id, steps)
    return context_cache.get_or_compute(
        key, lambda: _score(handle, clean_ids, corrupt_ids, answer_id, wrong_id, steps, progress))


def _score(handle, clean_ids, corrupt_ids, answer, wrong, steps, progress) -> ScoredPair:
    report = progress or (lambda fraction, message: None)
    start = time.perf_counter()
    clean_t = torch.tensor([clean_ids], device=handle.device)
    corrupt_t = torch.tensor([corrupt_ids], device=handle.device)
    with handle.lock:
        with torch.no_grad():
            report(0.0, "clean and corrupted runs")
            clean_run = component_forward(handle, clean_t, answer, wrong)
            corrupt_run = component_forward(handle, corrupt_t, answer, wrong)
        ld_clean, ld_corrupt = float(clean_run.ld), float(corrupt_run.ld)
        span = ld_clean - ld_corrupt
        if abs(span) < 1e-6:
            raise UserInputError("The clean and corrupted runs give the same logit difference: nothing to localize.")
        clean_embed, corrupt_embed = clean_run.outputs[0:1], corrupt_run.outputs[0:1]
        grads = None
        with torch.enable_grad():
            for k in range(1, steps + 1):
                report(0.1 + 0.9 * (k - 1) / steps, f"gradients: step {k}/{steps}")
                embed = corrupt_embed + (k / steps) * (clean_embed - corrupt_embed)
                run = component_forward(handle, clean_t, answer, wrong, embed=embed)
                step_grads = _receiver_gradients(run, span)
                grads = step_grads if grads is None else grads + step_grads
    grads /= steps
    diff = corrupt_run.outputs - clean_run.outputs
    scores = torch.einsum("spd,rpd->srp", diff.double(), grads.double()).cpu().numpy()
    allowed = layout(handle).allowed()
    scores *= allowed[:, :, None]
    report(1.0, "scored")
    return ScoredPair(
        clean_ids=clean_t, answer=answer, wrong=wrong, ld_clean=ld_clean, ld_corrupt=ld_corrupt,
        scores=scores, corrupt_outputs=corrupt_run.outputs, direct_logit=_direct_logit(handle, clean_run, answer, wrong),
        tokens=token_texts(handle, clean_ids), allowed=allowed, seconds=time.perf_counter() - start,
    )


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


@torch.no_grad()
def faithfulness(handle: ModelHandle, scored: ScoredPair, edges: np.ndarray) -> float:
    """Normalized metric with only ``edges`` (rows (s, r) or (s, r, p)) kept clean."""
    n_senders, n_receivers, n_pos = scored.scores.shape
    keep = torch.zeros(n_senders, n_receivers, n_pos, dtype=scored.corrupt_outputs.dtype)
    if len(edges):
        index = torch.as_tensor(edges, dtype=torch.long)
        if index.shape[1] == 2:
            keep[index[:, 0], index[:, 1], :] = 1.0
        else:
            keep[index[:, 0], index[:, 1], index[:, 2]] = 1.0
    keep = keep.to(scored.corrupt_outputs.device)
    with handle.lock:
        run = component_forward(handle, scored.clean_ids, scored.answer, scored.wrong, keep=keep,
                                corrupt_outputs=scored.corrupt_outputs)
    return scored.normalized(float(run.ld))


def edge_dicts(scored: ScoredPair, names: Layout, rows: np.ndarray, per_position: bool) -> list[dict]:
    values = scored.scores if per_position else scored.scores.sum(-1)
    edges = []
    for row in rows:
        edge = {"source": names.senders[row[0]], "target": names.receivers[row[1]], "score": float(values[tuple(row)])}
        if per_position:
            edge["position"] = int(row[2])
        edges.append(edge)
    return edges


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
    wrong: str
    method: str
    tokens: list[str]
    metric: dict  # {"clean": LD, "corrupt": LD}
    nodes: list[dict]  # {name, kind (input|head|mlp|logits), layer, head}
    edges: list[dict]  # {source, target, score[, position]}, largest |score| first (at most MAX_LISTED_EDGES)
    n_edges: int  # every edge of the graph
    circuit: list[dict]  # the top-N edges
    faithfulness: float  # measured normalized metric of the circuit
    curve: list[dict]  # [{n, faithfulness}]
    random_faithfulness: list[float]  # random edge sets of the same size
    direct_logit: dict  # sender -> {answer, wrong}: direct effect on the logits (clean run, last position)
    seconds: dict
    settings: dict = field(default_factory=dict)


def circuit(
    handle: ModelHandle,
    clean: str,
    corrupt: str,
    answer: str,
    wrong: str,
    *,
    method: str = "eap",
    steps: int = 5,
    top_n: int | None = None,
    target_faithfulness: float | None = None,
    top_fraction: float = 0.05,
    per_position: bool = False,
    n_random: int = 5,
    curve_size: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
) -> CircuitResult:
    """Score edges, pick a circuit (``top_n`` edges; else the smallest N on the curve reaching
    ``target_faithfulness``; else the top ``top_fraction``), and measure it."""
    report = progress or (lambda fraction, message: None)
    scored = score_pair(handle, clean, corrupt, answer, wrong, method, steps,
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
    start = time.perf_counter()
    sizes = curve_points(n_edges, curve_size)
    curve = []
    for k, n in enumerate(sizes):
        report(0.6 + 0.3 * k / len(sizes), f"faithfulness curve: {k + 1}/{len(sizes)} (N = {n})")
        curve.append({"n": n, "faithfulness": faithfulness(handle, scored, ranked[:n])})
    if top_n is None:
        reached = [p["n"] for p in curve if target_faithfulness is not None and p["faithfulness"] >= target_faithfulness]
        top_n = reached[0] if reached else max(1, round(top_fraction * n_edges))
    measured = next((p["faithfulness"] for p in curve if p["n"] == top_n), None)
    if measured is None:
        measured = faithfulness(handle, scored, ranked[:top_n])
        curve = sorted(curve + [{"n": top_n, "faithfulness": measured}], key=lambda p: p["n"])
    rng = np.random.default_rng(seed)
    random_values = []
    for k in range(n_random):
        report(0.9 + 0.1 * k / max(n_random, 1), f"random circuits: {k + 1}/{n_random}")
        random_values.append(faithfulness(handle, scored, ranked[rng.choice(n_edges, top_n, replace=False)]))
    report(1.0, "done")
    listed = ranked[:MAX_LISTED_EDGES]
    return CircuitResult(
        model=handle.name, clean=clean, corrupt=corrupt, answer=answer, wrong=wrong, method=method,
        tokens=scored.tokens, metric={"clean": scored.ld_clean, "corrupt": scored.ld_corrupt},
        nodes=node_dicts(names), edges=edge_dicts(scored, names, listed, per_position), n_edges=n_edges,
        circuit=edge_dicts(scored, names, ranked[:top_n], per_position), faithfulness=measured, curve=curve,
        random_faithfulness=random_values, direct_logit=scored.direct_logit,
        seconds={"scores": scored.seconds, "faithfulness": time.perf_counter() - start},
        settings={"steps": 1 if method == "eap" else steps, "top_n": top_n, "target_faithfulness": target_faithfulness,
                  "top_fraction": top_fraction, "per_position": per_position, "n_random": n_random, "seed": seed},
    )


circuit_cache = BoundedCache(max_entries=8)


def cached_circuit(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str, *,
                   progress: Progress | None = None, **settings) -> CircuitResult:
    """``circuit`` through a small result cache (pages rerun on every click)."""
    key = (handle.name, id(handle), clean, corrupt, answer, wrong, tuple(sorted(settings.items())))
    return circuit_cache.get_or_compute(
        key, lambda: circuit(handle, clean, corrupt, answer, wrong, progress=progress, **settings))


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
    run's on every edge out of it): the normalized metric of the whole model without it, and
    of the circuit without the edges that touch it."""
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
