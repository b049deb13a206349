"""Computing a neuron-level attribution graph (circuit-tracer's method with MLP neurons in
place of transcoder features); the nodes are described in graph.py.

Edge (s -> t) = the direct effect of s on t in the frozen-gain linearization (linearize.py):
the gradient of t's value w.r.t. s's value, through the residual stream and frozen attention
only, times s's value. Every node with incoming edges equals their sum plus its bias.

Selection, as circuit-tracer's ``attribute()``: the candidates are the neurons of every
(layer, position) except the sink, at most CANDIDATES per (layer, position) by the size of
what they write, |a_j|·||W_down[:, j]||. The logit rows come first; then, batch by batch,
the candidates with the largest influence on the logits through the rows computed so far
(the absolute row-normalized edges, as circuit-tracer's ``compute_partial_influences``:
no cancellation between paths or targets; updated every UPDATE_INTERVAL batches, its
default) get their rows, until K are chosen. Then, with
``other_inputs``, every "other neurons" node gets its row, grouped by layer so that each
backward walks only the layers below it.

Cost: 3 forwards (clean record, direct replay, all-zero replay for the biases) and
ceil(T/B) + ceil(K/B) + Σ_l ceil(P'/B) batched backwards over one retained autograd graph.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from backend.errors import UserInputError
from backend.graphs.graph import AttributionGraph
from backend.runtime.cache import cached
from backend.runtime.hooks import Hook, read_site
from backend.runtime.linearize import Leaves, LinearRun, linear_forward, record_frozen
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import encode_prompt, resolve_token, starts_with_special, token_text, token_texts

MAX_LOGITS = 10
LOGIT_MASS = 0.95
MAX_NODES_LIMIT = 5000
CANDIDATES = 256  # neurons per (layer, position) that may become nodes (by the size of their write)
MEMBERS = 10  # members listed for each "other neurons" node
UPDATE_INTERVAL = 4  # batches chosen per influence update (circuit-tracer's attribute() default)

# ---------------------------------------------------------------- targets


def logit_targets(handle: ModelHandle, probs: torch.Tensor, target: str | None,
                  wrong: str | None) -> tuple[list[dict], torch.Tensor, list[float]]:
    """Targets as rows of a [T, vocab] matrix C (target value = C @ logits) and weights."""
    vocab = probs.shape[-1]
    if wrong:
        if not target:
            raise UserInputError("A logit difference needs both an answer token and a wrong token.")
        answer_id, wrong_id = resolve_token(handle, target), resolve_token(handle, wrong)
        if answer_id == wrong_id:
            raise UserInputError("The answer and wrong tokens are the same token.")
        row = torch.zeros(vocab)
        row[answer_id], row[wrong_id] = 1.0, -1.0
        label = f"{token_text(handle, answer_id)} − {token_text(handle, wrong_id)}"
        info = {"token": label, "id": answer_id, "wrong_id": wrong_id, "prob": float(probs[answer_id])}
        return [info], row[None], [1.0]
    if target:
        ids = [resolve_token(handle, target)]
    else:
        order = probs.argsort(descending=True)[:MAX_LOGITS].tolist()
        cumulative, ids = 0.0, []
        for token_id in order:
            ids.append(token_id)
            cumulative += float(probs[token_id])
            if cumulative >= LOGIT_MASS:
                break
    matrix = torch.full((len(ids), vocab), -1.0 / vocab)  # logit minus the mean logit
    matrix[torch.arange(len(ids)), torch.tensor(ids)] += 1.0
    infos = [{"token": token_text(handle, i), "id": i, "prob": float(probs[i])} for i in ids]
    weights = [float(probs[i]) for i in ids]
    total = sum(weights)
    return infos, matrix, [w / total if total > 0 else 1.0 / len(ids) for w in weights]


def target_matrix(infos: list[dict], vocab: int) -> torch.Tensor:
    """The [T, vocab] matrix of targets already chosen (``infos`` of a graph)."""
    matrix = torch.zeros(len(infos), vocab)
    for t, info in enumerate(infos):
        if "wrong_id" in info:
            matrix[t, info["id"]], matrix[t, info["wrong_id"]] = 1.0, -1.0
        else:
            matrix[t] = -1.0 / vocab
            matrix[t, info["id"]] += 1.0
    return matrix


# ---------------------------------------------------------------- rows


class RowMaker:
    """Direct-effect rows from one retained direct-mode replay: for a batch of row values,
    every source's contribution, kept as candidate neurons, per-site totals over every
    neuron of a (layer, position), and embeddings."""

    def __init__(self, run: LinearRun, candidates: torch.Tensor) -> None:
        self.run = run
        self.candidates = candidates  # [n_cand, 3] (layer, pos, neuron)
        self.leaves = [run.embed] + run.neuron_inputs

    def contributions(self, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = values.shape[0]
        grads = torch.autograd.grad(values, self.leaves, grad_outputs=torch.eye(n, device=values.device),
                                    is_grads_batched=True, retain_graph=True, allow_unused=True)
        embed_grad, neuron_grads = grads[0], grads[1:]
        per_neuron = torch.stack([
            g[:, 0] * v[0] if g is not None else torch.zeros((n, *v.shape[1:]), device=v.device)
            for g, v in zip(neuron_grads, self.run.neuron_inputs)
        ], dim=1).detach()  # [B, L, P, d_mlp]
        c = self.candidates
        cand = per_neuron[:, c[:, 0], c[:, 1], c[:, 2]]
        site = per_neuron.sum(-1).flatten(1)
        embed = ((embed_grad[:, 0] * self.run.embed[0]).sum(-1) if embed_grad is not None
                 else torch.zeros(n, self.run.embed.shape[1], device=values.device))
        return cand.cpu().numpy(), site.cpu().numpy(), embed.detach().cpu().numpy()


class RowStore:
    """Rows in computation order: columns of the candidate neurons [R, n_cand], per-site
    totals over every neuron [R, L·P] and over the candidates [R, L·P], embeddings [R, P];
    each row's value, bias and node ("logit", t) | ("neuron", candidate) | ("other", l, p)."""

    def __init__(self, site_of_candidate: np.ndarray, n_sites: int) -> None:
        self.site_of_candidate = site_of_candidate
        self.n_sites = n_sites
        self.cand: list[np.ndarray] = []
        self.site: list[np.ndarray] = []
        self.cand_site: list[np.ndarray] = []
        self.embed: list[np.ndarray] = []
        self.values: list[float] = []
        self.biases: list[float] = []
        self.nodes: list[tuple] = []

    def add(self, parts: tuple[np.ndarray, np.ndarray, np.ndarray], values: np.ndarray, biases: np.ndarray,
            nodes: list[tuple]) -> None:
        cand, site, embed = parts
        cand_site = np.zeros((cand.shape[0], self.n_sites), dtype=cand.dtype)
        np.add.at(cand_site.T, self.site_of_candidate, cand.T)
        self.cand.append(cand)
        self.site.append(site)
        self.cand_site.append(cand_site)
        self.embed.append(embed)
        self.values += [float(v) for v in values]
        self.biases += [float(b) for b in biases]
        self.nodes += nodes

    def stacked(self, name: str) -> np.ndarray:
        return np.concatenate(getattr(self, name))

    def influence(self, logit_weights: list[float]) -> np.ndarray:
        """Influence on the weighted logits of every candidate, through the rows computed so
        far (circuit-tracer's compute_partial_influences). Columns: the candidates, each
        site's non-candidate neurons as an error node, the embeddings. Influence moves
        between rows by each row's share of its absolute edges; one product then reaches
        every column."""
        cand = self.stacked("cand")
        absolute = np.abs(np.concatenate([cand, self.stacked("site") - self.stacked("cand_site"),
                                          self.stacked("embed")], axis=1))
        normalized = absolute / np.maximum(absolute.sum(axis=1, keepdims=True), 1e-10)
        row_of = {node[1]: r for r, node in enumerate(self.nodes) if node[0] == "neuron"}
        between = np.zeros((len(self.nodes), len(self.nodes)))
        if row_of:
            between[:, list(row_of.values())] = normalized[:, list(row_of.keys())]
        start = np.array([logit_weights[node[1]] if node[0] == "logit" else 0.0 for node in self.nodes])
        reach, current = start.copy(), start
        for _ in range(1000):
            current = current @ between
            if not current.any():
                break
            reach += current
        else:
            raise RuntimeError("influence did not converge: the graph has a cycle")
        return reach @ normalized[:, :cand.shape[1]]


