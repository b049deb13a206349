"""Influential neuron paths (NeuronPath, Wang et al. 2025) for decoder LMs.

Neurons are the inputs of each MLP's down projection, at one position (the last by
default); F = p(target) at the last position. Layer by layer (l = 0 .. L-1), the path found
so far (k neurons per earlier layer) and *all* neurons of layer l are scaled by
alpha_k = k/m (k = 1..m) in one batched forward/backward, and the k neurons j of layer l
with the largest joint attribution

    S_l(j) = [Σ_k (g_lj(α_k) + Σ_{path n} g_n(α_k))] · (a_lj + Σ_{path n} a_n) / m

join the path (g = ∂F/∂activation at the scaled point, a = the clean activation).
The joint attribution score of a whole path (JAS) is the same quantity with only the
path's neurons scaled. Baselines: the most activated neuron per layer, and greedy
gradient × activation (∂F/∂a · a at the clean point). Evaluation as the paper: zero
("remove") or double ("enhance") the path's neurons and report the change in p(target)
and in the top-1 prediction, against the baselines and random paths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from backend.runtime.cache import results_cache
from backend.errors import UserInputError
from backend.runtime.hooks import Hook, hooked
from backend.analyses.inspect_prompt import choose_target
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import encode_prompt, token_text, token_texts
from backend.runtime.results import JsonResult

Path = list[tuple[int, int]]  # (layer, neuron)


@dataclass
class PathResult(JsonResult):
    model: str
    prompt: str
    tokens: list[str]
    target: dict  # {token, id, prob}
    position: int
    path: list[dict]  # {layer, neuron, activation, score}
    jas: float
    baselines: dict  # name -> list of {layer, neuron, activation, score}
    baseline_jas: dict
    evaluation: dict  # remove/enhance -> {path, activation_baseline, gradient_baseline, random_mean, random_std}
    top1_changes: dict  # remove/enhance -> name -> new top-1 token
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


# ---------------------------------------------------------------- scaled runs


def _scaled_run(
    handle: ModelHandle,
    ids: list[int],
    target_id: int,
    position: int,
    scales: dict[int, torch.Tensor],
) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Batch of runs where layer l's neurons at ``position`` are multiplied by ``scales[l]``
    ([B, d_mlp]); returns F = p(target) per row, ∂F/∂(scaled neurons), and each scaled
    layer's activations in the last row (the clean ones: α_m = 1 there)."""
    batch = next(iter(scales.values())).shape[0]
    scaled: dict[int, torch.Tensor] = {}
    clean: dict[int, torch.Tensor] = {}

    def scale_hook(layer: int):
        def fn(module, args):
            h = args[0]
            clean[layer] = h[-1, position].detach()  # the last row is unscaled when its scales are 1
            factor = torch.ones_like(h)
            factor[:, position] = scales[layer]
            x = h * factor
            scaled[layer] = x
            return (x,) + tuple(args[1:])

        return fn

    hooks = [Hook(handle.adapter.layers[l].down_proj, "pre", scale_hook(l)) for l in scales]
    embed_leaf = Hook(handle.adapter.layers[0].block, "pre",
                      lambda m, args: (args[0].detach().requires_grad_(True),) + tuple(args[1:]))
    input_ids = torch.tensor([ids], device=handle.device).expand(batch, -1)
    with hooked(handle, [embed_leaf] + hooks), torch.enable_grad():
        probs = _last_logits(handle, input_ids).float().softmax(-1)[:, target_id]
        layers = sorted(scaled)
        grads = torch.autograd.grad(probs.sum(), [scaled[l] for l in layers])
    return probs.detach(), {l: g[:, position].detach() for l, g in zip(layers, grads)}, clean


