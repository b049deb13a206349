"""Fitting per-layer transcoders for any supported model, written in circuit-tracer's format.

1. **Collect** (one pass over the corpus, under the model's lock per batch): for every
   layer, the MLP's input after its norm (x) and its output (y) at every token but padding
   and the document-start token, stored as float16 memory maps in ``<out>/work/``. The last
   ``HELD_OUT`` share of the tokens (whole documents) is held out.
2. **Train** each layer in turn with EleutherAI's ``sparsify.SparseCoder`` (``transcode=True``:
   TopK of the ReLU'd pre-activations, saved as ``activation: relu_topk``; its FVU loss;
   optional skip connection), by Adam at sparsify's default rate 2e-4 / sqrt(F / 2^14), over
   ``epochs`` shuffled passes, b_dec starting at the mean output (sparsify starts at 0; with
   few steps the mean matters). We run the loop here rather than sparsify's Trainer: the
   Trainer drives the model itself through its own hooks and a Hugging Face dataset, while
   this reads the shared model through ours; the model, its initialization and loss are
   sparsify's.
3. **Write** ``layer_{i}.safetensors`` after each layer (atomically; a rerun skips finished
   layers: resumable per layer) with its report in ``work/report.json``: held-out FVU
   (Σ‖y − ŷ‖² / Σ‖y − ȳ‖² on the held-out tokens), the fraction of dead features (never
   active on the held-out tokens) and seconds. ``config.yaml`` is written last: a folder
   without it is not a set and never loads.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from backend.errors import UserInputError
from backend.replacement.transcoders import LayerTranscoder, save_layer, write_config
from backend.runtime.hooks import hooked, read_site
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import document_start, starts_with_special
from backend.units.build import Cancelled, exclusive
from backend.units.corpus import Corpus

HELD_OUT = 0.1
BATCH_TOKENS = 1024  # tokens per forward pass while collecting, and per training step
MIN_TOKENS = 2048


@dataclass(frozen=True)
class FitSettings:
    features: int = 4096
    k: int = 32
    tokens: int = 60_000
    context: int = 128
    epochs: int = 6
    skip: bool = False
    seed: int = 0

    def check(self, handle: ModelHandle) -> None:
        if self.tokens < MIN_TOKENS:
            raise UserInputError(f"--tokens must be at least {MIN_TOKENS} (got {self.tokens}).")
        if not 1 <= self.k <= self.features:
            raise UserInputError(f"--k must be between 1 and --features ({self.features}); got {self.k}.")
        if not 1 <= self.features <= 1 << 20:
            raise UserInputError(f"--features must be between 1 and {1 << 20} (got {self.features}).")
        if not 1 <= self.epochs <= 1000:
            raise UserInputError(f"--epochs must be between 1 and 1000 (got {self.epochs}).")
        if not 2 <= self.context <= 4096:
            raise UserInputError(f"--context must be between 2 and 4096 (got {self.context}).")


@dataclass
class LayerReport:
    layer: int
    fvu: float  # held-out fraction of variance unexplained
    dead_fraction: float  # features never active on the held-out tokens
    train_tokens: int
    held_out_tokens: int
    seconds: float


# ---------------------------------------------------------------- collect


def _documents(handle: ModelHandle, corpus: Corpus, settings: FitSettings) -> list[list[int]]:
    start = document_start(handle) or ""
    docs, total = [], 0
    for text in corpus.documents():
        ids = handle.tokenizer(start + text if start and not text.startswith(start) else text, truncation=True,
                               max_length=settings.context)["input_ids"]
        valid = len(ids) - int(starts_with_special(handle, list(ids)))
        if valid <= 0:
            continue
        docs.append(list(ids))
        total += valid
        if total >= settings.tokens:
            break
    if total < MIN_TOKENS or total < settings.tokens * 0.5:
        raise UserInputError(f"The corpus has {total:,} usable tokens; fitting {settings.tokens:,} needs at least "
                             "half that (and at least 2,048). Use a larger corpus or fewer --tokens.")
    return docs


def collect(handle: ModelHandle, corpus: Corpus, settings: FitSettings, work: Path,
            progress: Progress) -> tuple[np.memmap, np.memmap, int]:
    """x and y [L, N, d] (float16 memory maps) and the index where held-out tokens start."""
    done = work / "collected.json"
    adapter = handle.adapter
    L, d = adapter.n_layers, adapter.d_model
    if done.exists():
        meta = json.loads(done.read_text())
        return (np.lib.format.open_memmap(work / "x.npy", mode="r"),
                np.lib.format.open_memmap(work / "y.npy", mode="r"), meta["held_out_start"])
    docs = _documents(handle, corpus, settings)
    lengths = [len(ids) - int(starts_with_special(handle, ids)) for ids in docs]
    n = sum(lengths)
    cut = len(docs) - max(1, round(HELD_OUT * len(docs)))
    held_out_start = sum(lengths[:cut])
    work.mkdir(parents=True, exist_ok=True)
    xs = np.lib.format.open_memmap(work / "x.npy", mode="w+", dtype=np.float16, shape=(L, n, d))
    ys = np.lib.format.open_memmap(work / "y.npy", mode="w+", dtype=np.float16, shape=(L, n, d))
    cursor = 0
    order = iter(docs)
    started = time.perf_counter()
    while True:
        batch = list(itertools.islice(order, max(1, BATCH_TOKENS // settings.context)))
        if not batch:
            break
        cursor = _collect_batch(handle, batch, xs, ys, cursor)
        progress(0.3 * cursor / n, f"Collecting MLP inputs and outputs: {cursor:,}/{n:,} tokens "
                                   f"({cursor / max(time.perf_counter() - started, 1e-9):.0f} tokens/s)")
    xs.flush()
    ys.flush()
    done.write_text(json.dumps({"tokens": n, "held_out_start": held_out_start}))
    return xs, ys, held_out_start


@torch.no_grad()
def _collect_batch(handle: ModelHandle, batch: list[list[int]], xs: np.memmap, ys: np.memmap, cursor: int) -> int:
    adapter = handle.adapter
    longest = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), longest, dtype=torch.long)
    attention = torch.zeros(len(batch), longest, dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
    valid = attention.bool()
    valid[:, 0] &= torch.tensor([not starts_with_special(handle, ids) for ids in batch])
    seen: dict[tuple[str, int], torch.Tensor] = {}
    hooks = [read_site(adapter.site(site, layer), lambda t, key=(site, layer): seen.__setitem__(key, t))
             for layer in range(adapter.n_layers) for site in ("mlp_normed", "mlp_out")]
    with hooked(handle, hooks):
        adapter.base(input_ids.to(handle.device), attention_mask=attention.to(handle.device), use_cache=False)
    count = int(valid.sum())
    mask = valid.to(handle.device)
    for layer in range(adapter.n_layers):
        xs[layer, cursor:cursor + count] = seen["mlp_normed", layer][mask].float().cpu().numpy()
        ys[layer, cursor:cursor + count] = seen["mlp_out", layer][mask].float().cpu().numpy()
    return cursor + count


# ---------------------------------------------------------------- train


def train_layer(x: np.ndarray, y: np.ndarray, held_out_start: int, settings: FitSettings,
                device: torch.device, report) -> tuple[LayerTranscoder, float, float]:
    """One TopK transcoder fitted on x[:held_out_start] -> y[:held_out_start]; its held-out
    FVU and dead fraction."""
    from sparsify import SparseCoder, TranscoderConfig  # imported here: only fitting needs it

    torch.manual_seed(settings.seed)
    d = x.shape[-1]
    coder = SparseCoder(d, TranscoderConfig(num_latents=settings.features, k=settings.k,
                                            skip_connection=settings.skip), device=device, dtype=torch.float32)
    optimizer = torch.optim.Adam(coder.parameters(), lr=2e-4 / math.sqrt(settings.features / 2 ** 14))
    train_x = torch.from_numpy(np.asarray(x[:held_out_start], dtype=np.float32))
    train_y = torch.from_numpy(np.asarray(y[:held_out_start], dtype=np.float32))
    with torch.no_grad():  # start from the mean output (see the module doc)
        coder.b_dec.copy_(train_y.mean(0).to(device))
    generator = torch.Generator().manual_seed(settings.seed)
    steps = settings.epochs * math.ceil(len(train_x) / BATCH_TOKENS)
    step = 0
    with torch.enable_grad():
        for _ in range(settings.epochs):
            order = torch.randperm(len(train_x), generator=generator)
            for start in range(0, len(order), BATCH_TOKENS):
                rows = order[start:start + BATCH_TOKENS]
                out = coder(train_x[rows].to(device), train_y[rows].to(device))
                out.fvu.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % 20 == 0 or step == steps:
                    report(step / steps, f"step {step}/{steps}, training FVU {float(out.fvu.detach()):.3f}")
    layer = LayerTranscoder(W_enc=coder.encoder.weight.detach().cpu().clone(),
                            b_enc=coder.encoder.bias.detach().cpu().clone(),
                            W_dec=coder.W_dec.detach().cpu().clone(), b_dec=coder.b_dec.detach().cpu().clone(),
                            W_skip=None if coder.W_skip is None else coder.W_skip.detach().cpu().clone())
    fvu, dead = held_out_quality(layer, settings.k, x[held_out_start:], y[held_out_start:])
    return layer, fvu, dead


@torch.no_grad()
def held_out_quality(layer: LayerTranscoder, k: int, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Held-out FVU and the fraction of features never active there (our TopK encoder, the
    one the set is read with: the same numbers a user of the saved set gets)."""
    from backend.replacement.transcoders import TranscoderSet

    single = TranscoderSet([layer], "relu_topk", k, "mlp.hook_in", "mlp.hook_out", "")
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.float32))
    error, active = 0.0, torch.zeros(layer.width, dtype=torch.bool)
    for start in range(0, len(xt), 4096):
        part = xt[start:start + 4096]
        features = single.encode(0, part)
        active |= (features != 0).any(0)
        error += float((yt[start:start + 4096] - single.decode(0, features, part)).pow(2).sum())
    variance = float((yt - yt.mean(0)).pow(2).sum())
    return error / max(variance, 1e-30), 1.0 - float(active.float().mean())


