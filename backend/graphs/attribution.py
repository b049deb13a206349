"""Neuron-level attribution graphs (circuit-tracer's method with MLP neurons as features).

Nodes, in this order (rows = targets, columns = sources of ``adjacency``):
  [K top neurons] [L×P "other neurons"] [P token embeddings] [1 bias] [T logit targets]
- a neuron node is one MLP neuron (layer, position, index): the down projection's input;
- "other neurons" (layer, position) carries every neuron of that MLP not among the K,
  in the role of circuit-tracer's error nodes (no incoming edges);
- the bias node carries each node's constant term (zero for bias-free models such as Llama);
- logit targets: the top logits up to 95% probability (at most 10), or one chosen token, or
  the difference of two tokens' logits.

Edge (s -> t) = the direct effect of s on t in the frozen-gain linearization (see
linearize.py): gradient of t's value w.r.t. s's value, through the residual stream and frozen
attention only, times s's value. Each neuron and logit node's value equals the sum of its
incoming edges plus its bias edge. Cost: 4 forwards (clean record, ranking replay, direct
replay, all-zero replay for the bias) + 1 backward to rank neurons, then ceil((K + T) /
batch) batched backwards over one retained graph.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from backend.runtime.cache import results_cache
from backend.errors import UserInputError
from backend.runtime.linearize import linear_forward, record_frozen
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import encode_prompt, resolve_token, token_text, token_texts
from backend.runtime.results import JsonResult

MAX_LOGITS = 10
LOGIT_MASS = 0.95
MAX_NODES_LIMIT = 5000


@dataclass
class AttributionGraph(JsonResult):
    model: str
    prompt: str
    tokens: list[str]
    token_ids: list[int]
    n_layers: int
    features: list[list[int]]  # K rows of [layer, position, neuron]
    activations: list[float]  # K neuron values
    logit_targets: list[dict]  # T rows of {token, id, prob, wrong_id?}
    logit_weights: list[float]  # T weights for influence (probabilities, or 1 for a difference)
    adjacency: np.ndarray  # [N, N], rows = targets, columns = sources
    node_values: np.ndarray  # [N] value of every node (sum of its outgoing effects for inputs)
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    # ------------------------------------------------------------ node layout
    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_layers * self.n_pos)

    @property
    def embed_slice(self) -> slice:
        start = self.error_slice.stop
        return slice(start, start + self.n_pos)

    @property
    def bias_index(self) -> int:
        return self.embed_slice.stop

    @property
    def logit_slice(self) -> slice:
        return slice(self.bias_index + 1, self.bias_index + 1 + len(self.logit_targets))

    @property
    def n_nodes(self) -> int:
        return self.logit_slice.stop

    def node_kind(self, index: int) -> str:
        if index < self.n_features:
            return "neuron"
        if index < self.error_slice.stop:
            return "other"
        if index < self.embed_slice.stop:
            return "embedding"
        if index == self.bias_index:
            return "bias"
        return "logit"

    def node_position(self, index: int) -> tuple[int, int]:
        """(layer, position) of a node; embeddings/bias are layer -1, logits layer n_layers."""
        kind = self.node_kind(index)
        if kind == "neuron":
            layer, pos, _ = self.features[index]
            return layer, pos
        if kind == "other":
            return divmod(index - self.n_features, self.n_pos)
        if kind == "embedding":
            return -1, index - self.embed_slice.start
        if kind == "bias":
            return -1, 0
        return self.n_layers, self.n_pos - 1

    def node_label(self, index: int) -> str:
        kind = self.node_kind(index)
        layer, pos = self.node_position(index)
        if kind == "neuron":
            return f"L{layer} N{self.features[index][2]} @{pos}"
        if kind == "other":
            return f"L{layer} other @{pos}"
        if kind == "embedding":
            return f"emb {self.tokens[pos]!r} @{pos}"
        if kind == "bias":
            return "bias"
        return f"logit {self.logit_targets[index - self.logit_slice.start]['token']!r}"


# ---------------------------------------------------------------- targets


def _logit_targets(
    handle: ModelHandle, probs: torch.Tensor, target: str | None, wrong: str | None
) -> tuple[list[dict], torch.Tensor, list[float]]:
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


# ---------------------------------------------------------------- computation


def _rank_neurons(total_run, target_values: torch.Tensor, weights: torch.Tensor, max_nodes: int) -> list[list[int]]:
    """Top neurons by |total linearized attribution| to the weighted targets (one backward)."""
    grads = torch.autograd.grad((weights * target_values).sum(), total_run.neurons, retain_graph=False)
    scores = torch.stack([(g[0] * v[0]).abs() for g, v in zip(grads, total_run.neurons)])  # [L, P, d_mlp]
    flat = scores.flatten()
    k = min(max_nodes, int((flat > 0).sum()))
    top = flat.topk(k).indices if k else flat.new_zeros(0, dtype=torch.long)
    n_pos, d_mlp = scores.shape[1], scores.shape[2]
    features = [[i // (n_pos * d_mlp), (i // d_mlp) % n_pos, i % d_mlp] for i in top.tolist()]
    return sorted(features)


def _edge_rows(
    run, row_values: torch.Tensor, features: list[list[int]], n_pos: int, batch_size: int, progress: Progress
) -> np.ndarray:
    """Direct-effect contributions of every source node to each row: [R, K + L*P + P]."""
    leaves = [run.embed] + run.neuron_inputs
    n_layers = len(run.neuron_inputs)
    k = len(features)
    feature_index = torch.tensor(features, dtype=torch.long).reshape(-1, 3)
    n_rows = row_values.shape[0]
    out = np.zeros((n_rows, k + n_layers * n_pos + n_pos), dtype=np.float32)
    eye = torch.eye(n_rows, device=row_values.device)
    n_batches = math.ceil(n_rows / batch_size)
    for b in range(n_batches):
        rows = slice(b * batch_size, min(n_rows, (b + 1) * batch_size))
        grads = torch.autograd.grad(
            row_values, leaves, grad_outputs=eye[rows], is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        embed_grad, neuron_grads = grads[0], grads[1:]
        per_neuron = torch.stack(
            [
                (g[:, 0] * v[0]) if g is not None else torch.zeros((rows.stop - rows.start, *v.shape[1:]), device=v.device)
                for g, v in zip(neuron_grads, run.neuron_inputs)
            ],
            dim=1,
        ).detach()  # [B, L, P, d_mlp]
        selected = per_neuron[:, feature_index[:, 0], feature_index[:, 1], feature_index[:, 2]] if k else None
        other = per_neuron.sum(-1)  # [B, L, P]
        if k:
            other.index_put_(
                (torch.arange(other.shape[0])[:, None], feature_index[:, 0][None], feature_index[:, 1][None]),
                -selected,
                accumulate=True,
            )
            out[rows, :k] = selected.cpu().numpy()
        out[rows, k : k + n_layers * n_pos] = other.reshape(other.shape[0], -1).cpu().numpy()
        if embed_grad is not None:
            out[rows, k + n_layers * n_pos :] = (embed_grad[:, 0] * run.embed[0]).sum(-1).detach().cpu().numpy()
        progress(0.3 + 0.65 * (b + 1) / n_batches, f"Edges: batch {b + 1}/{n_batches}")
    return out


def _compute(
    handle: ModelHandle,
    prompt: str,
    target: str | None,
    wrong: str | None,
    max_nodes: int,
    batch_size: int,
    progress: Progress,
) -> AttributionGraph:
    started = time.perf_counter()
    ids = encode_prompt(handle, prompt)
    input_ids = torch.tensor([ids], device=handle.device)
    adapter = handle.adapter
    with handle.lock:
        progress(0.02, "Clean run: freezing attention, norms and MLP gains")
        frozen = record_frozen(handle, input_ids)
        total = linear_forward(handle, frozen, direct=False)
        logits = total.logits[0].detach()
        if adapter.final_softcap:
            logits = torch.tanh(logits / adapter.final_softcap) * adapter.final_softcap
        probs = logits.float().softmax(-1).cpu()
        infos, matrix, weights = _logit_targets(handle, probs, target, wrong)
        matrix = matrix.to(total.logits.device)
        progress(0.1, "Ranking neurons by total attribution (one backward pass)")
        weight_t = torch.tensor(weights, device=total.logits.device)
        features = _rank_neurons(total, total.logits[0] @ matrix.T, weight_t, max_nodes)
        del total
        progress(0.2, "Direct-effect run")
        run = linear_forward(handle, frozen, direct=True)
        zeros = [torch.zeros_like(v) for v in run.neuron_inputs]
        with torch.no_grad():
            at_zero = linear_forward(handle, frozen, direct=True, embed_value=torch.zeros_like(run.embed), neuron_values=zeros)
        row_values = _row_values(run, features, matrix)
        bias_values = _row_values(at_zero, features, matrix).detach().cpu().numpy()
        del at_zero
    # The batched backward passes (most of the time) only walk the recorded autograd graph:
    # no hook is attached any more, so other requests may run the model meanwhile.
    contributions = _edge_rows(run, row_values, features, len(ids), batch_size, progress)
    k, n_layers, n_pos, n_logits = len(features), adapter.n_layers, len(ids), len(infos)
    n_nodes = k + n_layers * n_pos + n_pos + 1 + n_logits
    node_values = _node_values(run, row_values, k, n_nodes)
    del run
    adjacency = np.zeros((n_nodes, n_nodes), dtype=np.float32)
    target_rows = list(range(k)) + list(range(n_nodes - n_logits, n_nodes))
    adjacency[np.ix_(target_rows, range(contributions.shape[1]))] = contributions
    adjacency[target_rows, n_nodes - n_logits - 1] = bias_values
    progress(1.0, "Graph ready")
    return AttributionGraph(
        model=handle.name,
        prompt=prompt,
        tokens=token_texts(handle, ids),
        token_ids=ids,
        n_layers=n_layers,
        features=features,
        activations=[float(node_values[i]) for i in range(k)],
        logit_targets=infos,
        logit_weights=weights,
        adjacency=adjacency,
        node_values=node_values,
        settings={"max_nodes": max_nodes, "batch_size": batch_size, "target": target, "wrong": wrong},
        timings={"total_s": time.perf_counter() - started},
    )


def _row_values(run, features: list[list[int]], matrix: torch.Tensor) -> torch.Tensor:
    """Values of the target rows: K neurons (linearized, in the graph), then T logit targets."""
    neuron_rows = [run.neurons[layer][0, pos, idx] for layer, pos, idx in features]
    logit_rows = run.logits[0] @ matrix.T
    return torch.cat([torch.stack(neuron_rows), logit_rows]) if neuron_rows else logit_rows


def _node_values(run, row_values: torch.Tensor, n_features: int, n_nodes: int) -> np.ndarray:
    """Each node's value: neurons and logit targets their (linearized) value, embeddings
    their vector's norm; "other neurons" and bias nodes, which only send, 0."""
    values = np.zeros(n_nodes, dtype=np.float32)
    rows = row_values.detach().cpu().numpy()
    n_logits = len(rows) - n_features
    values[:n_features] = rows[:n_features]
    values[n_nodes - n_logits :] = rows[n_features:]
    n_pos = run.embed.shape[1]
    embed_start = n_nodes - n_logits - 1 - n_pos
    values[embed_start : embed_start + n_pos] = run.embed[0].norm(dim=-1).detach().cpu().numpy()
    return values


def attribution_graph(
    handle: ModelHandle,
    prompt: str,
    target: str | None = None,
    *,
    wrong: str | None = None,
    max_nodes: int = 200,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> AttributionGraph:
    """The neuron-level attribution graph of ``prompt`` (cached by model, prompt, settings)."""
    if not 0 <= max_nodes <= MAX_NODES_LIMIT:
        raise UserInputError(f"max nodes must be between 0 and {MAX_NODES_LIMIT} (got {max_nodes}).")
    if batch_size < 1:
        raise UserInputError("batch size must be at least 1.")
    key = ("graph", handle.name, id(handle.model), prompt, target, wrong, max_nodes, batch_size)
    report = progress or (lambda fraction, message: None)
    return results_cache.get_or_compute(
        key, lambda: _compute(handle, prompt, target, wrong, max_nodes, batch_size, report)
    )
