"""Fitting the default transcoder set in the background for the pages (the graph page's Fit
button): one job per folder per process, and fit_transcoders' lock file keeps it to one per
machine (so `make transcoders` and the server never fit the same folder at once).
``fit_status`` tells a page where it stands."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import UserInputError
from backend.replacement.fit import FitSettings, fit_transcoders
from backend.runtime.config import default_transcoders_dir
from backend.runtime.models import ModelHandle
from backend.units.build import Cancelled, exclusive
from backend.units.corpus import Corpus, corpus_from


@dataclass
class FitJob:
    folder: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "fitting"  # fitting, done, failed, cancelled
    fraction: float = 0.0
    message: str = "starting"


_jobs: dict[Path, FitJob] = {}
_jobs_lock = threading.Lock()


def ensure_fitting(handle: ModelHandle, folder: Path | None = None, settings: FitSettings | None = None,
                   corpus: Corpus | None = None) -> FitJob:
    """Start fitting ``folder`` (default: the default set, on the default corpus) in the
    background unless it is complete or already being fitted here; an interrupted fit
    resumes."""
    folder = Path(folder or default_transcoders_dir())
    with _jobs_lock:
        job = _jobs.get(folder)
        if job is not None and job.state == "fitting":
            return job
        job = FitJob(folder)
        _jobs[folder] = job
    if (folder / "config.yaml").exists():
        job.state, job.fraction, job.message = "done", 1.0, "complete"
        return job

    def report(fraction: float, message: str) -> None:
        job.fraction, job.message = fraction, message

    def run() -> None:
        try:
            fit_transcoders(handle, corpus or corpus_from(None), folder, settings or FitSettings(), report, job.cancel)
            job.state, job.fraction, job.message = "done", 1.0, "complete"
        except Cancelled:
            job.state, job.message = "cancelled", "stopped; fitting again resumes at the first unfinished layer"
        except UserInputError as exc:
            job.state, job.message = "failed", str(exc)
        except Exception as exc:  # shown on the page; finished layers stay for a retry
            job.state, job.message = "failed", f"{type(exc).__name__}: {exc}"

    threading.Thread(target=run, name="circuitscope-fit", daemon=True).start()
    return job


def stop_fitting(folder: Path | None = None) -> None:
    """Ask this process's fit of ``folder`` to stop (it stops at its next progress report)."""
    with _jobs_lock:
        job = _jobs.get(Path(folder or default_transcoders_dir()))
    if job is not None:
        job.cancel.set()


def fit_status(folder: Path | None = None) -> dict:
    """{"state": ready|fitting|stopped|missing|failed|cancelled, "fraction", "message", "folder"}."""
    folder = Path(folder or default_transcoders_dir())
    if (folder / "config.yaml").exists():
        return {"state": "ready", "fraction": 1.0, "message": "complete", "folder": str(folder)}
    with _jobs_lock:
        job = _jobs.get(folder)
    if job is not None and job.state != "done":
        return {"state": job.state, "fraction": job.fraction, "message": job.message, "folder": str(folder)}
    if not (folder / "work").exists():
        return {"state": "missing", "fraction": 0.0, "message": "not fitted yet", "folder": str(folder)}
    with exclusive(folder) as free:
        busy = not free
    reports = folder / "work" / "report.json"
    layers = len(json.loads(reports.read_text())) if reports.exists() else 0
    if busy:
        return {"state": "fitting", "fraction": 0.0, "message": f"another process is fitting it ({layers} layers done)",
                "folder": str(folder)}
    return {"state": "stopped", "fraction": 0.0, "folder": str(folder),
            "message": f"stopped with {layers} layers done (fitting again resumes)"}
