"""Interventions on the shared model, and controls against chance.

A spec (dict / JSON) lists items, each a target and an operation:
  {"kind": "neuron", "layer": 12, "index": 345, "positions": [4] or null (= all), "op": "zero"}
  {"kind": "head",   "layer": 3,  "index": 2,   "op": "scale", "factor": 2.0}
  {"kind": "resid",  "layer": 5,  "vector": [...], "op": "add", "factor": 4.0}   (steering)
Operations: "zero", "mean" (mean over ``reference_prompts`` and their positions),
"corrupt" (the value on ``corrupt_prompt``, same token length), "scale" (× factor), "add"
(+ factor · vector; for resid the vector lives in the residual stream, for a neuron or
head it is a number / a head-sized vector). For "resid", "zero" and "scale" act on the
component along ``vector`` only. Graph nodes and supernodes are neuron items at their
positions.

Hooks live only inside ``intervened`` (a context manager, under the model's lock), so
nothing leaks into the next request, even when an error is raised mid-way.

Controls: (1) the same operation on many random sets of neurons/heads from the same layers
(a null distribution, z-score, empirical p-value); (2) "dead salmon": the same
intervention and null distribution on a copy of the architecture with re-initialized
weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from backend.runtime.cache import BoundedCache, results_cache
from backend.errors import UserInputError
from backend.runtime.hooks import Hook, hooked
from backend.analyses.inspect_prompt import choose_target, top_k
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import encode_prompt, resolve_token, token_text
from backend.runtime.results import JsonResult

OPS = ("zero", "mean", "corrupt", "scale", "add")
KINDS = ("neuron", "head", "resid")


@dataclass
class InterventionResult(JsonResult):
    model: str
    prompt: str
    target: dict  # {token, id}
    before: dict  # {top: [{token, id, prob}], target_prob, logit_diff, continuation}
    after: dict
    delta_target_prob: float
    spec: dict = field(default_factory=dict)


@dataclass
class ControlResult(JsonResult):
    observed: float  # change in p(target) of the claimed set
    null: list[float]  # the same change for random sets of the same kinds and layers
    z_score: float
    p_value: float  # (1 + #{|null| >= |observed|}) / (n + 1)
    dead_salmon: dict | None = None  # {observed, null_mean, null_std, z_score, p_value} on a random network


# ---------------------------------------------------------------- validation


def _check_items(handle: ModelHandle, spec: dict, n_pos: int) -> list[dict]:
    adapter = handle.adapter
    items = spec.get("interventions")
    if not isinstance(items, list):
        raise UserInputError("The intervention spec needs a list 'interventions'.")
    checked = []
    for i, item in enumerate(items):
        where = f"interventions[{i}]"
        if not isinstance(item, dict):
            raise UserInputError(f"{where}: expected an object.")
        kind, op = item.get("kind"), item.get("op", "zero")
        if kind not in KINDS:
            raise UserInputError(f"{where}.kind: {kind!r} is not one of {', '.join(KINDS)}.")
        if op not in OPS:
            raise UserInputError(f"{where}.op: {op!r} is not one of {', '.join(OPS)}.")
        layer = item.get("layer")
        if not isinstance(layer, int) or not 0 <= layer < adapter.n_layers:
            raise UserInputError(f"{where}.layer: must be an integer in 0..{adapter.n_layers - 1}.")
        size = {"neuron": adapter.d_mlp, "head": adapter.n_heads}.get(kind)
        if size is not None and not (isinstance(item.get("index"), int) and 0 <= item["index"] < size):
            raise UserInputError(f"{where}.index: must be an integer in 0..{size - 1}.")
        positions = item.get("positions")
        if positions is not None and not all(isinstance(p, int) and 0 <= p < n_pos for p in positions):
            raise UserInputError(f"{where}.positions: must be positions 0..{n_pos - 1} (or null for all).")
        if kind == "resid" and len(item.get("vector") or []) != adapter.d_model:
            raise UserInputError(f"{where}.vector: a residual direction needs {adapter.d_model} numbers.")
        if op in ("scale", "add") and not isinstance(item.get("factor", 1.0), (int, float)):
            raise UserInputError(f"{where}.factor: must be a number.")
        checked.append({**item, "op": op})
    return checked


# ---------------------------------------------------------------- site access


def _site(handle: ModelHandle, item: dict):
    parts = handle.adapter.layers[item["layer"]]
    return {"neuron": parts.down_proj, "head": parts.o_proj, "resid": parts.block}[item["kind"]]


def _select(handle: ModelHandle, tensor: torch.Tensor, item: dict) -> torch.Tensor:
    """View of the targeted values: neuron [B, P], head [B, P, hd], resid [B, P, d]."""
    if item["kind"] == "neuron":
        return tensor[..., item["index"]]
    if item["kind"] == "head":
        adapter = handle.adapter
        return tensor.view(*tensor.shape[:2], adapter.n_heads, adapter.head_dim)[:, :, item["index"]]
    return tensor


@torch.no_grad()
def _reference_values(handle: ModelHandle, items: list[dict], spec: dict) -> dict[int, torch.Tensor]:
    """Per item: the replacement value for "mean" ([...]) or "corrupt" ([P, ...])."""
    values: dict[int, torch.Tensor] = {}
    needs = [(i, it) for i, it in enumerate(items) if it["op"] in ("mean", "corrupt")]
    if not needs:
        return values
    for op in ("mean", "corrupt"):
        chosen = [(i, it) for i, it in needs if it["op"] == op]
        if not chosen:
            continue
        if op == "mean":
            prompts = spec.get("reference_prompts") or []
            if not prompts:
                raise UserInputError("Mean ablation needs 'reference_prompts'.")
        else:
            if not spec.get("corrupt_prompt"):
                raise UserInputError("Corrupt ablation needs 'corrupt_prompt'.")
            prompts = [spec["corrupt_prompt"]]
        collected: dict[int, list[torch.Tensor]] = {i: [] for i, _ in chosen}
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(handle, prompt)], device=handle.device)
            hooks = []
            for i, item in chosen:
                def keep(module, args, i=i, item=item):
                    collected[i].append(_select(handle, args[0], item)[0].clone())
                hooks.append(Hook(_site(handle, item), "pre", keep))
            with hooked(handle, hooks):
                handle.model(ids, use_cache=False)
        for i, _ in chosen:
            values[i] = torch.cat(collected[i]).mean(0) if op == "mean" else collected[i][0]
    return values


def _apply(handle: ModelHandle, tensor: torch.Tensor, item: dict, reference: torch.Tensor | None,
           n_pos: int) -> torch.Tensor:
    """The intervened copy of ``tensor``; ``n_pos`` = the prompt's length (a continuation
    adds positions after it, which "corrupt" leaves alone: the corrupted prompt has none)."""
    tensor = tensor.clone()
    view = _select(handle, tensor, item)
    positions = item.get("positions")
    if positions is not None:
        index = torch.tensor(positions)
    else:
        index = slice(0, n_pos) if item["op"] == "corrupt" else slice(None)
    part = view[:, index]
    op, factor = item["op"], float(item.get("factor", 1.0))
    if item["kind"] == "resid":
        direction = torch.tensor(item["vector"], dtype=tensor.dtype, device=tensor.device)
        if op == "add":
            new = part + factor * direction
        else:
            unit = direction / direction.norm().clamp_min(1e-12)
            along = (part @ unit)[..., None] * unit
            new = part - along if op == "zero" else part + (factor - 1.0) * along if op == "scale" else None
            if new is None:
                raise UserInputError("Residual directions support add, zero and scale.")
    elif op == "zero":
        new = torch.zeros_like(part)
    elif op == "scale":
        new = part * factor
    elif op == "add":
        new = part + factor * torch.as_tensor(item.get("vector", 1.0), dtype=tensor.dtype, device=tensor.device)
    elif op == "mean":
        new = reference.expand_as(part)
    else:  # corrupt
        if reference.shape[0] != n_pos:
            raise UserInputError("Corrupt ablation needs a corrupted prompt of the same token length.")
        new = reference[index].expand_as(part)
    view[:, index] = new
    return tensor


@contextmanager
def intervened(handle: ModelHandle, spec: dict, n_pos: int) -> Iterator[None]:
    """Apply ``spec`` to every forward inside the block (hooks removed on exit)."""
    items = _check_items(handle, spec, n_pos)
    with handle.lock:
        references = _reference_values(handle, items, spec)
        hooks = []
        for i, item in enumerate(items):
            def fn(module, args, i=i, item=item):
                return (_apply(handle, args[0], item, references.get(i), n_pos),) + tuple(args[1:])
            hooks.append(Hook(_site(handle, item), "pre", fn))
        with hooked(handle, hooks):
            yield


# ---------------------------------------------------------------- one intervention


@torch.no_grad()
def _snapshot(handle: ModelHandle, ids: list[int], target_id: int, wrong_id: int | None, n_continue: int) -> dict:
    logits = handle.model(torch.tensor([ids], device=handle.device), use_cache=False).logits[0, -1].float()
    probs = logits.softmax(-1)
    sequence = list(ids)
    for _ in range(n_continue):  # no KV cache: every step sees the whole sequence, so positions stay valid
        nxt = handle.model(torch.tensor([sequence], device=handle.device), use_cache=False).logits[0, -1].argmax()
        sequence.append(int(nxt))
    return {
        "top": top_k(handle, probs, 10),
        "target_prob": float(probs[target_id]),
        "logit_diff": float(logits[target_id] - logits[wrong_id]) if wrong_id is not None else None,
        "continuation": handle.tokenizer.decode(sequence[len(ids):]),
        "logits": logits,
    }


def intervene(handle: ModelHandle, prompt: str, spec: dict) -> InterventionResult:
    """Top tokens, p(target), logit difference and a greedy continuation, before and after."""
    ids = encode_prompt(handle, prompt)
    n_continue = int(spec.get("continue_tokens", 10))
    if not 0 <= n_continue <= 200:
        raise UserInputError("continue_tokens must be between 0 and 200.")
    with handle.lock:
        with torch.no_grad():
            probs = handle.model(torch.tensor([ids], device=handle.device)).logits[0, -1].float().softmax(-1)
        target_id = choose_target(handle, probs, spec.get("target"))
        wrong_id = resolve_token(handle, spec["wrong"]) if spec.get("wrong") else None
        before = _snapshot(handle, ids, target_id, wrong_id, n_continue)
        with intervened(handle, spec, len(ids)):
            after = _snapshot(handle, ids, target_id, wrong_id, n_continue)
    before.pop("logits"), after.pop("logits")
    return InterventionResult(
        model=handle.name, prompt=prompt, target={"token": token_text(handle, target_id), "id": target_id},
        before=before, after=after, delta_target_prob=after["target_prob"] - before["target_prob"], spec=spec,
    )


# ---------------------------------------------------------------- controls


def random_like(handle: ModelHandle, spec: dict, rng: np.random.Generator) -> dict:
    """The same items with each neuron/head index redrawn uniformly within its layer."""
    items = []
    for item in spec["interventions"]:
        size = {"neuron": handle.adapter.d_mlp, "head": handle.adapter.n_heads}.get(item["kind"])
        items.append({**item, "index": int(rng.integers(size))} if size else dict(item))
    return {**spec, "interventions": items}


@torch.no_grad()
def _effect(handle: ModelHandle, ids: list[int], target_id: int, spec: dict, base: float) -> float:
    with intervened(handle, spec, len(ids)):
        logits = handle.model(torch.tensor([ids], device=handle.device), use_cache=False).logits[0, -1]
    return float(logits.float().softmax(-1)[target_id]) - base


def _null(handle, ids, target_id, spec, n_random, seed, progress, label) -> tuple[float, list[float]]:
    with torch.no_grad():
        base = float(handle.model(torch.tensor([ids], device=handle.device)).logits[0, -1].float().softmax(-1)[target_id])
    observed = _effect(handle, ids, target_id, spec, base)
    rng = np.random.default_rng(seed)
    null = []
    for i in range(n_random):
        null.append(_effect(handle, ids, target_id, random_like(handle, spec, rng), base))
        if i % 10 == 0:
            progress((i + 1) / n_random, f"{label}: random set {i + 1}/{n_random}")
    return observed, null


def _summary(observed: float, null: list[float]) -> dict:
    values = np.asarray(null)
    std = float(values.std()) if len(values) else 0.0
    z = (observed - float(values.mean())) / std if std > 0 else math.copysign(math.inf, observed or 1.0)
    p = (1 + int((np.abs(values) >= abs(observed)).sum())) / (len(values) + 1)
    return {"observed": observed, "null_mean": float(values.mean()) if len(values) else 0.0, "null_std": std,
            "z_score": z, "p_value": p}


_salmon_cache = BoundedCache(max_entries=1)


def dead_salmon(handle: ModelHandle, seed: int = 0) -> ModelHandle:
    """A copy of the architecture with freshly initialized weights (same tokenizer)."""
    def build() -> ModelHandle:
        from transformers import AutoModelForCausalLM

        from backend.runtime.arch import build_adapter

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(handle.model.config, attn_implementation="eager",
                                                 dtype=torch.float32)
        model.to(handle.device).eval().requires_grad_(False)
        return ModelHandle(name=f"{handle.name} (re-initialized)", model=model, tokenizer=handle.tokenizer,
                           adapter=build_adapter(model), device=handle.device)

    return _salmon_cache.get_or_compute((handle.name, id(handle.model), seed), build)


def controls(
    handle: ModelHandle, prompt: str, spec: dict, n_random: int = 100, seed: int = 0, salmon: bool = True,
    progress: Progress | None = None,
) -> ControlResult:
    """Null distribution of random same-layer sets, and the dead-salmon control (cached)."""
    if not 1 <= n_random <= 2000:
        raise UserInputError("The number of random sets must be between 1 and 2000.")
    report = progress or (lambda fraction, message: None)
    key = ("controls", handle.name, id(handle.model), prompt, repr(spec), n_random, seed, salmon)

    def compute() -> ControlResult:
        ids = encode_prompt(handle, prompt)
        with torch.no_grad():
            probs = handle.model(torch.tensor([ids], device=handle.device)).logits[0, -1].float().softmax(-1)
        target_id = choose_target(handle, probs, spec.get("target"))
        observed, null = _null(handle, ids, target_id, spec, n_random, seed,
                               lambda f, m: report(0.5 * f if salmon else f, m), "trained model")
        summary = _summary(observed, null)
        salmon_summary = None
        if salmon:
            random_model = dead_salmon(handle, seed)
            s_observed, s_null = _null(random_model, ids, target_id, spec, n_random, seed,
                                       lambda f, m: report(0.5 + 0.5 * f, m), "re-initialized model")
            salmon_summary = _summary(s_observed, s_null)
        report(1.0, "controls done")
        return ControlResult(observed=observed, null=null, z_score=summary["z_score"], p_value=summary["p_value"],
                             dead_salmon=salmon_summary)

    return results_cache.get_or_compute(key, compute)


def neuron_items(nodes: list[tuple[int, int, int]], op: str = "zero", factor: float = 1.0) -> list[dict]:
    """Intervention items for neuron nodes (layer, position, neuron) of a graph or path."""
    return [{"kind": "neuron", "layer": l, "index": n, "positions": [p], "op": op, "factor": factor} for l, p, n in nodes]
