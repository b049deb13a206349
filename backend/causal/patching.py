"""Activation patching, attribution patching (AtP) and relevance patching (RelP).

Setting (denoising): run the *corrupted* prompt, put back the *clean* value of one site,
and measure the logit difference LD = logit(answer) - logit(wrong) at the last position,
normalized so that 0 = the corrupted run and 1 = the clean run.

Sites: ``resid_pre`` (block input), ``attn_out`` and ``mlp_out`` (what attention / the MLP
add to the residual stream), each per layer x position; ``heads`` (one head's output at
every position), per layer x head.

- exact: one patched forward per site, many sites per batched forward;
- AtP: (a_clean - a_corrupt) · ∂LD/∂a on the corrupted run (one forward + one backward);
- RelP: the same with the gradient of the LRP-linearized corrupted run (frozen norm scales,
  identity rule on activations, half rule on gated products; attention kept, or frozen).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from backend.errors import UserInputError
from backend.runtime.hooks import Hook, first_tensor, hooked
from backend.runtime.linearize import linear_forward, record_frozen
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import encode_prompt, resolve_token, token_texts
from backend.runtime.results import JsonResult

SITES = ("resid_pre", "attn_out", "mlp_out", "heads")
METHODS = ("exact", "atp", "relp")


@dataclass
class PatchResult(JsonResult):
    model: str
    clean: str
    corrupt: str
    answer: str
    wrong: str
    tokens: list[str]  # clean tokens
    corrupt_tokens: list[str]
    metric: dict  # {"clean": LD, "corrupt": LD}
    grids: dict  # site -> method -> [layers][positions or heads]
    pearson: dict  # site -> {"atp": r, "relp": r} (with the exact grid)
    seconds: dict  # method -> seconds (all sites)
    settings: dict = field(default_factory=dict)


# ---------------------------------------------------------------- inputs


def check_pair(handle: ModelHandle, clean: str, corrupt: str) -> tuple[list[int], list[int]]:
    clean_ids, corrupt_ids = encode_prompt(handle, clean), encode_prompt(handle, corrupt)
    if len(clean_ids) != len(corrupt_ids):
        raise UserInputError(
            f"The clean prompt has {len(clean_ids)} tokens and the corrupted one {len(corrupt_ids)}; "
            "patching needs equal token lengths."
        )
    if clean_ids == corrupt_ids:
        raise UserInputError("The clean and corrupted prompts are the same.")
    return clean_ids, corrupt_ids


# Words to swap for one another when a prompt has no two names: a corrupted prompt then asks
# the same question about another entity.
SWAP_WORDS = (
    ("France", "Italy", "Germany", "Spain", "Japan", "China", "Egypt", "Canada", "Brazil", "Russia", "India"),
    ("Paris", "Rome", "Berlin", "Madrid", "Tokyo", "London", "Cairo", "Moscow"),
    ("Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah"),
    ("he", "she"), ("his", "her"), ("man", "woman"), ("king", "queen"),
    ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
)


def propose_corruption(prompt: str, handle: ModelHandle | None = None) -> str:
    """A corrupted prompt: swap two names (the last occurrence of the most repeated
    capitalized name becomes the other name: "..., John gave a drink to" -> "..., Mary gave
    a drink to"); else replace the last word found in SWAP_WORDS by another of its group with
    the same token length (needs ``handle``): "The capital of France is" -> "... Italy is"."""
    words = re.findall(r"\b[A-Z][a-z]+\b", prompt)
    names = [w for w in dict.fromkeys(words) if words.index(w) > 0 or prompt.find(w) > 0]
    repeated = max(names, key=words.count) if names else None
    if len(names) >= 2 and words.count(repeated) >= 2:
        other = next(n for n in names if n != repeated)
        start = [m.start() for m in re.finditer(rf"\b{repeated}\b", prompt)][-1]
        return prompt[:start] + other + prompt[start + len(repeated):]
    if handle is not None:
        replaced = _replace_same_length(handle, prompt)
        if replaced:
            return replaced
    raise UserInputError("No two names or known words to swap in the prompt; type a corrupted prompt instead.")


def _replace_same_length(handle: ModelHandle, prompt: str) -> str | None:
    length = len(encode_prompt(handle, prompt))
    found = [(m.start(), m.group(), group) for group in SWAP_WORDS
             for m in re.finditer(rf"\b({'|'.join(group)})\b", prompt)]
    for start, word, group in sorted(found, reverse=True):  # the last word first
        for other in group:
            candidate = prompt[:start] + other + prompt[start + len(word):]
            if other != word and len(encode_prompt(handle, candidate)) == length:
                return candidate
    return None


# ---------------------------------------------------------------- reading and writing sites


def _site_modules(handle: ModelHandle, site: str, layer: int):
    parts = handle.adapter.layers[layer]
    return {"resid_pre": (parts.block, "pre"), "attn_out": (parts.attn_out, "forward"),
            "mlp_out": (parts.mlp_out, "forward"), "heads": (parts.o_proj, "pre")}[site]


def _capture_hooks(handle: ModelHandle, store: dict[str, list]) -> list[Hook]:
    """Hooks that keep every site's tensor (in the autograd graph when there is one)."""
    hooks = []
    for site in SITES:
        store[site] = [None] * handle.adapter.n_layers
        for layer in range(handle.adapter.n_layers):
            module, kind = _site_modules(handle, site, layer)

            def keep(module, args, output=None, site=site, layer=layer, kind=kind):
                store[site][layer] = args[0] if kind == "pre" else first_tensor(output)

            hooks.append(Hook(module, kind, keep))
    return hooks


def _logit_difference(handle: ModelHandle, final: torch.Tensor, answer: int, wrong: int) -> torch.Tensor:
    """LD at the last position from the final-normed residual stream ([B, P, d] -> [B])."""
    logits = final[:, -1] @ handle.adapter.unembed_weight()[[answer, wrong]].T
    if handle.adapter.final_softcap:
        logits = torch.tanh(logits / handle.adapter.final_softcap) * handle.adapter.final_softcap
    return logits[:, 0] - logits[:, 1]


def _embed_leaf_hook(handle: ModelHandle) -> Hook:
    def fn(module, args):
        return (args[0].detach().requires_grad_(True),) + tuple(args[1:])

    return Hook(handle.adapter.layers[0].block, "pre", fn)


@torch.no_grad()
def _run_clean(handle: ModelHandle, ids: torch.Tensor, answer: int, wrong: int) -> tuple[dict, float]:
    store: dict[str, list] = {}
    with hooked(handle, _capture_hooks(handle, store)):
        final = handle.adapter.base(ids, use_cache=False).last_hidden_state
    cache = {site: [t[0].detach().clone() for t in tensors] for site, tensors in store.items()}
    return cache, float(_logit_difference(handle, final, answer, wrong)[0])


# ---------------------------------------------------------------- exact patching


def _grid_shape(handle: ModelHandle, site: str, n_pos: int) -> tuple[int, int]:
    return handle.adapter.n_layers, handle.adapter.n_heads if site == "heads" else n_pos


def _patch_hooks(handle: ModelHandle, site: str, jobs: list[tuple[int, int]], cache: dict) -> list[Hook]:
    """Hooks making row r of the batch the corrupted run with site jobs[r] set to clean."""
    adapter = handle.adapter
    hooks = []
    for layer in sorted({l for l, _ in jobs}):
        rows = torch.tensor([r for r, (l, _) in enumerate(jobs) if l == layer])
        index = torch.tensor([i for l, i in jobs if l == layer])
        clean = cache[site][layer]
        module, kind = _site_modules(handle, site, layer)

        def patch(tensor: torch.Tensor, rows=rows, index=index, clean=clean) -> torch.Tensor:
            tensor = tensor.clone()
            if site == "heads":
                view = tensor.view(tensor.shape[0], tensor.shape[1], adapter.n_heads, adapter.head_dim)
                clean_heads = clean.view(clean.shape[0], adapter.n_heads, adapter.head_dim)
                view[rows, :, index] = clean_heads[:, index].transpose(0, 1)
            else:
                tensor[rows, index] = clean[index]
            return tensor

        if kind == "pre":
            hooks.append(Hook(module, "pre", lambda m, args, patch=patch: (patch(args[0]),) + tuple(args[1:])))
        else:
            def forward(m, args, output, patch=patch):
                if isinstance(output, tuple):
                    return (patch(output[0]),) + tuple(output[1:])
                return patch(output)

            hooks.append(Hook(module, "forward", forward))
    return hooks


@torch.no_grad()
def exact_grid(
    handle: ModelHandle, corrupt_ids: torch.Tensor, site: str, cache: dict, answer: int, wrong: int,
    batch_size: int = 64, progress: Progress | None = None,
) -> np.ndarray:
    """LD of the corrupted run with each single site of ``site`` patched to clean (raw LD)."""
    n_layers, n_cols = _grid_shape(handle, site, corrupt_ids.shape[1])
    jobs = [(l, i) for l in range(n_layers) for i in range(n_cols)]
    values = np.zeros(len(jobs), dtype=np.float64)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        with hooked(handle, _patch_hooks(handle, site, chunk, cache)):
            final = handle.adapter.base(corrupt_ids.expand(len(chunk), -1), use_cache=False).last_hidden_state
        values[start:start + len(chunk)] = _logit_difference(handle, final, answer, wrong).double().cpu().numpy()
        if progress:
            progress(min(1.0, (start + len(chunk)) / len(jobs)), f"exact {site}: {start + len(chunk)}/{len(jobs)}")
    return values.reshape(n_layers, n_cols)


# ---------------------------------------------------------------- AtP and RelP


def _first_order(handle: ModelHandle, store: dict, grads: dict, cache: dict) -> dict[str, np.ndarray]:
    """(a_clean - a_corrupt) · grad per site: [L, P] (heads: [L, H], summed over positions)."""
    adapter = handle.adapter
    out = {}
    for site in SITES:
        rows = []
        for layer in range(adapter.n_layers):
            diff = (cache[site][layer] - store[site][layer][0].detach()) * grads[site][layer][0]
            if site == "heads":
                rows.append(diff.view(diff.shape[0], adapter.n_heads, adapter.head_dim).sum(dim=(0, 2)))
            else:
                rows.append(diff.sum(-1))
        out[site] = torch.stack(rows).double().cpu().numpy()
    return out


def _gradients(store: dict, metric: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    flat = [t for site in SITES for t in store[site]]
    grads = torch.autograd.grad(metric, flat, allow_unused=True)
    out, i = {}, 0
    for site in SITES:
        n = len(store[site])
        out[site] = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[i:i + n], store[site])]
        i += n
    return out


