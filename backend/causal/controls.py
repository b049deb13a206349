"""Controls for a claimed set of neurons or heads: can the same effect come from chance, or
from the method itself?

Effect: what the intervention does to the target's logit (its logit minus the mean logit,
at the last position), measured against the same model's own baseline and expressed in
units of that model's logit spread (the standard deviation of its logits over the
vocabulary), so a trained and a random network can be compared. The change in p(target) is
reported too.

1. **Null distribution.** The same operation on ``n_random`` random sets of the same shape:
   each claimed unit is replaced by another unit of its layer at the same positions, never a
   claimed one, never twice in a set. ``null="matched"`` (default) draws it among the units
   whose activation magnitude on this prompt is nearest the claimed unit's (so units that
   are merely large do not beat random ones by construction); ``null="plain"`` draws
   uniformly. z = (observed - null mean) / null std and the empirical p-value are both
   two-sided around the null mean: p = (1 + #{|null - mean| >= |observed - mean|}) / (n + 1).
2. **Dead salmon.** The same *analysis* re-run on the same architecture with re-initialized
   weights: the re-initialized network picks its own set by the same selection rule (its own
   graph's most influential neurons, its own path, or its own top gradient × activation
   units), the same operation is applied, and its effect and null are measured against its
   own baseline. An explanation whose effect is as large in a random network explains
   nothing. (Applying the trained model's units to the random network is not this control:
   the random network's p(target) is ~1e-5, so no effect could show.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from backend.analyses.inspect_prompt import choose_target
from backend.causal.interventions import Item, intervened_rows, parse_items
from backend.errors import UserInputError
from backend.runtime.cache import cache_named, cached
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import encode_prompt, token_text
from backend.runtime.results import JsonResult
from backend.runtime.trace import run_trace

NULLS = ("matched", "plain")
SELECTIONS = ("graph", "path", "attribution")
MATCH_WINDOW = 0.02  # matched nulls draw among the nearest 2% of a layer's units (at least 8)
ROWS_PER_FORWARD = 32
salmon_cache = cache_named("salmon_models", 1)


@dataclass
class ControlSide(JsonResult):
    """One model's claimed set, its effect and its null distribution."""

    label: str  # "trained model" / "re-initialized model"
    selection: str  # how the set was chosen, in words
    items: list[dict]
    baseline_logit: float  # target logit - mean logit, no intervention
    logit_spread: float  # std of the baseline logits over the vocabulary
    observed: float  # change of (target logit - mean logit), in logit spreads
    observed_logit: float  # the same change in logits
    observed_prob: float  # change in p(target)
    null: list[float]  # the same quantity as ``observed`` for each random set
    null_mean: float
    null_std: float
    z_score: float
    p_value: float


@dataclass
class ControlResult(JsonResult):
    target: dict  # {token, id}
    null_kind: str  # "matched" or "plain"
    trained: ControlSide
    dead_salmon: ControlSide | None = None
    sidedness: str = "two-sided around the null mean (z and p alike)"
    settings: dict = field(default_factory=dict)


# ---------------------------------------------------------------- measuring


@torch.no_grad()
def _logit_readout(handle: ModelHandle, ids: list[int], target_id: int, spec: dict,
                   item_sets: list[list[Item]]) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """For each set: (target logit - mean logit) and p(target) after the intervention; and
    the baseline's value, p and logit spread."""
    logits = handle.logits(handle.ids(ids))[0, -1].float()
    base = float(logits[target_id] - logits.mean())
    base_p = float(logits.softmax(-1)[target_id])
    values, probs = [], []
    for start in range(0, len(item_sets), ROWS_PER_FORWARD):
        chunk = item_sets[start:start + ROWS_PER_FORWARD]
        with intervened_rows(handle, spec, len(ids), chunk):
            out = handle.logits(handle.ids(ids, len(chunk)))[:, -1].float()
        values += (out[:, target_id] - out.mean(-1)).tolist()
        probs += out.softmax(-1)[:, target_id].tolist()
    return np.asarray(values), np.asarray(probs), base, base_p, float(logits.std())


def _magnitudes(handle: ModelHandle, prompt: str) -> dict[str, np.ndarray]:
    """|activation| of every neuron [L, P, d_mlp] and output norm of every head [L, P, H]."""
    trace = run_trace(handle, prompt, heads=True, neurons=True)
    return {"neuron": np.abs(trace.neurons), "head": np.linalg.norm(trace.head_out, axis=-1)}


def _unit_magnitude(magnitudes: dict, item: Item) -> np.ndarray:
    """Each unit of the item's layer: its mean magnitude over the item's positions."""
    layer = magnitudes[item.kind][item.layer]  # [P, width]
    return (layer if item.positions is None else layer[list(item.positions)]).mean(0)


