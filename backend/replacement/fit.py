"""Fitting transcoders for any supported model, written in circuit-tracer's format.

1. **Collect** (one pass over the corpus, under the model's lock per batch): for every
   layer, the MLP's input after its norm (x) and its output (y) at every token but padding
   and the document-start token, stored as float16 memory maps in ``<out>/work/``. The last
   ``HELD_OUT`` share of the tokens (whole documents) is held out.
2. **Train** TopK sets layer by layer with EleutherAI's ``sparsify.SparseCoder`` (``transcode=True``:
   TopK of the ReLU'd pre-activations, saved as ``activation: relu_topk``; its FVU loss;
   optional skip connection), by Adam at ten times sparsify's default rate (``learning_rate``:
   at sparsify's own 2e-4 / sqrt(F / 2^14), the few hundred steps that fit on 2 CPU cores left
   layer 6 of SmolLM2 at held-out FVU 0.83; at ten times, 0.59), over ``epochs`` shuffled
   passes, b_dec starting at the mean output (sparsify starts at 0; with few steps the mean
   matters). We run the loop here rather than sparsify's Trainer: the
   Trainer drives the model itself through its own hooks and a Hugging Face dataset, while
   this reads the shared model through ours; the model, its initialization and loss are
   sparsify's. ReLU and JumpReLU sets, per-layer or cross-layer (``--kind clt``: every layer's
   features write to every later MLP output, all layers fitted jointly), which sparsify does
   not train, use our loop in ``sparse_training`` (its docstring states the method).
3. **Write** ``layer_{i}.safetensors`` after each layer (atomically; a rerun skips finished
   layers: resumable per layer; a cross-layer fit resumes from its checkpoint after the last
   finished epoch) with its report in ``work/report.json``: held-out FVU
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from backend.errors import UserInputError
from backend.replacement.sparse_training import SparseSpec, learning_rate, train_sparse
from backend.replacement.transcoders import LayerTranscoder, save_cross_layer, save_layer, write_config
from backend.runtime.hooks import hooked, read_site
from backend.runtime.models import ModelHandle, Progress
from backend.runtime.prompts import document_start, starts_with_special
from backend.units.build import Cancelled, exclusive
from backend.units.corpus import Corpus

HELD_OUT = 0.1
BATCH_TOKENS = 1024  # tokens per forward pass while collecting, and per training step
MIN_TOKENS = 2048
KINDS = ("plt", "clt")
ACTIVATIONS = ("topk", "relu", "jumprelu")
SAVED_ACTIVATION = {"topk": "relu_topk", "relu": "relu", "jumprelu": "jumprelu"}  # as written in config.yaml


@dataclass(frozen=True)
class FitSettings:
    features: int = 4096
    k: int = 32
    tokens: int = 60_000
    context: int = 128
    epochs: int = 6
    skip: bool = False
    seed: int = 0
    kind: str = "plt"  # plt (per-layer) | clt (cross-layer)
    activation: str = "topk"  # topk | relu | jumprelu; for relu and jumprelu k is the target L0

    def check(self, handle: ModelHandle) -> None:
        if self.kind not in KINDS:
            raise UserInputError(f"--kind {self.kind!r}: choose plt (per-layer) or clt (cross-layer).")
        if self.activation not in ACTIVATIONS:
            raise UserInputError(f"--activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}.")
        if self.kind == "clt" and self.activation == "topk":
            raise UserInputError("--kind clt fits relu or jumprelu features (--activation); TopK is per-layer only.")
        if self.kind == "clt" and self.skip:
            raise UserInputError("--skip: cross-layer sets have no skip connection in circuit-tracer's format.")
        self._check_memory(handle)

    def training_bytes(self, n_layers: int, d_model: int) -> int:
        """Weights, gradients and Adam's two moments (4 × float32) of what is trained at once:
        one layer (per-layer) or every layer with decoders to every later one (cross-layer)."""
        if self.kind == "clt":
            params = self.features * d_model * (n_layers + n_layers * (n_layers + 1) // 2)
        else:
            params = 2 * self.features * d_model + (d_model * d_model if self.skip else 0)
        return 16 * params

    def _check_memory(self, handle: ModelHandle) -> None:
        needed = self.training_bytes(handle.adapter.n_layers, handle.adapter.d_model)
        available = _memory_bytes(handle.device)
        if needed > 0.6 * available:
            fitting = max(1, int(self.features * 0.6 * available / needed))
            raise UserInputError(f"Training {self.features} features per layer ({self.kind}) needs about "
                                 f"{needed / 2 ** 30:.1f} GB for weights and optimizer state; this "
                                 f"{'GPU' if handle.device.type == 'cuda' else 'machine'} has "
                                 f"{available / 2 ** 30:.1f} GB. Use --features {fitting} or fewer.")
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


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


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
    """One layer's transcoder fitted on x[:held_out_start] -> y[:held_out_start]; its held-out
    FVU and dead fraction."""
    if settings.activation == "topk":
        layer = _train_topk(x[:held_out_start], y[:held_out_start], settings, device, report)
    else:
        layers, decoders = train_sparse(x[None, :held_out_start], y[None, :held_out_start], sparse_spec(settings),
                                        cross_layer=False, skip=settings.skip, device=device, report=report)
        layer = replace(layers[0], W_dec=decoders[0][:, 0])
    assert layer.W_dec is not None
    fvus, dead = held_out_quality([layer], [layer.W_dec[:, None]], settings,
                                  x[None, held_out_start:], y[None, held_out_start:])
    return layer, fvus[0], dead[0]


def sparse_spec(settings: FitSettings) -> SparseSpec:
    return SparseSpec(settings.activation, settings.features, settings.k, settings.epochs, BATCH_TOKENS, settings.seed)


def _train_topk(x: np.ndarray, y: np.ndarray, settings: FitSettings, device: torch.device, report) -> LayerTranscoder:
    from sparsify import SparseCoder, TranscoderConfig  # imported here: only fitting needs it

    torch.manual_seed(settings.seed)
    d = x.shape[-1]
    coder = SparseCoder(d, TranscoderConfig(num_latents=settings.features, k=settings.k,
                                            skip_connection=settings.skip), device=device, dtype=torch.float32)
    optimizer = torch.optim.Adam(coder.parameters(), lr=learning_rate(settings.features))
    train_x = torch.from_numpy(np.asarray(x, dtype=np.float32))
    train_y = torch.from_numpy(np.asarray(y, dtype=np.float32))
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
    return LayerTranscoder(W_enc=coder.encoder.weight.detach().cpu().clone(),
                           b_enc=coder.encoder.bias.detach().cpu().clone(),
                           W_dec=coder.W_dec.detach().cpu().clone(), b_dec=coder.b_dec.detach().cpu().clone(),
                           W_skip=None if coder.W_skip is None else coder.W_skip.detach().cpu().clone())


@torch.no_grad()
def held_out_quality(layers: list[LayerTranscoder], decoders: list[torch.Tensor], settings: FitSettings,
                     x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Per layer the held-out FVU of its MLP output (Σ‖y − ŷ‖² / Σ‖y − ȳ‖², ŷ summing every
    feature that writes there) and the fraction of its features never active. Encoded by our
    reader (``TranscoderSet.encode``): the numbers a user of the saved set gets. x, y [L, N, d];
    decoders[i] [F, span, d]."""
    from backend.replacement.transcoders import TranscoderSet

    reader = TranscoderSet(layers, SAVED_ACTIVATION[settings.activation],
                           settings.k if settings.activation == "topk" else None, "mlp.hook_in", "mlp.hook_out", "")
    n_layers, n, _ = x.shape
    errors = torch.zeros(n_layers, dtype=torch.float64)
    active = torch.zeros(n_layers, reader.width, dtype=torch.bool)
    for start in range(0, n, 4096):
        xt = torch.from_numpy(np.asarray(x[:, start:start + 4096], dtype=np.float32))
        yt = torch.from_numpy(np.asarray(y[:, start:start + 4096], dtype=np.float32))
        predicted = torch.stack([t.b_dec for t in layers])[:, None].expand_as(yt).clone()
        for i, decoder in enumerate(decoders):
            features = reader.encode(i, xt[i])
            active[i] |= (features != 0).any(0)
            predicted[i:i + decoder.shape[1]] += torch.einsum("bf,fsd->sbd", features, decoder)
            skip = reader.skip(i, xt[i])
            if skip is not None:
                predicted[i] += skip
        errors += (yt - predicted).pow(2).sum((1, 2)).double()
    variance = [float(np.asarray(y[i], dtype=np.float64).var(0).sum()) * n for i in range(n_layers)]
    return ([float(errors[i]) / max(variance[i], 1e-30) for i in range(n_layers)],
            [1.0 - float(active[i].float().mean()) for i in range(n_layers)])


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
    n_layers = handle.adapter.n_layers
    if settings.kind == "clt":
        reports = _fit_cross_layer(handle, out, settings, xs, ys, held_out_start, report)
    else:
        reports = _fit_per_layer(handle, out, settings, xs, ys, held_out_start, report)
    write_config(out, n_layers, SAVED_ACTIVATION[settings.activation],
                 settings.k if settings.activation == "topk" else None, scan=f"circuitscope/{handle.name}",
                 cross_layer=settings.kind == "clt")
    (out / "report.json").write_text(json.dumps([asdict(r) for r in reports], indent=1))
    shutil.rmtree(work)  # the collected activations (GBs for a real model) are no longer needed
    report(1.0, "Transcoders written")
    return reports


