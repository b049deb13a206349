"""A transcoder-feature attribution graph: circuit-tracer's local replacement model.

Each MLP is replaced by its transcoder: what the MLP adds to the residual stream becomes

    skip(x) + b_dec + Σ_active a_f · W_dec[f] + error,   error = MLP output − reconstruction,

with the features' activations a_f and the errors held at their clean values (leaves of the
replay), attention patterns and norm scales frozen as for neurons (linearize.py). The
replay reproduces the clean run exactly and is affine in the leaves, so every node with
incoming edges equals the sum of its edges plus its bias:
- a feature's value is its pre-activation W_enc[f]·x + b_enc[f] (= its activation, as it
  is active); its edge from a source feature g is a_g · (∂ pre-activation / ∂ write of g
  along W_dec[g]), through the residual stream, frozen attention and skip connections;
- an error node (a layer, position) has no inputs, as in circuit-tracer; it holds the error
  and the active features of its site that are not among the K nodes, so that no
  contribution is lost (with K = every active feature it is exactly circuit-tracer's
  error node);
- at the sink (a document-start token) every feature is zeroed into the error node, as
  circuit-tracer zeroes BOS.
Candidates are every active feature outside the sink; the K nodes are chosen by influence
as circuit-tracer chooses them (attribution.grow_rows).
"""

from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import torch

from backend.errors import UserInputError
from backend.graphs.attribution import (
    MAX_NODES_LIMIT,
    RowStore,
    _assemble,
    _members,
    add_logit_rows,
    grow_rows,
    logit_targets,
    total_effects,
)
from backend.graphs.graph import AttributionGraph
from backend.replacement.transcoders import TranscoderSet, open_transcoders, read_input
from backend.runtime.cache import cached
from backend.runtime.hooks import Hook, edit_site, read_site
from backend.runtime.linearize import LinearReplay, record_frozen
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import encode_prompt, starts_with_special


