"""Building the corpus index: one resumable pass over the corpus per model and corpus.

Documents are read in chunks of CHUNK, tokenized as prompts are, truncated to the context
length, sorted by length inside the chunk (less padding) and run in batches of at most
``batch_tokens`` padded tokens through the decoder stack (no unembedding), under the model's
lock, with the units' hooks folding each layer's activations into ``stats.LayerStats``.

Resumable: every ``checkpoint_seconds`` (and on Cancel) the statistics, the indexed
documents' tokens, the corpus cursor and the not yet processed rest of the current chunk
are saved atomically in ``build/``; a later build resumes there and ends with the same
index as an uninterrupted one (same batches, same order). One builder per index directory:
an exclusive ``flock``; a second builder (another session or process) waits for the first
and reports its progress from ``build/progress.json``, or takes over if it died.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from backend.errors import UserInputError
from backend.runtime.hooks import hooked
from backend.runtime.jobs import Cancelled
from backend.runtime.models import ModelHandle
from backend.runtime.prompts import BOS_MODES, document_start, starts_with_special
from backend.units import index as store
from backend.units import stats
from backend.units.corpus import Corpus
from backend.units.unitset import Neurons, UnitSet, model_fingerprint

CHUNK = 64
EXAMPLE_FIELDS = [f.name for f in fields(stats.Examples)]
Progress = Callable[[float, str], None]




def checkpoint_seconds() -> float:
    """How often a build saves its checkpoint (CIRCUITSCOPE_INDEX_CHECKPOINT_S, default 60)."""
    try:
        return float(os.environ.get("CIRCUITSCOPE_INDEX_CHECKPOINT_S", "60"))
    except ValueError:
        return 60.0


def make_spec(handle: ModelHandle, units: UnitSet, corpus: Corpus, context: int = store.DEFAULT_CONTEXT,
              tokens: int = store.DEFAULT_TOKENS, bos: str = "on") -> store.IndexSpec:
    if not 2 <= context <= 4096:
        raise UserInputError(f"--context must be between 2 and 4096 tokens (got {context}).")
    if tokens < 1:
        raise UserInputError(f"--tokens must be positive (got {tokens}).")
    if bos not in BOS_MODES:
        raise UserInputError(f"Unknown document-start mode '{bos}'; choose on or off.")
    return store.IndexSpec(model=handle.name, model_fingerprint=model_fingerprint(handle), units=units.key(),
                           corpus=corpus.name, corpus_fingerprint=corpus.fingerprint(), context=context,
                           tokens=tokens, bos=bos)


@dataclass
class BuildState:
    """Everything a checkpoint holds."""

    layers: list[stats.LayerStats]
    doc_tokens: list[np.ndarray] = field(default_factory=list)  # indexed documents, in index order
    cursor: int = 0  # corpus documents read so far (into chunks)
    pending: list[list[int]] = field(default_factory=list)  # the current chunk's documents not yet run
    tokens_done: int = 0
    batches: int = 0
    batch_tokens: int = 1024
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        payload = {
            "layers": [{"layer": s.layer, "tokens": s.tokens, "hist": s.hist, "active": s.active,
                        **{f"{group}_{name}": getattr(getattr(s, group), name)
                           for group in ("top", "bins") for name in EXAMPLE_FIELDS}} for s in self.layers],
            "doc_tokens": torch.from_numpy(np.concatenate(self.doc_tokens or [np.zeros(0, np.int32)])),
            "doc_lengths": torch.tensor([len(d) for d in self.doc_tokens], dtype=torch.int64),
            "pending": [torch.tensor(ids, dtype=torch.int64) for ids in self.pending],
            "counters": [self.cursor, self.tokens_done, self.batches, self.batch_tokens],
            "seconds": self.seconds,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> BuildState:
        payload = torch.load(path, weights_only=True)
        layers = []
        for saved in payload["layers"]:
            groups = {group: stats.Examples(**{name: saved[f"{group}_{name}"] for name in EXAMPLE_FIELDS})
                      for group in ("top", "bins")}
            layers.append(stats.LayerStats(layer=saved["layer"], top=groups["top"], bins=groups["bins"],
                                           hist=saved["hist"], active=saved["active"], tokens=saved["tokens"]))
        flat = payload["doc_tokens"].numpy()
        bounds = np.concatenate([[0], np.cumsum(payload["doc_lengths"].numpy())])
        cursor, tokens_done, batches, batch_tokens = payload["counters"]
        return cls(layers=layers, doc_tokens=[flat[a:b] for a, b in itertools.pairwise(bounds)],
                   cursor=cursor, pending=[p.tolist() for p in payload["pending"]], tokens_done=tokens_done,
                   batches=batches, batch_tokens=batch_tokens, seconds=payload["seconds"])


def build_index(handle: ModelHandle, corpus: Corpus, *, context: int = store.DEFAULT_CONTEXT,
                tokens: int = store.DEFAULT_TOKENS, bos: str = "on", units: UnitSet | None = None,
                directory: Path | None = None, batch_tokens: int = 1024, progress: Progress | None = None,
                cancel: threading.Event | None = None) -> Path:
    """Build (or resume, or wait for another builder of) the index; returns its directory."""
    units = units or Neurons.of(handle)
    spec = make_spec(handle, units, corpus, context, tokens, bos)
    directory = Path(directory) if directory else spec.default_dir()
    store.check_directory(directory, spec)
    report = progress or (lambda fraction, message: None)
    while store.read_meta(directory) is None:
        with exclusive(directory) as owner:
            if owner:
                _Builder(handle, units, corpus, spec, directory, batch_tokens, report, cancel).run()
                break
        _wait_for_other_builder(directory, report, cancel)
    report(1.0, "index complete")
    return directory


@contextmanager
def exclusive(directory: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on ``directory``: yields whether this process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _wait_for_other_builder(directory: Path, report: Progress, cancel: threading.Event | None) -> None:
    """Poll until the index is complete or its builder is gone (then the caller takes over)."""
    while store.read_meta(directory) is None:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        info = read_progress(directory)
        report(info.get("fraction", 0.0), f"another builder (pid {info.get('pid', '?')}) is building this index: "
                                          f"{info.get('message', 'starting')}")
        with exclusive(directory) as free:
            if free:
                return
        time.sleep(1.0)


def read_progress(directory: Path) -> dict:
    try:
        return json.loads((directory / "build" / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


class StatsWorker:
    """Folds activations into the statistics on a second thread while the model computes the
    next layers (on 2 cores: about twice the throughput). ``wait`` returns when all is folded
    and re-raises a failure of the worker."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="circuitscope-index-stats", daemon=True)
        self.thread.start()

    def put(self, layer_stats: stats.LayerStats, acts: torch.Tensor, valid: torch.Tensor, docs: torch.Tensor) -> None:
        self._raise()
        self.queue.put((layer_stats, acts, valid, docs))

    def wait(self) -> None:
        self.queue.join()
        self._raise()

    def close(self) -> None:
        """Stop the thread and wait for it (a thread still inside torch at exit aborts the process)."""
        self.queue.put(None)
        self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            layer_stats, acts, valid, docs = item
            try:
                if self.error is None:
                    layer_stats.update(acts, valid, docs)
            except BaseException as exc:  # handed to the builder's thread by wait()/put()
                self.error = exc
            finally:
                self.queue.task_done()