def add_logit_rows(store: RowStore, maker, values: torch.Tensor, at_zero: torch.Tensor, batch_size: int) -> int:
    """The rows of the logit targets (``values`` in the replay's graph, ``at_zero`` their
    biases); returns the number of batches."""
    bias = at_zero.detach().cpu().numpy()
    for start in range(0, len(values), batch_size):
        part = slice(start, min(len(values), start + batch_size))
        store.add(maker.contributions(values[part]), values[part].detach().cpu().numpy(), bias[part],
                  [("logit", t) for t in range(part.start, part.stop)])
    return math.ceil(len(values) / batch_size)


def grow_rows(store: RowStore, maker, row_values: Callable[[np.ndarray], tuple[torch.Tensor, np.ndarray]], k: int,
              batch_size: int, weights: list[float], forced: list[int], progress: Callable[[int], None]) -> np.ndarray:
    """circuit-tracer's selection: ``forced`` candidates first; then, when K covers every
    candidate, all of them in order; else the unvisited candidates with the largest
    influence through the rows so far, UPDATE_INTERVAL batches per influence update (its
    ``update_interval``), until ``k`` have rows. ``row_values(chosen)`` gives their values
    (in the replay's autograd graph) and biases; ``progress(batches done)``. Returns the
    visited mask."""
    n_candidates = len(store.site_of_candidate)
    visited = np.zeros(n_candidates, dtype=bool)
    queue: list[np.ndarray] = [np.array(forced[i:i + batch_size]) for i in range(0, len(forced), batch_size)]
    batches = 0
    while visited.sum() < k:
        if not queue:
            if k >= n_candidates:
                order = np.arange(n_candidates)
            else:
                order = np.argsort(-store.influence(weights), kind="stable")
            pending = order[~visited[order]][:min(UPDATE_INTERVAL * batch_size, k - int(visited.sum()))]
            queue = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
        chosen = queue.pop(0)
        visited[chosen] = True
        values, bias = row_values(chosen)
        store.add(maker.contributions(values), values.detach().cpu().numpy(), bias,
                  [("neuron", int(i)) for i in chosen])
        batches += 1
        progress(batches)
    return visited