def _fit_per_layer(handle: ModelHandle, out: Path, settings: FitSettings, xs: np.ndarray, ys: np.ndarray,
                   held_out_start: int, report: Progress) -> list[LayerReport]:
    reports_path = out / "work" / "report.json"
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
    return [reports[i] for i in range(n_layers)]


def _fit_cross_layer(handle: ModelHandle, out: Path, settings: FitSettings, xs: np.ndarray, ys: np.ndarray,
                     held_out_start: int, report: Progress) -> list[LayerReport]:
    """Every layer jointly; resumable at the last finished epoch. Each layer's report carries
    an equal share of the joint fit's time."""
    n_layers = handle.adapter.n_layers
    started = time.perf_counter()

    def progress(fraction: float, message: str) -> None:
        report(0.3 + 0.7 * fraction, f"All {n_layers} layers (cross-layer): {message}")

    layers, decoders = train_sparse(xs[:, :held_out_start], ys[:, :held_out_start], sparse_spec(settings),
                                    cross_layer=True, skip=False, device=handle.device, report=progress,
                                    checkpoint=out / "work" / "clt_checkpoint.safetensors")
    save_cross_layer(out, layers, decoders)
    fvus, dead = held_out_quality(layers, decoders, settings, xs[:, held_out_start:], ys[:, held_out_start:])
    seconds = (time.perf_counter() - started) / n_layers
    return [LayerReport(i, fvus[i], dead[i], held_out_start, xs.shape[1] - held_out_start, seconds)
            for i in range(n_layers)]


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