class TranscoderReplay(LinearReplay):
    """A direct-mode replay in which layer l's MLP output is ``writes[l]`` (a leaf: the
    active features' decoded writes plus the error) + b_dec + skip(x); ``inputs[l]`` is
    the transcoder's input x as replayed (in the autograd graph)."""

    def __init__(self, handle: ModelHandle, frozen, transcoders: TranscoderSet, writes: list[torch.Tensor],
                 embed: torch.Tensor | None = None) -> None:
        super().__init__(handle, frozen, direct=True)
        self.leaves.embed = embed
        self.transcoders, self.writes = transcoders, writes
        n_layers = handle.adapter.n_layers
        self.inputs: list = [None] * n_layers
        self.write_leaves: list = [None] * n_layers

    def _mlp_hooks(self, layer: int) -> list[Hook]:
        return [read_input(self.handle, self.transcoders, layer, partial(self._keep, self.inputs, layer)),
                edit_site(self.handle.adapter.site("mlp_out", layer), partial(self._replace, layer))]

    def _replace(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        leaf = self.writes[layer].to(output.dtype).detach().clone().requires_grad_(True)
        self.write_leaves[layer] = leaf
        out = leaf + self.transcoders.layers[layer].b_dec.to(output.dtype)
        skip = self.transcoders.skip(layer, self.inputs[layer])
        if skip is not None:
            out = out + skip.to(output.dtype)
        return out.expand_as(output)


class Decoded:
    """What each candidate feature writes: per source layer i, the candidates' indices,
    positions and rows a_f · W_dec[f] [n, span, d] (slot s lands on layer i + s's MLP output;
    span 1 for a per-layer set); and each layer's error [P, d] (its write leaf minus every
    candidate's write landing there)."""

    def __init__(self, transcoders: TranscoderSet, candidates: torch.Tensor, activations: torch.Tensor,
                 writes: list[torch.Tensor]) -> None:
        self.groups = []
        for layer in range(transcoders.n_layers):
            index = torch.nonzero(candidates[:, 0] == layer).flatten()
            rows = transcoders.decoder_rows(layer, candidates[index, 2]) * activations[index, None, None]
            self.groups.append((layer, index, candidates[index, 1], rows))
        self.errors = [w[0].clone() for w in writes]
        for layer, error in enumerate(self.errors):
            for _, positions, rows in self.landing_on(layer):
                error.index_add_(0, positions, -rows)
        # per landing layer, blocks of one position: (candidate indices, position, rows [n, d])
        self.blocks = [[(index[block], int(positions[block[0]]), rows[block])
                        for index, positions, rows in self.landing_on(layer) for block in _runs(positions)]
                       for layer in range(transcoders.n_layers)]

    def landing_on(self, layer: int):
        """(candidate indices, positions, rows [n, d]) of the writes landing on ``layer``."""
        for source, index, positions, rows in self.groups:
            if len(index) and source <= layer < source + rows.shape[1]:
                yield index, positions, rows[:, layer - source]


def _runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """Index blocks of equal consecutive values (candidates are sorted by layer, position)."""
    change = torch.nonzero(positions[1:] != positions[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), len(positions)]
    return [torch.arange(a, b, device=positions.device) for a, b in zip(bounds[:-1], bounds[1:])]


class FeatureRowMaker:
    """Direct-effect rows over the replay's leaves: per candidate feature Σ over the layers it
    writes to of g · a_f W_dec[f]; per (layer, position) site, its error's plus every
    candidate read there (RowStore subtracts the listed ones: the error node); embeddings."""

    def __init__(self, replay: TranscoderReplay, decoded: Decoded, candidates: torch.Tensor) -> None:
        self.replay, self.decoded, self.n_candidates = replay, decoded, len(candidates)
        self.site_of_candidate = candidates[:, 0] * replay.embed.shape[1] + candidates[:, 1]

    def contributions(self, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, replay = values.shape[0], self.replay
        leaves = [replay.embed] + replay.write_leaves
        grads = torch.autograd.grad(values, leaves, grad_outputs=torch.eye(n, device=values.device),
                                    is_grads_batched=True, retain_graph=True, allow_unused=True)
        n_layers, n_pos = len(replay.write_leaves), replay.embed.shape[1]
        cand = torch.zeros(n, self.n_candidates, device=values.device)
        site = torch.zeros(n, n_layers, n_pos, device=values.device)
        for layer, grad in enumerate(grads[1:]):
            if grad is None:
                continue
            g = grad[:, 0].detach().float()  # [B, P, d]
            site[:, layer] = (g * self.decoded.errors[layer]).sum(-1)
            for index, pos, rows in self.decoded.blocks[layer]:
                cand[:, index] += g[:, pos] @ rows.T
        site = site.flatten(1).index_add_(1, self.site_of_candidate, cand)
        embed = ((grads[0][:, 0] * replay.embed[0]).sum(-1).detach() if grads[0] is not None
                 else torch.zeros(n, n_pos, device=values.device))
        return cand.cpu().numpy(), site.cpu().numpy(), embed.float().cpu().numpy()


def _clean_transcoder_run(handle: ModelHandle, input_ids: torch.Tensor, transcoders: TranscoderSet, sink: int | None):
    """The frozen clean run, with each layer's feature activations [P, d_tc] (zero at the
    sink, as circuit-tracer zeroes BOS) and write [1, P, d]: the MLP output minus b_dec and
    the skip, i.e. the active features' decoded writes plus the error."""
    adapter = handle.adapter
    inputs: list = [None] * adapter.n_layers
    outputs: list = [None] * adapter.n_layers
    hooks = []
    for layer in range(adapter.n_layers):
        hooks.append(read_input(handle, transcoders, layer, partial(_keep, inputs, layer)))
        hooks.append(read_site(adapter.site("mlp_out", layer), partial(_keep, outputs, layer)))
    frozen = record_frozen(handle, input_ids, extra_hooks=hooks)
    activations, writes = [], []
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            x, out = inputs[layer][0].float(), outputs[layer][0].float()
            a = transcoders.encode(layer, x)
            if sink is not None:
                a[sink] = 0.0
            write = out - transcoders.layers[layer].b_dec
            skip = transcoders.skip(layer, x)
            writes.append((write if skip is None else write - skip)[None])
            activations.append(a)
    return frozen, torch.stack(activations), writes


def _keep(store: list, layer: int, tensor: torch.Tensor) -> None:
    store[layer] = tensor.detach()


def _compute(handle: ModelHandle, folder: str, prompt: str, target: str | None, wrong: str | None, max_nodes: int,
             include: list[tuple[int, int, int]], batch_size: int, progress: Progress) -> AttributionGraph:
    started = time.perf_counter()
    features_set = open_transcoders(folder, handle)
    transcoders = features_set.transcoders.to(handle.device)
    ids = encode_prompt(handle, prompt)
    adapter = handle.adapter
    n_layers, n_pos = adapter.n_layers, len(ids)
    sink = 0 if starts_with_special(handle, ids) and n_pos > 1 else None
    with handle.lock:
        progress(0.02, "Clean run: transcoder features, errors, frozen attention and norms")
        frozen, activations, writes = _clean_transcoder_run(handle, handle.ids(ids), transcoders, sink)
        replay = TranscoderReplay(handle, frozen, transcoders, writes)
        _, logits = replay.forward()
        zero = TranscoderReplay(handle, frozen, transcoders, [torch.zeros_like(w) for w in writes],
                                embed=torch.zeros(1, n_pos, adapter.d_model, device=handle.device))
        with torch.no_grad():
            _, zero_logits = zero.forward()
    candidates = torch.nonzero(activations != 0)  # [n, 3] (layer, pos, feature), sorted, on the model's device
    for unit in include:
        if not (candidates == torch.tensor(unit, device=candidates.device)).all(-1).any():
            raise UserInputError(f"Feature L{unit[0]} F{unit[2]} @{unit[1]} is not active on this prompt.")
    if len(candidates) == 0:
        raise UserInputError("No transcoder feature is active on this prompt outside the sink.")
    values_of = activations[candidates[:, 0], candidates[:, 1], candidates[:, 2]]

    shown_logits = logits[0].detach()
    if adapter.final_softcap:
        shown_logits = torch.tanh(shown_logits / adapter.final_softcap) * adapter.final_softcap
    infos, matrix, weights = logit_targets(handle, shown_logits.float().softmax(-1).cpu(), target, wrong)
    matrix = matrix.to(logits.device)
    store = RowStore((candidates[:, 0] * n_pos + candidates[:, 1]).cpu().numpy(), n_layers * n_pos)
    decoded = Decoded(transcoders, candidates, values_of, writes)
    maker = FeatureRowMaker(replay, decoded, candidates)
    k = min(max_nodes, len(candidates))
    n_batches = math.ceil(len(infos) / batch_size) + math.ceil(k / batch_size)
    progress(0.1, "Logit rows")
    done = add_logit_rows(store, maker, logits[0] @ matrix.T, zero_logits[0] @ matrix.T, batch_size)

    def feature_rows(chosen: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        return _pre_activations(transcoders, replay.inputs, candidates[chosen]), \
            _pre_activations(transcoders, zero.inputs, candidates[chosen]).detach().cpu().numpy()

    index_of = {tuple(unit): i for i, unit in enumerate(candidates.tolist())}
    visited = grow_rows(store, maker, feature_rows, k, batch_size, weights, [index_of[u] for u in include],
                        lambda batch: progress(0.1 + 0.8 * (done + batch) / max(n_batches, 1),
                                               f"Feature rows: batch {done + batch}/{n_batches}"))
    influence = store.influence(weights)
    selected = np.flatnonzero(visited)
    features = candidates[selected].tolist()
    members = _members(candidates.cpu(), values_of.cpu().numpy(), influence, store, weights, visited)

    progress(0.92, "Error nodes: their effect on the targets")
    directions, contributions = total_effects(handle, frozen, matrix, weights, at="mlp_out")
    error_values = _error_values(decoded, selected, directions, n_layers, n_pos)
    graph = _assemble(handle, prompt, ids, infos, weights, features, [(store, selected)], error_values,
                      replay.embed[0].detach().norm(dim=-1).float().cpu().numpy(), False, sink, n_layers, n_pos)
    graph.basis, graph.transcoders = "transcoders", transcoders.source
    graph.other_members = members
    graph.embed_contributions = [float(v) for v in contributions]
    graph.settings = {"max_nodes": max_nodes - len(include), "batch_size": batch_size, "target": target,
                      "wrong": wrong, "other_inputs": False, "candidates": len(candidates),
                      "include": [list(u) for u in include], "transcoders": transcoders.source,
                      "transcoder_width": transcoders.width, "activation": transcoders.activation}
    graph.timings = {"total_s": time.perf_counter() - started}
    progress(1.0, "Graph ready")
    return graph


def _error_values(decoded: Decoded, selected: np.ndarray, directions: dict, n_layers: int,
                  n_pos: int) -> np.ndarray:
    """Each error node's effect on the targets: its site's error and the unlisted features
    read there (each write on the direction v of the MLP output it lands on)."""
    v = torch.stack([torch.stack([directions[(l, p)].float() for p in range(n_pos)]) for l in range(n_layers)])
    values = torch.stack([(decoded.errors[l] * v[l]).sum(-1) for l in range(n_layers)])  # [L, P]
    listed = set(selected.tolist())
    with torch.no_grad():
        for source, index, positions, rows in decoded.groups:
            keep = torch.tensor([int(i) not in listed for i in index.tolist()], dtype=torch.bool, device=index.device)
            for slot in range(rows.shape[1]):
                effect = (rows[keep, slot] * v[source + slot, positions[keep]]).sum(-1)
                values[source].index_add_(0, positions[keep], effect)
    return values.flatten().cpu().numpy().astype(np.float32)


def _pre_activations(transcoders: TranscoderSet, inputs: list[torch.Tensor], units: torch.Tensor) -> torch.Tensor:
    """W_enc[f]·x + b_enc[f] of each (layer, pos, feature) in ``units`` from the replayed inputs."""
    values = []
    for layer, pos, feature in units.tolist():
        t = transcoders.layers[layer]
        values.append(inputs[layer][0, pos].float() @ t.W_enc[feature] + t.b_enc[feature])
    return torch.stack(values)


def feature_graph(
    handle: ModelHandle,
    prompt: str,
    transcoders: str,
    target: str | None = None,
    *,
    wrong: str | None = None,
    max_nodes: int = 200,
    include: list[tuple[int, int, int]] | tuple = (),
    batch_size: int = 32,
    progress: Progress | None = None,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` over the features of the transcoder set in the
    folder ``transcoders`` (cached by model, set, prompt, settings). ``include`` lists
    active features (layer, position, feature) that must become nodes."""
    if not 0 <= max_nodes <= MAX_NODES_LIMIT:
        raise UserInputError(f"max nodes must be between 0 and {MAX_NODES_LIMIT} (got {max_nodes}).")
    if batch_size < 1:
        raise UserInputError("batch size must be at least 1.")
    include = [tuple(int(x) for x in unit) for unit in include]
    set_key = open_transcoders(transcoders, handle).key()
    report = progress or (lambda fraction, message: None)
    return cached(handle, "graph", ("transcoders", set_key, prompt, target, wrong, max_nodes, tuple(include),
                                    batch_size),
                  lambda: _compute(handle, transcoders, prompt, target, wrong, max_nodes + len(include), include,
                                   batch_size, report))