# ---------------------------------------------------------------- the computation


def _candidates(handle: ModelHandle, grid: torch.Tensor, sink: int | None,
                include: list[tuple[int, int, int]]) -> torch.Tensor:
    """(layer, pos, neuron) of the candidate neurons: per (layer, position) except the sink,
    the CANDIDATES with the largest write |a|·||W_down column||, plus ``include``; sorted.
    ``grid`` holds every neuron's value [L, P, d_mlp]."""
    adapter = handle.adapter
    norms = torch.stack([adapter.down_proj_weight(l).norm(dim=0) for l in range(adapter.n_layers)])  # [L, d_mlp]
    writes = grid.abs() * norms[:, None, :].to(grid.device)
    top = writes.topk(min(CANDIDATES, writes.shape[-1]), dim=-1).indices.cpu()  # [L, P, C]
    layers, positions = torch.meshgrid(torch.arange(grid.shape[0]), torch.arange(grid.shape[1]), indexing="ij")
    units = torch.stack([layers[..., None].expand_as(top), positions[..., None].expand_as(top), top], dim=-1)
    units = units.reshape(-1, 3)
    if sink is not None:
        units = units[units[:, 1] != sink]
    if include:
        units = torch.cat([units, torch.tensor(include, dtype=torch.long).reshape(-1, 3)])
    return torch.unique(units, dim=0)


def other_value(handle: ModelHandle, neurons: torch.Tensor, unselected: torch.Tensor, direction: torch.Tensor,
                 layer: int) -> torch.Tensor:
    """u · (W_down (a ⊙ unselected)) for one (layer, position); ``neurons`` [..., d_mlp]."""
    return (neurons * unselected) @ (handle.adapter.down_proj_weight(layer).T @ direction)


