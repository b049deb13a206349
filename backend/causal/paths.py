"""Influential neuron paths (NeuronPath, Wang et al. 2025) for decoder LMs, as the authors'
code (``path/joint_attr.py``) computes them, moved from a ViT's CLS token to one position of
the prompt (the last by default); F = p(target) at the last position.

Neurons are the inputs of each MLP's down projection. For layer l = 0 .. L-1, at the path
position, the activations of every layer <= l are *replaced* by constants, in one batch of
m rows (k = 0 .. m-1, alpha_k = k/m):
- layers before l: their clean activations, with the path neurons scaled by alpha_k;
- layer l: all its clean activations scaled by alpha_k;
so no gradient passes through those layers' MLPs at that position (layers after l run
normally). The neuron j of layer l maximizing

    S_l(j) = [Σ_k (g_lj(α_k) + Σ_{path n} g_n(α_k))] · (a_lj + Σ_{path n} a_n) / m

joins the path (g = ∂F/∂(replaced activation), a = the clean activation). The joint
attribution score (JAS) of a path replaces every layer's activations (clean, path neurons
scaled) and is the same sum over the path's neurons only.

Baselines: the most activated neuron per layer (the authors' base path), and greedy
gradient × activation: the joint score above at the clean point only (alpha = 1, no
integration), so each layer's choice is conditioned on the earlier choices through the
summed gradient and activation terms. Evaluation as the paper: zero ("remove") or double
("enhance") each path's neurons in the live model and report the change in p(target) and the
top-1 prediction, against the baselines and random paths (uniform per layer, the path's own
neurons excluded). A baseline may beat the path; the result says which does best.

Speed, exactly: only the path position and later ones change, and the positions before it
are causally unaffected, so their keys and values come from one clean run (a KV cache) and
every batched pass runs only the suffix. Tests compare with an unbatched loop over the full
prompt that follows the authors' code literally.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from backend.analyses.inspect_prompt import choose_target
from backend.errors import UserInputError
from backend.runtime.cache import cached, is_cached
from backend.runtime.hooks import edit_site, hooked, read_site
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import encode_prompt, token_text, token_texts
from backend.runtime.results import JsonResult

Path = list[tuple[int, int]]  # (layer, neuron)
NAMED = ("path", "activation_baseline", "gradient_baseline")
RANDOM_PATHS = 50  # random paths of the same shape in the evaluation (the default)


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
    evaluation: dict  # remove/enhance -> {path, activation_baseline, gradient_baseline, random_mean, random_std, best}
    top1_changes: dict  # remove/enhance -> name -> new top-1 token
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


# ---------------------------------------------------------------- passes over the suffix


class SuffixRunner:
    """Batched passes of the prompt from ``position`` on, the clean prefix's keys and values
    cached (``cache_prefix=False``: the whole prompt in every pass, identical results);
    p(target) read at the last position."""

    def __init__(self, handle: ModelHandle, ids: list[int], position: int, target_id: int | None,
                 cache_prefix: bool = True) -> None:
        """One clean forward gives the neurons' activations, p at the last position (choose
        ``target_id`` from ``clean_probs`` when None is given) and the prefix's keys and
        values (the whole prompt's, cropped: a causal model's prefix is unchanged; models
        with sliding-window layers run the prefix again)."""
        self.handle, self.ids, self.position = handle, ids, position
        self.start = position if cache_prefix else 0  # the first position each pass runs
        self.at = position - self.start  # the path position within a pass
        self.prefix = None
        acts: dict[int, torch.Tensor] = {}
        adapter = handle.adapter
        hooks = [read_site(adapter.site("neurons", l), lambda t, l=l: acts.__setitem__(l, t[0, position].detach()))
                 for l in range(adapter.n_layers)]
        with hooked(handle, hooks), torch.no_grad():
            out = adapter.base(handle.ids(ids), use_cache=self.start > 0)
            logits = adapter.logits_from_residual_normed(out.last_hidden_state[0, -1]).float()
        if self.start > 0:
            self.prefix = out.past_key_values
            if any(self.prefix.is_sliding):  # a sliding window keeps too little to crop back: run the prefix
                with handle.lock, torch.no_grad():
                    self.prefix = adapter.base(handle.ids(ids[:self.start]), use_cache=True).past_key_values
            else:
                self.prefix.crop(self.start - len(ids))  # the suffix's entries removed
        self.clean_probs = logits.softmax(-1)
        self.target_id = int(self.clean_probs.argmax()) if target_id is None else target_id
        self.clean_acts = torch.stack([acts[l] for l in range(adapter.n_layers)])  # [L, d_mlp]

    def _final(self, batch: int) -> torch.Tensor:
        """The final-normed residual stream at the last position for ``batch`` suffix rows
        (call inside ``hooked``)."""
        suffix = self.handle.ids(self.ids[self.start:], batch)
        if self.prefix is None:
            out = self.handle.adapter.base(suffix, use_cache=False)
        else:
            cache = copy.deepcopy(self.prefix)
            cache.batch_repeat_interleave(batch)
            out = self.handle.adapter.base(suffix, past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1]

    def probs_and_grads(self, leaves: dict[int, torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """p(target) per row when layer l's activations at the path position are replaced by
        the constants ``leaves[l]`` ([B, d_mlp]), and ∂p/∂leaves (each row its own run)."""
        adapter = self.handle.adapter
        leaves = {l: v.detach().clone().requires_grad_(True) for l, v in leaves.items()}

        def replace(layer: int, tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.clone()
            tensor[:, self.at] = leaves[layer]
            return tensor

        hooks = [edit_site(adapter.site("neurons", l), lambda t, l=l: replace(l, t)) for l in leaves]
        batch = next(iter(leaves.values())).shape[0]
        with hooked(self.handle, hooks), torch.enable_grad():
            probs = adapter.logits_from_residual_normed(self._final(batch)).float().softmax(-1)[:, self.target_id]
        layers = sorted(leaves)
        grads = torch.autograd.grad(probs.sum(), [leaves[l] for l in layers])
        return probs.detach(), dict(zip(layers, grads))

    @torch.no_grad()
    def intervened(self, paths: list[Path], factor: float) -> tuple[np.ndarray, list[int]]:
        """p(target) and the top-1 id when each path's neurons are multiplied by ``factor`` in
        the live model (one row per path)."""
        adapter = self.handle.adapter
        factors: dict[int, torch.Tensor] = {}
        for row, path in enumerate(paths):
            for layer, neuron in path:
                factors.setdefault(layer, torch.ones(len(paths), adapter.d_mlp, device=self.handle.device))[
                    row, neuron
                ] = factor

        def scale(layer: int, tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.clone()
            tensor[:, self.at] = tensor[:, self.at] * factors[layer]
            return tensor

        hooks = [edit_site(adapter.site("neurons", l), lambda t, l=l: scale(l, t)) for l in factors]
        with hooked(self.handle, hooks):
            probs = adapter.logits_from_residual_normed(self._final(len(paths))).float().softmax(-1)
        return probs[:, self.target_id].cpu().numpy(), probs.argmax(-1).tolist()


def _alphas(steps: int, device) -> torch.Tensor:
    """alpha_k = k/m for k = 0 .. m-1, the authors' grid."""
    return torch.arange(steps, device=device, dtype=torch.float32) / steps