def random_sets(handle: ModelHandle, items: list[Item], n: int, rng: np.random.Generator, null: str,
                magnitudes: dict | None) -> list[list[Item]]:
    """``n`` random sets shaped like ``items`` (module doc): same kinds, layers and positions,
    never a claimed unit, never a unit twice in one set; residual directions are kept."""
    if null not in NULLS:
        raise UserInputError(f"Unknown null '{null}'; choose matched or plain.")
    claimed = {(item.kind, item.layer, item.index) for item in items}
    sets = []
    for _ in range(n):
        used = set(claimed)
        drawn = []
        for item in items:
            if item.kind == "resid":
                drawn.append(item)
                continue
            width = handle.adapter.d_mlp if item.kind == "neuron" else handle.adapter.n_heads
            pool = np.array([j for j in range(width) if (item.kind, item.layer, j) not in used])
            if not len(pool):
                raise UserInputError(f"Layer {item.layer} has no unclaimed {item.kind}s left for a random set.")
            if null == "matched":
                magnitude = _unit_magnitude(magnitudes, item)
                window = max(8, math.ceil(MATCH_WINDOW * width))
                nearest = np.argsort(np.abs(magnitude[pool] - magnitude[item.index]), kind="stable")[:window]
                pool = pool[nearest]
            index = int(rng.choice(pool))
            used.add((item.kind, item.layer, index))
            drawn.append(replace(item, index=index))
        sets.append(drawn)
    return sets


def _summary(observed: float, null: np.ndarray) -> tuple[float, float, float, float]:
    """(null mean, null std, z, p), z and p both two-sided around the null mean."""
    if not len(null):
        return 0.0, 0.0, 0.0, 1.0
    mean, std = float(null.mean()), float(null.std())
    distance = abs(observed - mean)
    z = (observed - mean) / std if std > 0 else (0.0 if distance == 0 else math.copysign(math.inf, observed - mean))
    p = (1 + int((np.abs(null - mean) >= distance).sum())) / (len(null) + 1)
    return mean, std, z, p


def measure(handle: ModelHandle, prompt: str, target_id: int, spec: dict, items: list[Item], label: str,
            selection: str, n_random: int, null: str, seed: int) -> ControlSide:
    """The claimed set's effect and its null distribution on ``handle``."""
    ids = encode_prompt(handle, prompt)
    rng = np.random.default_rng(seed)
    magnitudes = _magnitudes(handle, prompt) if null == "matched" else None
    sets = [items] + random_sets(handle, items, n_random, rng, null, magnitudes)
    values, probs, base, base_p, spread = _logit_readout(handle, ids, target_id, spec, sets)
    spread = spread if spread > 0 else 1.0
    effects = (values - base) / spread
    mean, std, z, p = _summary(float(effects[0]), effects[1:])
    return ControlSide(label=label, selection=selection, items=[item.to_dict() for item in items],
                       baseline_logit=base, logit_spread=spread, observed=float(effects[0]),
                       observed_logit=float(values[0] - base), observed_prob=float(probs[0] - base_p),
                       null=effects[1:].tolist(), null_mean=mean, null_std=std, z_score=z, p_value=p)


# ---------------------------------------------------------------- the dead salmon


def dead_salmon(handle: ModelHandle, seed: int = 0) -> ModelHandle:
    """The same architecture with freshly initialized weights (same tokenizer), cached."""

    def build() -> ModelHandle:
        from transformers import AutoModelForCausalLM

        from backend.runtime.arch import build_adapter

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(handle.model.config, attn_implementation="eager", dtype=torch.float32)
        model.to(handle.device).eval().requires_grad_(False)
        return ModelHandle(name=f"{handle.name} (re-initialized)", model=model, tokenizer=handle.tokenizer,
                           adapter=build_adapter(model), device=handle.device)

    return cached(handle, "dead_salmon", (seed,), build, salmon_cache)