class _Builder:
    def __init__(self, handle: ModelHandle, units: UnitSet, corpus: Corpus, spec: store.IndexSpec,
                 directory: Path, batch_tokens: int, report: Progress, cancel: threading.Event | None) -> None:
        self.handle, self.units, self.corpus, self.spec = handle, units, corpus, spec
        self.directory, self.report, self.cancel = directory, report, cancel
        self.build_dir = directory / "build"
        self.checkpoint = self.build_dir / "state.pt"
        self.start_text = document_start(handle) if spec.bos == "on" else None
        self.folder = StatsWorker()
        self.state = self._resume() or BuildState(
            layers=[stats.LayerStats.empty(layer, units.width) for layer in range(units.n_layers)],
            batch_tokens=max(batch_tokens, spec.context))

    def _resume(self) -> BuildState | None:
        if not self.checkpoint.exists():
            return None
        try:
            state = BuildState.load(self.checkpoint)
        except Exception as exc:  # a checkpoint from a crashed write or another version: start over
            self.report(0.0, f"checkpoint unreadable ({type(exc).__name__}); starting over")
            return None
        self.report(state.tokens_done / self.spec.tokens, f"resuming at {state.tokens_done:,} tokens")
        return state

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.folder.close()

    def _run(self) -> None:
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self._write(lambda: store.write_json_atomic(self.build_dir / "spec.json", {"spec": asdict(self.spec)}))
        documents = itertools.islice(self.corpus.documents(), self.state.cursor, None)
        last_save, started = time.monotonic(), time.monotonic() - self.state.seconds
        while self.state.tokens_done < self.spec.tokens:
            if not self.state.pending and not self._read_chunk(documents):
                break
            self._run_batch(self._next_batch())
            self.state.seconds = time.monotonic() - started
            cancelled = self.cancel is not None and self.cancel.is_set()
            if cancelled or time.monotonic() - last_save >= checkpoint_seconds():
                self._write(lambda: self.state.save(self.checkpoint))
                last_save = time.monotonic()
            self._progress(started)
            if cancelled:
                raise Cancelled()
        if not self.state.doc_tokens:
            raise UserInputError(f"The corpus {self.corpus.name} gave no document to index.")
        self._finish()

    def _read_chunk(self, documents: Iterator[str]) -> bool:
        texts = list(itertools.islice(documents, CHUNK))
        self.state.cursor += len(texts)
        if not texts:
            return False
        if self.start_text:
            texts = [text if text.startswith(self.start_text) else self.start_text + text for text in texts]
        encoded = self.handle.tokenizer(texts, truncation=True, max_length=self.spec.context)["input_ids"]
        chunk = [list(ids) for ids in encoded if len(ids) > int(starts_with_special(self.handle, list(ids)))]
        self.state.pending = sorted(chunk, key=len)
        return True

    def _next_batch(self) -> list[list[int]]:
        batch = [self.state.pending.pop(0)]
        while self.state.pending and len(self.state.pending[0]) * (len(batch) + 1) <= self.state.batch_tokens:
            batch.append(self.state.pending.pop(0))
        return batch

    @torch.no_grad()
    def _run_batch(self, batch: list[list[int]]) -> None:
        longest = max(len(ids) for ids in batch)
        pad = self.handle.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        attention = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
        valid = attention.bool()
        valid[:, 0] &= torch.tensor([not starts_with_special(self.handle, ids) for ids in batch])  # the sink
        first_doc = len(self.state.doc_tokens)
        docs = torch.arange(first_doc, first_doc + len(batch))

        def record(layer: int, acts: torch.Tensor) -> None:
            self.folder.put(self.state.layers[layer], acts.detach().cpu(), valid, docs)

        with hooked(self.handle, self.units.hooks(self.handle, record)):
            device = self.handle.device
            self.handle.adapter.base(input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
        self.folder.wait()
        self.state.doc_tokens.extend(np.asarray(ids, dtype=np.int32) for ids in batch)
        self.state.tokens_done += sum(len(ids) for ids in batch)
        self.state.batches += 1

    def _progress(self, started: float) -> None:
        done, target = self.state.tokens_done, self.spec.tokens
        elapsed = time.monotonic() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        message = (f"{min(done, target):,} / {target:,} tokens ({rate:,.0f} tokens/s), "
                   f"{len(self.state.doc_tokens):,} documents")
        fraction = min(1.0, done / target)
        self.report(fraction, message)
        self._write(lambda: store.write_json_atomic(self.build_dir / "progress.json", {
            "fraction": fraction, "message": message, "pid": os.getpid(), "tokens_per_second": rate,
            "updated": time.time()}))

    def _finish(self) -> None:
        needed = store.estimated_bytes(self.units.n_layers, self.units.width, self.state.tokens_done)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise UserInputError(f"The index needs about {needed / 1e6:,.0f} MB in {self.directory}, and only "
                                 f"{free / 1e6:,.0f} MB are free; free some space and run again (the build resumes).")
        lengths = np.array([len(d) for d in self.state.doc_tokens], dtype=np.int64)
        info = {"documents": len(self.state.doc_tokens), "tokens_indexed": self.state.tokens_done,
                "corpus_documents_read": self.state.cursor, "batches": self.state.batches,
                "build_seconds": round(self.state.seconds, 1),
                "tokens_per_second": round(self.state.tokens_done / max(self.state.seconds, 1e-9), 1),
                "corpus_title": self.corpus.title, "built": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._write(lambda: self.state.save(self.checkpoint))  # so a failed final write loses nothing
        self._write(lambda: store.write_index(self.directory, self.spec, self.state.layers,
                                              np.concatenate(self.state.doc_tokens),
                                              np.concatenate([[0], np.cumsum(lengths)]), info))
        shutil.rmtree(self.build_dir, ignore_errors=True)

    def _write(self, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as exc:
            if store.is_disk_full(exc):
                for tmp in self.directory.rglob("*.tmp"):
                    tmp.unlink(missing_ok=True)
                raise UserInputError(store.disk_full_message(self.directory, exc)) from exc
            raise