def total_effects(handle: ModelHandle, frozen, matrix: torch.Tensor, weights: list[float],
                  at: str = "down_proj") -> tuple[dict[tuple[int, int], torch.Tensor], np.ndarray]:
    """Through every path of the linearized model (MLPs included): the gradient v(l, p) of
    the weighted logit targets w.r.t. each MLP's down-projection output (``at="mlp_out"``:
    what the MLP adds to the residual stream; they differ where a norm follows the MLP, as
    in Gemma), and each token embedding's exact contribution to them (gradient ×
    embedding; with the bias they sum to the weighted targets' value)."""
    kept: list = [None] * handle.adapter.n_layers
    if at == "mlp_out":
        hooks = [read_site(handle.adapter.site("mlp_out", layer), partial(_keep, kept, layer))
                 for layer in range(handle.adapter.n_layers)]
    else:
        hooks = [Hook(parts.down_proj, "forward", partial(_keep_output, kept, layer))
                 for layer, parts in enumerate(handle.adapter.layers)]
    with handle.lock:
        total = linear_forward(handle, frozen, direct=False, extra_hooks=hooks)
    objective = (torch.tensor(weights, device=matrix.device) * (total.logits[0] @ matrix.T)).sum()
    grads = torch.autograd.grad(objective, [total.embed] + kept)
    contributions = (grads[0][0] * total.embed[0]).sum(-1).detach().float().cpu().numpy()
    directions = {(l, p): grads[l + 1][0, p].detach() for l in range(len(kept)) for p in range(grads[l + 1].shape[1])}
    return directions, contributions


def _keep_output(store: list, layer: int, module, args, output) -> None:
    store[layer] = output


def _keep(store: list, layer: int, tensor: torch.Tensor) -> None:
    store[layer] = tensor


