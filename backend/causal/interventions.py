"""Interventions on the shared model: ablate, scale or steer neurons, heads or residual
directions, and see the prediction before and after.

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
nothing leaks into the next request, even when an error is raised mid-way. Controls against
chance are in controls.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from backend.analyses.inspect_prompt import choose_target, top_k
from backend.errors import UserInputError
from backend.runtime.hooks import edit_site, hooked, read_site
from backend.runtime.models import ModelHandle
from backend.runtime.prompts import encode_prompt, resolve_token, token_text
from backend.runtime.results import JsonResult

OPS = ("zero", "mean", "corrupt", "scale", "add")
KINDS = ("neuron", "head", "resid")
SITE_OF_KIND = {"neuron": "neurons", "head": "heads", "resid": "resid_pre"}


@dataclass(frozen=True)
class Item:
    """One intervention target and operation (see the module doc)."""

    kind: str
    layer: int
    index: int | None = None
    positions: tuple[int, ...] | None = None
    op: str = "zero"
    factor: float = 1.0
    vector: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["positions"] = list(self.positions) if self.positions is not None else None
        data["vector"] = list(self.vector) if self.vector is not None else None
        return {k: v for k, v in data.items() if v is not None or k == "positions"}

    @property
    def label(self) -> str:
        where = "" if self.positions is None else " @" + ",".join(map(str, self.positions))
        if self.kind == "resid":
            return f"L{self.layer} resid{where}"
        return f"L{self.layer} {'N' if self.kind == 'neuron' else 'H'}{self.index}{where}"


def parse_item(handle: ModelHandle, raw, n_pos: int, where: str) -> Item:
    """A validated Item from a spec entry; a plain message names what is wrong."""
    adapter = handle.adapter
    if not isinstance(raw, dict):
        raise UserInputError(f"{where}: expected an object.")
    kind, op = raw.get("kind"), raw.get("op", "zero")
    if kind not in KINDS:
        raise UserInputError(f"{where}.kind: {kind!r} is not one of {', '.join(KINDS)}.")
    if op not in OPS:
        raise UserInputError(f"{where}.op: {op!r} is not one of {', '.join(OPS)}.")
    layer = raw.get("layer")
    if not isinstance(layer, int) or not 0 <= layer < adapter.n_layers:
        raise UserInputError(f"{where}.layer: must be an integer in 0..{adapter.n_layers - 1}.")
    size = {"neuron": adapter.d_mlp, "head": adapter.n_heads}.get(kind)
    index = raw.get("index")
    if size is not None and not (isinstance(index, int) and 0 <= index < size):
        raise UserInputError(f"{where}.index: must be an integer in 0..{size - 1}.")
    positions = raw.get("positions")
    if positions is not None and not all(isinstance(p, int) and 0 <= p < n_pos for p in positions):
        raise UserInputError(f"{where}.positions: must be positions 0..{n_pos - 1} (or null for all).")
    vector = raw.get("vector")
    if kind == "resid" and len(vector or []) != adapter.d_model:
        raise UserInputError(f"{where}.vector: a residual direction needs {adapter.d_model} numbers.")
    factor = raw.get("factor", 1.0)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise UserInputError(f"{where}.factor: must be a number.")
    if kind == "resid" and op not in ("add", "zero", "scale"):
        raise UserInputError(f"{where}.op: residual directions support add, zero and scale.")
    return Item(kind, layer, index if size is not None else None,
                tuple(positions) if positions is not None else None, op, float(factor),
                tuple(float(v) for v in vector) if isinstance(vector, list) else
                (float(vector),) if isinstance(vector, (int, float)) else None)


def parse_items(handle: ModelHandle, spec: dict, n_pos: int) -> list[Item]:
    items = spec.get("interventions")
    if not isinstance(items, list):
        raise UserInputError("The intervention spec needs a list 'interventions'.")
    return [parse_item(handle, raw, n_pos, f"interventions[{i}]") for i, raw in enumerate(items)]


def neuron_items(nodes: list[tuple[int, int, int]], op: str = "zero", factor: float = 1.0) -> list[dict]:
    """Spec entries for neuron nodes (layer, position, neuron) of a graph or path."""
    return [Item("neuron", l, n, (p,), op, factor).to_dict() for l, p, n in nodes]


# ---------------------------------------------------------------- applying items


def _select(handle: ModelHandle, tensor: torch.Tensor, item: Item) -> torch.Tensor:
    """View of the targeted values: neuron [B, P], head [B, P, hd], resid [B, P, d]."""
    if item.kind == "neuron":
        return tensor[..., item.index]
    if item.kind == "head":
        adapter = handle.adapter
        return tensor.view(*tensor.shape[:2], adapter.n_heads, adapter.head_dim)[:, :, item.index]
    return tensor


def _site(handle: ModelHandle, item: Item):
    return handle.adapter.site(SITE_OF_KIND[item.kind], item.layer)


References = dict[tuple[str, str, int], torch.Tensor]  # (op, kind, layer) -> the whole site's value


@torch.no_grad()
def site_references(handle: ModelHandle, items: list[Item], spec: dict) -> References:
    """For every (op, kind, layer) a "mean" or "corrupt" item needs: the whole site's mean
    over ``reference_prompts`` and their positions ([width]) or its value on
    ``corrupt_prompt`` ([P, width]); any item of that site selects its part."""
    needs = sorted({(item.op, item.kind, item.layer) for item in items if item.op in ("mean", "corrupt")})
    references: References = {}
    for op in ("mean", "corrupt"):
        sites = [(kind, layer) for o, kind, layer in needs if o == op]
        if not sites:
            continue
        if op == "mean":
            prompts = spec.get("reference_prompts") or []
            if not prompts:
                raise UserInputError("Mean ablation needs 'reference_prompts'.")
        else:
            if not spec.get("corrupt_prompt"):
                raise UserInputError("Corrupt ablation needs 'corrupt_prompt'.")
            prompts = [spec["corrupt_prompt"]]
        collected: dict[tuple[str, int], list[torch.Tensor]] = {site: [] for site in sites}
        for prompt in prompts:
            hooks = [read_site(handle.adapter.site(SITE_OF_KIND[kind], layer),
                               lambda t, site=(kind, layer): collected[site].append(t[0].clone()))
                     for kind, layer in sites]
            with hooked(handle, hooks):
                handle.logits(handle.ids(encode_prompt(handle, prompt)))
        for site, values in collected.items():
            references[(op, *site)] = torch.cat(values).mean(0) if op == "mean" else values[0]
    return references


def _reference(handle: ModelHandle, references: References, item: Item) -> torch.Tensor | None:
    full = references.get((item.op, item.kind, item.layer))
    if full is None:
        return None
    return (
        _select(handle, full.unsqueeze(0), item)[0] if full.dim() > 1 else _select(handle, full[None, None], item)[0, 0]
    )


def _apply(handle: ModelHandle, tensor: torch.Tensor, item: Item, reference: torch.Tensor | None,
           n_pos: int) -> torch.Tensor:
    """The intervened copy of ``tensor``; ``n_pos`` = the prompt's length (a continuation
    adds positions after it, which "corrupt" leaves alone: the corrupted prompt has none)."""
    tensor = tensor.clone()
    view = _select(handle, tensor, item)
    if item.positions is not None:
        index = torch.tensor(item.positions)
    else:
        index = slice(0, n_pos) if item.op == "corrupt" else slice(None)
    part = view[:, index]
    op, factor = item.op, item.factor
    if item.kind == "resid":
        direction = torch.tensor(item.vector, dtype=tensor.dtype, device=tensor.device)
        if op == "add":
            new = part + factor * direction
        else:
            unit = direction / direction.norm().clamp_min(1e-12)
            along = (part @ unit)[..., None] * unit
            new = part - along if op == "zero" else part + (factor - 1.0) * along
    elif op == "zero":
        new = torch.zeros_like(part)
    elif op == "scale":
        new = part * factor
    elif op == "add":
        vector = item.vector if item.vector is not None else (1.0,)
        value = torch.tensor(vector if len(vector) > 1 else vector[0], dtype=tensor.dtype, device=tensor.device)
        new = part + factor * value
    elif op == "mean":
        new = reference.expand_as(part)
    else:  # corrupt
        if reference.shape[0] != n_pos:
            raise UserInputError("Corrupt ablation needs a corrupted prompt of the same token length.")
        new = reference[index].expand_as(part)
    view[:, index] = new
    return tensor


@contextmanager
def intervened(handle: ModelHandle, spec: dict, n_pos: int, items: list[Item] | None = None) -> Iterator[None]:
    """Apply ``spec`` (or the given ``items``) to every forward inside the block (hooks
    removed on exit)."""
    items = parse_items(handle, spec, n_pos) if items is None else items
    with intervened_rows(handle, spec, n_pos, [items]):
        yield


@contextmanager
def intervened_rows(handle: ModelHandle, spec: dict, n_pos: int, item_sets: list[list[Item]]) -> Iterator[None]:
    """Row r of every batched forward inside the block gets ``item_sets[r]`` (one set
    applies to every row); used to measure many random sets in one forward."""
    with handle.lock:
        references = site_references(handle, [item for items in item_sets for item in items], spec)
        by_site: dict[tuple[str, int], list[tuple[int, Item]]] = {}
        for row, items in enumerate(item_sets):
            for item in items:
                by_site.setdefault((item.kind, item.layer), []).append((row, item))

        def edit(entries: list[tuple[int, Item]], tensor: torch.Tensor) -> torch.Tensor:
            if len(item_sets) == 1:
                for _, item in entries:
                    tensor = _apply(handle, tensor, item, _reference(handle, references, item), n_pos)
                return tensor
            rows = list(tensor.unbind(0))
            for row, item in entries:
                rows[row] = _apply(handle, rows[row][None], item, _reference(handle, references, item), n_pos)[0]
            return torch.stack(rows)

        hooks = [edit_site(handle.adapter.site(SITE_OF_KIND[kind], layer), lambda t, e=entries: edit(e, t))
                 for (kind, layer), entries in by_site.items()]
        with hooked(handle, hooks):
            yield


# ---------------------------------------------------------------- one intervention


@dataclass
class InterventionResult(JsonResult):
    model: str
    prompt: str
    target: dict  # {token, id}
    before: dict  # {top: [{token, id, prob}], target_prob, logit_diff, continuation}
    after: dict
    delta_target_prob: float
    spec: dict = field(default_factory=dict)


@torch.no_grad()
def _snapshot(handle: ModelHandle, ids: list[int], target_id: int, wrong_id: int | None, n_continue: int) -> dict:
    logits = handle.logits(handle.ids(ids))[0, -1].float()
    probs = logits.softmax(-1)
    sequence = list(ids)
    for _ in range(n_continue):  # no KV cache: every step sees the whole sequence, so positions stay valid
        sequence.append(int(handle.logits(handle.ids(sequence))[0, -1].argmax()))
    return {
        "top": top_k(handle, probs, 10),
        "target_prob": float(probs[target_id]),
        "logit_diff": float(logits[target_id] - logits[wrong_id]) if wrong_id is not None else None,
        "continuation": handle.tokenizer.decode(sequence[len(ids):]),
    }


def intervene(handle: ModelHandle, prompt: str, spec: dict) -> InterventionResult:
    """Top tokens, p(target), logit difference and a greedy continuation, before and after."""
    ids = encode_prompt(handle, prompt)
    n_continue = int(spec.get("continue_tokens", 10))
    if not 0 <= n_continue <= 200:
        raise UserInputError("continue_tokens must be between 0 and 200.")
    items = parse_items(handle, spec, len(ids))
    with handle.lock:
        with torch.no_grad():
            probs = handle.logits(handle.ids(ids))[0, -1].float().softmax(-1)
        target_id = choose_target(handle, probs, spec.get("target"))
        wrong_id = resolve_token(handle, spec["wrong"]) if spec.get("wrong") else None
        before = _snapshot(handle, ids, target_id, wrong_id, n_continue)
        with intervened(handle, spec, len(ids), items):
            after = _snapshot(handle, ids, target_id, wrong_id, n_continue)
    return InterventionResult(
        model=handle.name, prompt=prompt, target={"token": token_text(handle, target_id), "id": target_id},
        before=before, after=after, delta_target_prob=after["target_prob"] - before["target_prob"], spec=spec,
    )