# ---------------------------------------------------------------- the whole fit


def fit_transcoders(handle: ModelHandle, corpus: Corpus, out: str | Path, settings: FitSettings,
                    progress: Progress | None = None, cancel: threading.Event | None = None) -> list[LayerReport]:
    """Fit every layer (resuming finished ones), then write config.yaml. Returns the reports.
    One fit per folder per machine (a lock file); ``cancel`` stops at the next progress report
    (raising Cancelled; a rerun resumes)."""
    settings.check(handle)
    out = Path(out)
    if (out / "config.yaml").exists():
        raise UserInputError(f"{out} already holds a transcoder set; choose another --out or delete it.")
    with exclusive(out) as free:
        if not free:
            raise UserInputError(f"Another process is fitting transcoders into {out}.")
        return _fit(handle, corpus, out, settings, _cancellable(progress, cancel))


def _cancellable(progress: Progress | None, cancel: threading.Event | None) -> Progress:
    def report(fraction: float, message: str) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("fitting cancelled; fitting again resumes at the first unfinished layer")
        if progress is not None:
            progress(fraction, message)
    return report


def _fit(handle: ModelHandle, corpus: Corpus, out: Path, settings: FitSettings,
         report: Progress) -> list[LayerReport]:
    work = out / "work"
    _check_settings_file(work, settings, handle)
    xs, ys, held_out_start = collect(handle, corpus, settings, work, report)
    reports_path = work / "report.json"
    reports = {r["layer"]: LayerReport(**r) for r in json.loads(reports_path.read_text())} \
        if reports_path.exists() else {}
    n_layers = handle.adapter.n_layers
    for layer in range(n_layers):
        if layer in reports and (out / f"layer_{layer}.safetensors").exists():
            continue
        started = time.perf_counter()

        def layer_progress(fraction: float, message: str, layer: int = layer) -> None:
            report(0.3 + 0.7 * (layer + fraction) / n_layers, f"Layer {layer + 1}/{n_layers}: {message}")

        fitted, fvu, dead = train_layer(xs[layer], ys[layer], held_out_start, settings, handle.device, layer_progress)
        save_layer(fitted, out / f"layer_{layer}.safetensors")
        reports[layer] = LayerReport(layer, fvu, dead, held_out_start, xs.shape[1] - held_out_start,
                                     time.perf_counter() - started)
        _write_json(reports_path, [asdict(reports[i]) for i in sorted(reports)])
    write_config(out, n_layers, "relu_topk", settings.k, scan=f"circuitscope/{handle.name}")
    (out / "report.json").write_text(json.dumps([asdict(reports[i]) for i in range(n_layers)], indent=1))
    shutil.rmtree(work)  # the collected activations (GBs for a real model) are no longer needed
    report(1.0, "Transcoders written")
    return [reports[i] for i in range(n_layers)]


def _check_settings_file(work: Path, settings: FitSettings, handle: ModelHandle) -> None:
    """A resumed fit must use the same settings and model as the interrupted one."""
    wanted = {"model": handle.name, **asdict(settings)}
    path = work / "settings.json"
    if path.exists():
        found = json.loads(path.read_text())
        if found != wanted:
            raise UserInputError(f"{work.parent} holds an unfinished fit with other settings ({found}); "
                                 "rerun with those, or choose another --out.")
        return
    work.mkdir(parents=True, exist_ok=True)
    _write_json(path, wanted)


def _write_json(path: Path, value) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=1))
    os.replace(partial, path)