def _compute(handle: ModelHandle, prompt: str, target: str | None, wrong: str | None, max_nodes: int,
             other_inputs: bool, include: list[tuple[int, int, int]], batch_size: int,
             progress: Progress) -> AttributionGraph:
    started = time.perf_counter()
    ids = encode_prompt(handle, prompt)
    adapter = handle.adapter
    n_layers, n_pos = adapter.n_layers, len(ids)
    sink = 0 if starts_with_special(handle, ids) and n_pos > 1 else None
    for layer, pos, neuron in include:
        if not (0 <= layer < n_layers and 0 <= pos < n_pos and pos != sink and 0 <= neuron < adapter.d_mlp):
            raise UserInputError(f"Cannot add neuron L{layer} N{neuron} @{pos} to this graph.")
    with handle.lock:
        progress(0.02, "Clean run: freezing attention, norms and MLP gains")
        frozen = record_frozen(handle, handle.ids(ids))
        run = linear_forward(handle, frozen, direct=True)
        with torch.no_grad():
            at_zero = linear_forward(handle, frozen, direct=True,
                                     leaves=Leaves(torch.zeros_like(run.embed),
                                                   [torch.zeros_like(v) for v in run.neuron_inputs]))
    # The batched backward passes (most of the time) only walk the recorded autograd graph:
    # no hook is attached any more, so other requests may run the model meanwhile.
    logits = run.logits[0].detach()
    if adapter.final_softcap:
        logits = torch.tanh(logits / adapter.final_softcap) * adapter.final_softcap
    infos, matrix, weights = logit_targets(handle, logits.float().softmax(-1).cpu(), target, wrong)
    matrix = matrix.to(run.logits.device)
    grid = torch.stack([n[0] for n in run.neurons]).detach()  # [L, P, d_mlp]
    zero_grid = torch.stack([n[0] for n in at_zero.neurons]).detach()
    embed_norms = run.embed[0].detach().norm(dim=-1).float().cpu().numpy()

    candidates = _candidates(handle, grid, sink, include)
    c = candidates.to(grid.device)
    n_cand = len(candidates)
    store = RowStore((candidates[:, 0] * n_pos + candidates[:, 1]).numpy(), n_layers * n_pos)
    maker = RowMaker(run, c)
    k = min(max_nodes, n_cand)
    n_batches = math.ceil(len(infos) / batch_size) + math.ceil(k / batch_size)

    progress(0.1, "Logit rows")
    done = add_logit_rows(store, maker, run.logits[0] @ matrix.T, at_zero.logits[0] @ matrix.T, batch_size)

    index_of = {tuple(unit): i for i, unit in enumerate(candidates.tolist())}
    visited = grow_rows(store, maker, partial(_neuron_rows, run.neurons, zero_grid, c), k, batch_size, weights,
                        [index_of[unit] for unit in include],
                        lambda batch: progress(0.1 + 0.5 * (done + batch) / max(n_batches, 1),
                                               f"Neuron rows: batch {done + batch}/{n_batches}"))

    influence = store.influence(weights)
    selected = np.flatnonzero(visited)  # candidates are sorted, so the features are too
    features = candidates[selected].tolist()
    members = _members(candidates, grid[c[:, 0], c[:, 1], c[:, 2]].cpu().numpy(), influence, store, weights, visited)

    # "other neurons" of each (layer, position): what its unselected neurons write, projected on its own direction
    unselected = torch.ones_like(grid)
    chosen_units = c[torch.as_tensor(selected, device=c.device)]
    unselected[chosen_units[:, 0], chosen_units[:, 1], chosen_units[:, 2]] = 0.0
    directions, contributions = total_effects(handle, frozen, matrix, weights)
    other_values = np.zeros(n_layers * n_pos, dtype=np.float32)
    with torch.no_grad():
        for layer in range(n_layers):
            writes = (grid[layer] * unselected[layer]) @ adapter.down_proj_weight(layer).T  # [P, d]
            for pos in range(n_pos):
                other_values[layer * n_pos + pos] = float(writes[pos] @ directions[(layer, pos)])
    stores = [(store, selected)]
    if other_inputs:
        selected_maker = RowMaker(run, chosen_units)
        other_store = RowStore(np.asarray([l * n_pos + p for l, p, _ in features], dtype=int), n_layers * n_pos)
        for layer in range(n_layers):
            sites = [pos for pos in range(n_pos) if pos != sink and directions[(layer, pos)].any()]
            for start in range(0, len(sites), batch_size):
                part = sites[start:start + batch_size]
                values = torch.stack([other_value(handle, run.neurons[layer][0, p], unselected[layer, p],
                                                   directions[(layer, p)], layer) for p in part])
                with torch.no_grad():
                    bias = np.array([float(other_value(handle, zero_grid[layer, p], unselected[layer, p],
                                                        directions[(layer, p)], layer)) for p in part])
                other_store.add(selected_maker.contributions(values), values.detach().cpu().numpy(), bias,
                                [("other", layer, p) for p in part])
            progress(0.6 + 0.35 * (layer + 1) / n_layers, f"Other-neuron rows: layer {layer + 1}/{n_layers}")
        stores.append((other_store, np.arange(len(features))))
    del run, at_zero, maker

    graph = _assemble(handle, prompt, ids, infos, weights, features, stores, other_values, embed_norms, other_inputs,
                      sink, n_layers, n_pos)
    graph.other_members = members
    graph.embed_contributions = [float(v) for v in contributions]
    graph.settings = {"max_nodes": max_nodes - len(include), "batch_size": batch_size, "target": target,
                      "wrong": wrong, "other_inputs": other_inputs, "candidates_per_site": CANDIDATES,
                      "candidates": n_cand, "include": [list(u) for u in include]}
    graph.timings = {"total_s": time.perf_counter() - started}
    progress(1.0, "Graph ready")
    return graph