def atp_grids(handle: ModelHandle, corrupt_ids, cache: dict, answer: int, wrong: int) -> dict[str, np.ndarray]:
    store: dict[str, list] = {}
    with hooked(handle, [_embed_leaf_hook(handle)] + _capture_hooks(handle, store)), torch.enable_grad():
        final = handle.adapter.base(corrupt_ids, use_cache=False).last_hidden_state
        metric = _logit_difference(handle, final, answer, wrong)[0]
        grads = _gradients(store, metric)
    return _first_order(handle, store, grads, cache)


def relp_grids(
    handle: ModelHandle, corrupt_ids, cache: dict, answer: int, wrong: int, freeze_attention: bool = False
) -> dict[str, np.ndarray]:
    store: dict[str, list] = {}
    with handle.lock:
        frozen = record_frozen(handle, corrupt_ids)
        run = linear_forward(handle, frozen, direct=False, freeze_attention=freeze_attention,
                             extra_hooks=_capture_hooks(handle, store))
        metric = _logit_difference(handle, run.final, answer, wrong)[0]
        grads = _gradients(store, metric)
    return _first_order(handle, store, grads, cache)


# ---------------------------------------------------------------- everything


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def patching(
    handle: ModelHandle,
    clean: str,
    corrupt: str,
    answer: str,
    wrong: str,
    *,
    methods: tuple[str, ...] = METHODS,
    sites: tuple[str, ...] = SITES,
    freeze_attention: bool = False,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> PatchResult:
    """All requested methods on all sites, normalized (0 = corrupted, 1 = clean)."""
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise UserInputError(f"Unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}.")
    if set(sites) - set(SITES) or not sites:
        raise UserInputError(f"Unknown site(s) {sorted(set(sites) - set(SITES))}; choose from {', '.join(SITES)}.")
    clean_ids, corrupt_ids = check_pair(handle, clean, corrupt)
    answer_id, wrong_id = resolve_token(handle, answer), resolve_token(handle, wrong)
    if answer_id == wrong_id:
        raise UserInputError("The answer and wrong tokens are the same token.")
    report = progress or (lambda fraction, message: None)
    clean_t = torch.tensor([clean_ids], device=handle.device)
    corrupt_t = torch.tensor([corrupt_ids], device=handle.device)
    # every pass takes the model's lock itself (hooked), so other requests interleave between batches
    cache, ld_clean = _run_clean(handle, clean_t, answer_id, wrong_id)
    _, ld_corrupt = _run_clean(handle, corrupt_t, answer_id, wrong_id)
    span = ld_clean - ld_corrupt
    if abs(span) < 1e-6:
        raise UserInputError("The clean and corrupted runs give the same logit difference: nothing to localize.")
    grids: dict[str, dict] = {site: {} for site in sites}
    seconds: dict[str, float] = {}
    if "exact" in methods:
        start = time.perf_counter()
        for k, site in enumerate(sites):
            raw = exact_grid(handle, corrupt_t, site, cache, answer_id, wrong_id, batch_size,
                             lambda f, m, k=k: report((k + f) / len(sites) * 0.9, m))
            grids[site]["exact"] = (raw - ld_corrupt) / span
        seconds["exact"] = time.perf_counter() - start
    for method, compute in (("atp", lambda: atp_grids(handle, corrupt_t, cache, answer_id, wrong_id)),
                            ("relp", lambda: relp_grids(handle, corrupt_t, cache, answer_id, wrong_id,
                                                        freeze_attention))):
        if method in methods:
            report(0.92 if method == "atp" else 0.96, f"{method}: one forward and one backward")
            start = time.perf_counter()
            raw = compute()
            seconds[method] = time.perf_counter() - start
            for site in sites:
                grids[site][method] = raw[site] / span
    report(1.0, "done")
    correlation = {
        site: {m: pearson(grids[site][m], grids[site]["exact"]) for m in ("atp", "relp") if m in grids[site]}
        for site in sites if "exact" in grids[site]
    }
    return PatchResult(
        model=handle.name, clean=clean, corrupt=corrupt, answer=answer, wrong=wrong,
        tokens=token_texts(handle, clean_ids), corrupt_tokens=token_texts(handle, corrupt_ids),
        metric={"clean": ld_clean, "corrupt": ld_corrupt},
        grids={site: {m: np.asarray(g, dtype=np.float32) for m, g in by_method.items()} for site, by_method in grids.items()},
        pearson=correlation, seconds=seconds,
        settings={"methods": list(methods), "sites": list(sites), "freeze_attention": freeze_attention, "batch_size": batch_size},
    )


@torch.no_grad()
def patch_one(handle: ModelHandle, clean: str, corrupt: str, answer: str, wrong: str, site: str, layer: int,
              index: int) -> dict:
    """Patch a single site; returns raw and normalized LD (for a clicked cell)."""
    if site not in SITES:
        raise UserInputError(f"Unknown site '{site}'; choose from {', '.join(SITES)}.")
    clean_ids, corrupt_ids = check_pair(handle, clean, corrupt)
    answer_id, wrong_id = resolve_token(handle, answer), resolve_token(handle, wrong)
    n_layers, n_cols = _grid_shape(handle, site, len(corrupt_ids))
    if not (0 <= layer < n_layers and 0 <= index < n_cols):
        raise UserInputError(f"No {site} site at layer {layer}, index {index}.")
    corrupt_t = torch.tensor([corrupt_ids], device=handle.device)
    with handle.lock:
        cache, ld_clean = _run_clean(handle, torch.tensor([clean_ids], device=handle.device), answer_id, wrong_id)
        _, ld_corrupt = _run_clean(handle, corrupt_t, answer_id, wrong_id)
        with hooked(handle, _patch_hooks(handle, site, [(layer, index)], cache)):
            final = handle.adapter.base(corrupt_t, use_cache=False).last_hidden_state
    ld = float(_logit_difference(handle, final, answer_id, wrong_id)[0])
    return {"ld": ld, "normalized": (ld - ld_corrupt) / (ld_clean - ld_corrupt), "clean": ld_clean, "corrupt": ld_corrupt}