def path_leaves(clean_acts: torch.Tensor, path: Path, layers: range, alphas: torch.Tensor) -> dict[int, torch.Tensor]:
    """For each layer in ``layers``: its clean activations, with its path neurons scaled by alpha ([m, d_mlp])."""
    leaves = {l: clean_acts[l].expand(len(alphas), -1).clone() for l in layers}
    for layer, neuron in path:
        if layer in leaves:
            leaves[layer][:, neuron] = alphas * clean_acts[layer, neuron]
    return leaves


def layer_scores(runner: SuffixRunner, path: Path, layer: int, steps: int) -> np.ndarray:
    """S_layer(j) for every neuron j of ``layer`` given the ``path`` so far (one batched pass)."""
    alphas = _alphas(steps, runner.clean_acts.device)
    leaves = path_leaves(runner.clean_acts, path, range(layer), alphas)
    leaves[layer] = alphas[:, None] * runner.clean_acts[layer][None]
    _, grads = runner.probs_and_grads(leaves)
    acts = runner.clean_acts
    path_grad = sum((grads[l][:, n].sum() for l, n in path), torch.tensor(0.0))
    path_act = sum((acts[l, n] for l, n in path), torch.tensor(0.0))
    return ((grads[layer].sum(0) + path_grad) * (acts[layer] + path_act) / steps).cpu().numpy()