def _neuron_rows(neurons: list[torch.Tensor], zero_grid: torch.Tensor, candidates: torch.Tensor,
                 chosen: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The chosen candidates' values in the replay's graph, and their biases."""
    units = candidates[torch.as_tensor(chosen, device=candidates.device)]
    values = torch.stack([neurons[l][0, p, j] for l, p, j in units.tolist()])
    return values, zero_grid[units[:, 0], units[:, 1], units[:, 2]].cpu().numpy()


def _assemble(handle, prompt, ids, infos, weights, features, stores, other_values, embed_norms, other_inputs,
              sink, n_layers, n_pos) -> AttributionGraph:
    """The adjacency over [K neurons, L·P others, P embeddings, bias, T logits]. For each
    store, ``columns`` picks the selected neurons' own columns (in feature order); an "other"
    column is its site's total minus the selected neurons there."""
    k, n_logits = len(features), len(infos)
    n_nodes = k + n_layers * n_pos + n_pos + 1 + n_logits
    adjacency = np.zeros((n_nodes, n_nodes), dtype=np.float32)
    values = np.zeros(n_nodes, dtype=np.float32)
    selected_site = np.array([layer * n_pos + pos for layer, pos, _ in features], dtype=int)
    for store, columns in stores:
        feature_row = {int(column): i for i, column in enumerate(columns)}
        selected_cols = store.stacked("cand")[:, columns]
        others = store.stacked("site").copy()
        np.subtract.at(others.T, selected_site, selected_cols.T)
        block = np.concatenate([selected_cols, others, store.stacked("embed"), np.array(store.biases)[:, None]], axis=1)
        for r, node in enumerate(store.nodes):
            if node[0] == "logit":
                row = n_nodes - n_logits + node[1]
            elif node[0] == "neuron":
                row = feature_row[node[1]]
            else:
                row = k + node[1] * n_pos + node[2]
            adjacency[row, :block.shape[1]] = block[r]
            values[row] = store.values[r]
    values[k:k + n_layers * n_pos] = other_values
    values[k + n_layers * n_pos:k + n_layers * n_pos + n_pos] = embed_norms
    return AttributionGraph(
        model=handle.name, prompt=prompt, tokens=token_texts(handle, ids), token_ids=ids, n_layers=n_layers,
        features=[list(map(int, f)) for f in features], activations=[float(values[i]) for i in range(k)],
        logit_targets=infos, logit_weights=weights, adjacency=adjacency, node_values=values,
        other_inputs=other_inputs, sink=sink,
    )


def _members(candidates: torch.Tensor, cand_values: np.ndarray, influence: np.ndarray, store: RowStore,
             weights: list[float], visited: np.ndarray) -> dict[str, list[dict]]:
    """For each "other neurons" node: its candidate members with the largest influence on
    the logits (through the neuron rows), with their direct effect on the weighted logit
    targets."""
    cand = store.stacked("cand")
    logit_rows = [r for r, node in enumerate(store.nodes) if node[0] == "logit"]
    effect = np.asarray(weights) @ cand[logit_rows]
    by_site: dict[str, list[dict]] = {}
    for i in np.argsort(-influence, kind="stable"):
        if visited[i]:
            continue
        layer, pos, neuron = candidates[i].tolist()
        members = by_site.setdefault(f"{layer},{pos}", [])
        if len(members) < MEMBERS:
            members.append({"unit": neuron, "activation": float(cand_values[i]), "influence": float(influence[i]),
                            "logit_effect": float(effect[i])})
    return by_site


def attribution_graph(
    handle: ModelHandle,
    prompt: str,
    target: str | None = None,
    *,
    wrong: str | None = None,
    max_nodes: int = 200,
    other_inputs: bool = True,
    include: list[tuple[int, int, int]] | tuple = (),
    batch_size: int = 32,
    progress: Progress | None = None,
) -> AttributionGraph:
    """The neuron-level attribution graph of ``prompt`` (cached by model, prompt, settings).
    ``include`` lists neurons (layer, position, index) that must become nodes."""
    if not 0 <= max_nodes <= MAX_NODES_LIMIT:
        raise UserInputError(f"max nodes must be between 0 and {MAX_NODES_LIMIT} (got {max_nodes}).")
    if batch_size < 1:
        raise UserInputError("batch size must be at least 1.")
    include = [tuple(int(x) for x in unit) for unit in include]
    report = progress or (lambda fraction, message: None)
    return cached(handle, "graph", (prompt, target, wrong, max_nodes, other_inputs, tuple(include), batch_size),
                  lambda: _compute(handle, prompt, target, wrong, max_nodes + len(include), other_inputs, include,
                                   batch_size, report))