def _last_logits(handle: ModelHandle, input_ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits as a 2-D product ([B, d] @ [d, V]); the model's own head on a
    [B, 1, d] input runs a batched matmul over B copies of the unembedding, 10x slower."""
    final = handle.adapter.base(input_ids, use_cache=False).last_hidden_state[:, -1]
    return handle.adapter.logits_from_residual_normed(final)


def _alphas(steps: int, device) -> torch.Tensor:
    return torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps


def _path_scales(handle: ModelHandle, path: Path, alphas: torch.Tensor) -> dict[int, torch.Tensor]:
    d_mlp = handle.adapter.d_mlp
    scales: dict[int, torch.Tensor] = {}
    for layer, neuron in path:
        scale = scales.setdefault(layer, torch.ones(len(alphas), d_mlp, device=alphas.device))
        scale[:, neuron] = alphas
    return scales


def layer_scores(
    handle: ModelHandle, ids: list[int], target_id: int, position: int, path: Path, layer: int, steps: int
) -> np.ndarray:
    """S_layer(j) for every neuron j of ``layer`` given ``path`` (one batched pass)."""
    alphas = _alphas(steps, handle.device)
    scales = _path_scales(handle, path, alphas)
    scales[layer] = alphas[:, None].expand(-1, handle.adapter.d_mlp).clone()
    _, grads, clean = _scaled_run(handle, ids, target_id, position, scales)
    path_grad = sum((grads[l][:, n].sum() for l, n in path), torch.tensor(0.0))
    path_act = sum((clean[l][n] for l, n in path), torch.tensor(0.0))
    scores = (grads[layer].sum(0) + path_grad) * (clean[layer] + path_act) / steps
    return scores.cpu().numpy()


def joint_attribution(handle: ModelHandle, ids: list[int], target_id: int, position: int, path: Path, steps: int) -> float:
    """JAS of ``path``: only its neurons scaled by α_k; (1/m) Σ_k Σ_n g_n(α_k) · Σ_n a_n."""
    alphas = _alphas(steps, handle.device)
    _, grads, clean = _scaled_run(handle, ids, target_id, position, _path_scales(handle, path, alphas))
    total_grad = sum(float(grads[l][:, n].sum()) for l, n in path)
    total_act = sum(float(clean[l][n]) for l, n in path)
    return total_grad * total_act / steps


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def _intervened_probs(
    handle: ModelHandle, ids: list[int], target_id: int, position: int, paths: list[Path], factor: float
) -> tuple[np.ndarray, list[int]]:
    """p(target) and top-1 id when each path's neurons are multiplied by ``factor`` (one row each)."""
    batch = len(paths)
    factors = {}
    for row, path in enumerate(paths):
        for layer, neuron in path:
            factors.setdefault(layer, torch.ones(batch, handle.adapter.d_mlp, device=handle.device))[row, neuron] = factor

    def hook(layer: int):
        def fn(module, args):
            h = args[0].clone()
            h[:, position] = h[:, position] * factors[layer]
            return (h,) + tuple(args[1:])

        return fn

    hooks = [Hook(handle.adapter.layers[l].down_proj, "pre", hook(l)) for l in factors]
    input_ids = torch.tensor([ids], device=handle.device).expand(batch, -1)
    with hooked(handle, hooks):
        logits = _last_logits(handle, input_ids).float()
    probs = logits.softmax(-1)
    return probs[:, target_id].cpu().numpy(), probs.argmax(-1).tolist()


def _rows(path: Path, activations: np.ndarray, scores: list[float]) -> list[dict]:
    return [{"layer": l, "neuron": n, "activation": float(activations[l, n]), "score": float(s)}
            for (l, n), s in zip(path, scores)]


# ---------------------------------------------------------------- the search


def _search(handle, ids, target_id, position, steps, top_k, progress) -> tuple[Path, list[float]]:
    path: Path = []
    scores: list[float] = []
    n_layers = handle.adapter.n_layers
    for layer in range(n_layers):
        layer_score = layer_scores(handle, ids, target_id, position, path, layer, steps)
        chosen = np.argsort(-layer_score, kind="stable")[:top_k]
        path += [(layer, int(j)) for j in chosen]
        scores += [float(layer_score[j]) for j in chosen]
        progress(0.05 + 0.8 * (layer + 1) / n_layers, f"Layer {layer + 1}/{n_layers}: neuron(s) {chosen.tolist()}")
    return path, scores


def _baselines(handle, ids, target_id, position, top_k) -> tuple[dict[str, Path], np.ndarray, dict[str, list[float]]]:
    n_layers = handle.adapter.n_layers
    ones = torch.ones(1, handle.adapter.d_mlp, device=handle.device)
    _, grads, clean = _scaled_run(handle, ids, target_id, position, {l: ones for l in range(n_layers)})
    activations = torch.stack([clean[l] for l in range(n_layers)]).cpu().numpy()
    gxa = torch.stack([grads[l][0] * clean[l] for l in range(n_layers)]).cpu().numpy()
    by_activation = [(l, int(j)) for l in range(n_layers) for j in np.argsort(-activations[l], kind="stable")[:top_k]]
    by_gradient = [(l, int(j)) for l in range(n_layers) for j in np.argsort(-gxa[l], kind="stable")[:top_k]]
    scores = {"activation_baseline": [float(activations[l, n]) for l, n in by_activation],
              "gradient_baseline": [float(gxa[l, n]) for l, n in by_gradient]}
    return {"activation_baseline": by_activation, "gradient_baseline": by_gradient}, activations, scores


def _compute(handle, prompt, target, position, steps, top_k, n_random, seed, progress) -> PathResult:
    started = time.perf_counter()
    ids = encode_prompt(handle, prompt)
    position = len(ids) - 1 if position is None else position
    if not 0 <= position < len(ids):
        raise UserInputError(f"Position {position} is outside the prompt (0..{len(ids) - 1}).")
    if steps < 1 or not 1 <= top_k <= handle.adapter.d_mlp:
        raise UserInputError("Steps must be >= 1 and top-k between 1 and the MLP width.")
    with handle.lock, torch.no_grad():  # every later pass takes the lock itself, so other requests interleave
        probs = handle.model(torch.tensor([ids], device=handle.device)).logits[0, -1].float().softmax(-1)
    target_id = choose_target(handle, probs, target)
    progress(0.02, "Baselines")
    baselines, activations, baseline_scores = _baselines(handle, ids, target_id, position, top_k)
    path, scores = _search(handle, ids, target_id, position, steps, top_k, progress)
    search_s = time.perf_counter() - started
    jas = joint_attribution(handle, ids, target_id, position, path, steps)
    baseline_jas = {name: joint_attribution(handle, ids, target_id, position, p, steps) for name, p in baselines.items()}
    progress(0.9, "Evaluation: remove and enhance")
    rng = np.random.default_rng(seed)
    d_mlp = handle.adapter.d_mlp
    randoms = [[(l, int(j)) for l in range(handle.adapter.n_layers) for j in rng.choice(d_mlp, top_k, replace=False)]
               for _ in range(n_random)]
    named = {"path": path, **baselines}
    base_p = float(probs[target_id])
    evaluation, top1 = {}, {}
    for operation, factor in (("remove", 0.0), ("enhance", 2.0)):
        p, tops = _intervened_probs(handle, ids, target_id, position, list(named.values()) + randoms, factor)
        change = p - base_p
        evaluation[operation] = {name: float(change[i]) for i, name in enumerate(named)}
        evaluation[operation]["random_mean"] = float(change[len(named):].mean()) if n_random else 0.0
        evaluation[operation]["random_std"] = float(change[len(named):].std()) if n_random else 0.0
        top1[operation] = {name: token_text(handle, tops[i]) for i, name in enumerate(named)}
    progress(1.0, "Path ready")
    return PathResult(
        model=handle.name, prompt=prompt, tokens=token_texts(handle, ids),
        target={"token": token_text(handle, target_id), "id": target_id, "prob": base_p}, position=position,
        path=_rows(path, activations, scores), jas=jas,
        baselines={name: _rows(p, activations, baseline_scores[name]) for name, p in baselines.items()},
        baseline_jas=baseline_jas, evaluation=evaluation, top1_changes=top1,
        settings={"steps": steps, "top_k": top_k, "random_paths": n_random, "seed": seed},
        timings={"search_s": search_s, "total_s": time.perf_counter() - started},
    )


def neuron_path(
    handle: ModelHandle, prompt: str, target: str | None = None, *, position: int | None = None, steps: int = 20,
    top_k: int = 1, n_random: int = 50, seed: int = 0, progress: Progress | None = None,
) -> PathResult:
    """The influential neuron path of ``prompt`` for ``target`` (cached)."""
    key = ("paths", handle.name, id(handle.model), prompt, target, position, steps, top_k, n_random, seed)
    report = progress or (lambda fraction, message: None)
    return results_cache.get_or_compute(
        key, lambda: _compute(handle, prompt, target, position, steps, top_k, n_random, seed, report)
    )


def recurring_neurons(results: list[PathResult]) -> list[dict]:
    """Neurons found on several prompts' paths: {layer, neuron, count, prompts}, most frequent first."""
    seen: dict[tuple[int, int], list[str]] = {}
    for result in results:
        for row in result.path:
            seen.setdefault((row["layer"], row["neuron"]), []).append(result.prompt)
    rows = [{"layer": l, "neuron": n, "count": len(p), "prompts": p} for (l, n), p in seen.items()]
    return sorted(rows, key=lambda r: (-r["count"], r["layer"], r["neuron"]))