def joint_attribution(runner: SuffixRunner, path: Path, steps: int) -> float:
    """JAS of ``path``: every layer replaced (clean, the path scaled by alpha);
    (1/m) Σ_k Σ_n g_n(α_k) · Σ_n a_n over the path's neurons n."""
    alphas = _alphas(steps, runner.clean_acts.device)
    _, grads = runner.probs_and_grads(path_leaves(runner.clean_acts, path, range(runner.clean_acts.shape[0]), alphas))
    total_grad = sum(float(grads[l][:, n].sum()) for l, n in path)
    total_act = sum(float(runner.clean_acts[l, n]) for l, n in path)
    return total_grad * total_act / steps


# ---------------------------------------------------------------- the search and the baselines


def _greedy(runner: SuffixRunner, n_layers: int, top_k: int, score_layer, progress: Progress,
            on_layer: Callable[[Path, list[float]], None] | None = None) -> tuple[Path, list[float]]:
    path: Path = []
    scores: list[float] = []
    for layer in range(n_layers):
        layer_score = score_layer(path, layer)
        chosen = np.argsort(-layer_score, kind="stable")[:top_k]
        path += [(layer, int(j)) for j in chosen]
        scores += [float(layer_score[j]) for j in chosen]
        progress((layer + 1) / n_layers, f"Layer {layer + 1}/{n_layers}: neuron(s) {chosen.tolist()}")
        if on_layer is not None:
            on_layer(path, scores)
    return path, scores


def _rows(path: Path, activations: np.ndarray, scores: list[float]) -> list[dict]:
    return [{"layer": l, "neuron": n, "activation": float(activations[l, n]), "score": float(s)}
            for (l, n), s in zip(path, scores)]


def _random_paths(rng: np.random.Generator, n_layers: int, d_mlp: int, top_k: int, exclude: Path, n: int) -> list[Path]:
    """``n`` paths of ``top_k`` distinct neurons per layer, drawn uniformly without ``exclude``."""
    pools = [np.setdiff1d(np.arange(d_mlp), [j for l, j in exclude if l == layer]) for layer in range(n_layers)]
    return [[(layer, int(j)) for layer in range(n_layers) for j in rng.choice(pools[layer], top_k, replace=False)]
            for _ in range(n)]