def _attribution_units(
    handle: ModelHandle, prompt: str, target_id: int, kind: str, n: int
) -> list[tuple[int, int, int]]:
    """The ``n`` (layer, position, index) units with the largest |gradient × activation| on
    the target's logit minus the mean logit (heads: summed over their output dimensions)."""
    from backend.runtime.hooks import embed_leaf, hooked, read_site

    ids = encode_prompt(handle, prompt)
    site = "neurons" if kind == "neuron" else "heads"
    kept: list = [None] * handle.adapter.n_layers
    hooks = [embed_leaf(handle)] + [read_site(handle.adapter.site(site, l), lambda t, l=l: kept.__setitem__(l, t))
                                    for l in range(handle.adapter.n_layers)]
    with hooked(handle, hooks), torch.enable_grad():
        logits = handle.logits(handle.ids(ids))[0, -1].float()
        grads = torch.autograd.grad(logits[target_id] - logits.mean(), kept)
    scores = torch.stack([(g * a)[0] for g, a in zip(grads, kept)])  # [L, P, width]
    if kind == "head":
        scores = scores.view(*scores.shape[:2], handle.adapter.n_heads, handle.adapter.head_dim).sum(-1)
    flat = scores.abs().flatten()
    top = flat.topk(min(n, len(flat))).indices.tolist()
    n_pos, width = scores.shape[1], scores.shape[2]
    return [(i // (n_pos * width), (i // width) % n_pos, i % width) for i in top]


def select_like(
    handle: ModelHandle, prompt: str, target_id: int, items: list[Item], selection: dict
) -> tuple[list[Item], str]:
    """``handle``'s own set chosen by ``selection`` (the rule that chose ``items`` on the
    trained model), each unit taking the operation of the claimed item in its place."""
    method = selection.get("method", "attribution")
    if method not in SELECTIONS:
        raise UserInputError(f"Unknown selection '{method}'; choose from {', '.join(SELECTIONS)}.")
    neurons = [item for item in items if item.kind == "neuron"]
    heads = [item for item in items if item.kind == "head"]
    target = "#" + str(target_id)
    if method == "graph":
        from backend.graphs.attribution import attribution_graph
        from backend.graphs.prune import prune

        graph = attribution_graph(handle, prompt, target, max_nodes=int(selection.get("max_nodes", 200)))
        influence = prune(graph).influence[:graph.n_features]
        order = np.argsort(-influence, kind="stable")[:len(neurons)]
        units = [tuple(graph.features[i]) for i in order]  # (layer, position, neuron)
        described = (
            f"its own attribution graph's {len(units)} most influential neurons (K = {selection.get('max_nodes', 200)})"
        )
    elif method == "path":
        from backend.causal.paths import neuron_path

        path = neuron_path(handle, prompt, target, steps=int(selection.get("steps", 20)),
                           top_k=int(selection.get("top_k", 1)), n_random=0)
        units = [(row["layer"], path.position, row["neuron"]) for row in path.path]
        described = f"its own NeuronPath ({len(units)} neurons)"
    else:
        units = _attribution_units(handle, prompt, target_id, "neuron", len(neurons))
        described = f"its own {len(units)} neurons with the largest |gradient × activation|"
    chosen = [replace(template, layer=l, index=i, positions=(p,)) for template, (l, p, i) in zip(neurons, units)]
    if heads:
        head_units = _attribution_units(handle, prompt, target_id, "head", len(heads))
        chosen += [replace(template, layer=l, index=i) for template, (l, _, i) in zip(heads, head_units)]
        described += f" and {len(head_units)} heads with the largest |gradient × output|"
    chosen += [item for item in items if item.kind == "resid"]
    return chosen, described


# ---------------------------------------------------------------- both controls


def controls(handle: ModelHandle, prompt: str, spec: dict, n_random: int = 100, seed: int = 0, salmon: bool = True,
             null: str = "matched", progress: Progress | None = None) -> ControlResult:
    """The null distribution and the dead-salmon control of ``spec``'s items (cached).
    ``spec["selection"]`` names the rule that chose them ({"method": "graph", "max_nodes":
    200} | {"method": "path", "steps": 20} | {"method": "attribution"}, the default)."""
    if not 1 <= n_random <= 2000:
        raise UserInputError("The number of random sets must be between 1 and 2000.")
    if null not in NULLS:
        raise UserInputError(f"Unknown null '{null}'; choose matched or plain.")
    report = progress or (lambda fraction, message: None)

    def compute() -> ControlResult:
        ids = encode_prompt(handle, prompt)
        items = parse_items(handle, spec, len(ids))
        if not items:
            raise UserInputError("Nothing to control: the spec has no interventions.")
        with torch.no_grad():
            probs = handle.logits(handle.ids(ids))[0, -1].float().softmax(-1)
        target_id = choose_target(handle, probs, spec.get("target"))
        selection = spec.get("selection") or {"method": "attribution"}
        report(0.05, f"trained model: the claimed set and {n_random} random sets")
        trained = measure(handle, prompt, target_id, spec, items, "trained model", "as claimed", n_random, null, seed)
        salmon_side = None
        if salmon:
            report(0.45, "re-initialized model: re-running the selection")
            random_model = dead_salmon(handle, seed)
            own, described = select_like(random_model, prompt, target_id, items, selection)
            report(0.7, f"re-initialized model: its set and {n_random} random sets")
            salmon_side = measure(random_model, prompt, target_id, spec, own, "re-initialized model", described,
                                  n_random, null, seed)
        report(1.0, "controls done")
        return ControlResult(target={"token": token_text(handle, target_id), "id": target_id}, null_kind=null,
                             trained=trained, dead_salmon=salmon_side,
                             settings={"n_random": n_random, "seed": seed, "selection": selection})

    return cached(handle, "controls", (prompt, repr(spec), n_random, seed, salmon, null), compute)
