"""Finding, opening and building indexes for the pages and the CLI.

``find_index`` returns the complete index of (model, units, corpus), if any, preferring the
default context and then the most tokens. ``ensure_building`` starts a build in a background
thread (one per index directory per process; the flock in ``build`` keeps it to one per
machine), and ``index_status`` tells a page where it stands ("index 35% built").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from backend.runtime.jobs import Job, job_for, start_job
from backend.runtime.models import ModelHandle
from backend.units import index as store
from backend.units.build import build_index, exclusive, make_spec, read_progress
from backend.units.corpus import Corpus
from backend.units.unitset import Neurons, UnitSet, model_fingerprint

MAX_OPEN = 8
BACKGROUND_BATCH_TOKENS = 512  # holds the model lock ~1.5 s at a time, so pages stay responsive
_open: OrderedDict[Path, store.UnitIndex] = OrderedDict()
_open_lock = threading.Lock()


def open_index(directory: Path) -> store.UnitIndex:
    """The index at ``directory`` (kept open; at most MAX_OPEN at once)."""
    directory = Path(directory)
    with _open_lock:
        if directory in _open:
            _open.move_to_end(directory)
            return _open[directory]
    opened = store.UnitIndex(directory)
    with _open_lock:
        _open[directory] = opened
        while len(_open) > MAX_OPEN:
            _open.popitem(last=False)
    return opened


def find_index(handle: ModelHandle, corpus: Corpus, units: UnitSet | None = None) -> store.UnitIndex | None:
    """The best complete index of this model's units on ``corpus`` under the index root."""
    units = units or Neurons.of(handle)
    fingerprint, corpus_fingerprint = model_fingerprint(handle), corpus.fingerprint()
    candidates = []
    for meta_path in store.index_root().glob("*/*/meta.json"):
        meta = store.read_meta(meta_path.parent)
        spec = (meta or {}).get("spec", {})
        if (spec.get("model_fingerprint"), spec.get("units"), spec.get("corpus_fingerprint")) == (
                fingerprint, units.key(), corpus_fingerprint):
            candidates.append((spec.get("context") == store.DEFAULT_CONTEXT, spec.get("tokens", 0), meta_path.parent))
    if not candidates:
        return None
    return open_index(max(candidates)[2])


def index_at(handle: ModelHandle, directory: Path, units: UnitSet | None = None) -> store.UnitIndex:
    """The index in ``directory``, refused when it belongs to another model or units."""
    units = units or Neurons.of(handle)
    opened = open_index(directory)
    opened.check(model_fingerprint(handle), units.key())
    return opened


# ---------------------------------------------------------------- background builds


def ensure_building(handle: ModelHandle, corpus: Corpus, tokens: int = store.DEFAULT_TOKENS,
                    context: int = store.DEFAULT_CONTEXT, units: UnitSet | None = None) -> Job:
    """Start building this index in the background unless it exists or is being built here."""
    units = units or Neurons.of(handle)
    directory = make_spec(handle, units, corpus, context, tokens).default_dir()

    def work(job: Job) -> None:
        build_index(handle, corpus, context=context, tokens=tokens, directory=directory, units=units,
                    batch_tokens=BACKGROUND_BATCH_TOKENS, progress=job.report, cancel=job.cancel)

    return start_job(directory, "building", work, done="index complete",
                     cancelled="cancelled; building again resumes where it stopped")


def index_status(handle: ModelHandle, corpus: Corpus, tokens: int = store.DEFAULT_TOKENS,
                 context: int = store.DEFAULT_CONTEXT, units: UnitSet | None = None) -> dict:
    """{"state": ready|building|stopped|missing|failed, "fraction", "message", "directory"}."""
    units = units or Neurons.of(handle)
    found = find_index(handle, corpus, units)
    if found is not None:
        return {"state": "ready", "fraction": 1.0, "message": _describe(found), "directory": str(found.directory)}
    directory = make_spec(handle, units, corpus, context, tokens).default_dir()
    job = job_for(directory)
    if job is not None and job.state != "done":
        return {"state": job.state, "fraction": job.fraction, "message": job.message, "directory": str(directory)}
    progress = read_progress(directory)
    if progress and _locked_by_another(directory):
        return {"state": "building", "fraction": progress.get("fraction", 0.0),
                "message": f"another process is building it: {progress.get('message', '')}",
                "directory": str(directory)}
    if progress:
        return {"state": "stopped", "fraction": progress.get("fraction", 0.0),
                "message": f"stopped at: {progress.get('message', '')} (building again resumes)",
                "directory": str(directory)}
    return {"state": "missing", "fraction": 0.0, "message": "no index yet", "directory": str(directory)}


def _locked_by_another(directory: Path) -> bool:
    with exclusive(directory) as free:
        return not free


def _describe(found: store.UnitIndex) -> str:
    meta = found.meta
    return (f"{meta.get('corpus_title', found.spec['corpus'])}: {meta.get('tokens_indexed', 0):,} tokens in "
            f"{meta.get('documents', 0):,} documents, context {found.spec['context']}")