def _compute(handle, prompt, target, position, steps, top_k, n_random, seed, progress, on_layer,
             cache_prefix: bool = True) -> PathResult:
    started = time.perf_counter()
    ids = encode_prompt(handle, prompt)
    position = len(ids) - 1 if position is None else position
    if not 0 <= position < len(ids):
        raise UserInputError(f"Position {position} is outside the prompt (0..{len(ids) - 1}).")
    adapter = handle.adapter
    if steps < 1 or not 1 <= top_k <= adapter.d_mlp:
        raise UserInputError("Steps must be >= 1 and top-k between 1 and the MLP width.")
    runner = SuffixRunner(handle, ids, position, None, cache_prefix)
    probs = runner.clean_probs
    target_id = runner.target_id = choose_target(handle, probs, target)
    n_layers = adapter.n_layers
    acts = runner.clean_acts.cpu().numpy()

    def integrated(path: Path, layer: int) -> np.ndarray:
        return layer_scores(runner, path, layer, steps)

    def at_clean_point(path: Path, layer: int) -> np.ndarray:
        _, grads = runner.probs_and_grads(path_leaves(runner.clean_acts, path, range(layer + 1),
                                                       torch.ones(1, device=runner.clean_acts.device)))
        path_grad = sum(float(grads[l][0, n]) for l, n in path)
        path_act = sum(float(acts[l, n]) for l, n in path)
        return ((grads[layer][0] + path_grad) * (runner.clean_acts[layer] + path_act)).cpu().numpy()

    path, scores = _greedy(runner, n_layers, top_k, integrated, lambda f, m: progress(0.02 + 0.78 * f, m), on_layer)
    search_s = time.perf_counter() - started
    progress(0.82, "Baselines")
    by_activation = [(l, int(j)) for l in range(n_layers) for j in np.argsort(-acts[l], kind="stable")[:top_k]]
    gradient, gradient_scores = _greedy(runner, n_layers, top_k, at_clean_point, lambda f, m: None)
    baselines = {"activation_baseline": by_activation, "gradient_baseline": gradient}
    baseline_scores = {"activation_baseline": [float(acts[l, n]) for l, n in by_activation],
                       "gradient_baseline": gradient_scores}
    jas = joint_attribution(runner, path, steps)
    baseline_jas = {name: joint_attribution(runner, p, steps) for name, p in baselines.items()}
    progress(0.9, "Evaluation: remove and enhance")
    randoms = _random_paths(np.random.default_rng(seed), n_layers, adapter.d_mlp, top_k, path, n_random)
    named = {"path": path, **baselines}
    base_p = float(probs[target_id])
    evaluation, top1 = {}, {}
    for operation, factor, better in (("remove", 0.0, min), ("enhance", 2.0, max)):
        p, tops = runner.intervened(list(named.values()) + randoms, factor)
        change = p - base_p
        evaluation[operation] = {name: float(change[i]) for i, name in enumerate(named)}
        evaluation[operation]["random_mean"] = float(change[len(named):].mean()) if n_random else 0.0
        evaluation[operation]["random_std"] = float(change[len(named):].std()) if n_random else 0.0
        evaluation[operation]["best"] = better(NAMED, key=lambda name: evaluation[operation][name])
        top1[operation] = {name: token_text(handle, tops[i]) for i, name in enumerate(named)}
    progress(1.0, "Path ready")
    return PathResult(
        model=handle.name, prompt=prompt, tokens=token_texts(handle, ids),
        target={"token": token_text(handle, target_id), "id": target_id, "prob": base_p}, position=position,
        path=_rows(path, acts, scores), jas=jas,
        baselines={name: _rows(p, acts, baseline_scores[name]) for name, p in baselines.items()},
        baseline_jas=baseline_jas, evaluation=evaluation, top1_changes=top1,
        settings={"steps": steps, "top_k": top_k, "random_paths": n_random, "seed": seed},
        timings={"search_s": search_s, "total_s": time.perf_counter() - started},
    )


def neuron_path(
    handle: ModelHandle, prompt: str, target: str | None = None, *, position: int | None = None, steps: int = 20,
    top_k: int = 1, n_random: int = RANDOM_PATHS, seed: int = 0, progress: Progress | None = None,
    on_layer: Callable[[Path, list[float]], None] | None = None, cache_prefix: bool = True,
) -> PathResult:
    """The influential neuron path of ``prompt`` for ``target`` (cached). ``on_layer``
    receives the path found so far after each layer (pages draw it as it grows);
    ``cache_prefix=False`` runs the whole prompt in every pass (for comparison: same result)."""
    report = progress or (lambda fraction, message: None)
    return cached(handle, "paths", (prompt, target, position, steps, top_k, n_random, seed, cache_prefix),
                  lambda: _compute(handle, prompt, target, position, steps, top_k, n_random, seed, report, on_layer,
                                   cache_prefix))


def path_ready(handle: ModelHandle, prompt: str, target: str | None = None, *, steps: int = 20,
               top_k: int = 1) -> bool:
    """Whether ``neuron_path`` with these arguments (the others at their defaults) would
    return at once (cached)."""
    return is_cached(handle, "paths", (prompt, target, None, steps, top_k, RANDOM_PATHS, 0, True))


def recurring_neurons(results: list[PathResult]) -> list[dict]:
    """Neurons found on several prompts' paths: {layer, neuron, count, prompts}, most frequent first."""
    seen: dict[tuple[int, int], list[str]] = {}
    for result in results:
        for row in result.path:
            seen.setdefault((row["layer"], row["neuron"]), []).append(result.prompt)
    rows = [{"layer": l, "neuron": n, "count": len(p), "prompts": p} for (l, n), p in seen.items()]
    return sorted(rows, key=lambda r: (-r["count"], r["layer"], r["neuron"]))
