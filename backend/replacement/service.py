"""Fitting the default transcoder set in the background for the pages (the graph page's Fit
button): one job per folder per process, and fit_transcoders' lock file keeps it to one per
machine (so `make transcoders` and the server never fit the same folder at once).
``fit_status`` tells a page where it stands."""

from __future__ import annotations

import json
from pathlib import Path

from backend.replacement.fit import FitSettings, fit_transcoders
from backend.runtime.config import default_transcoders_dir
from backend.runtime.jobs import Job, job_for, start_job
from backend.runtime.models import ModelHandle
from backend.units.build import exclusive
from backend.units.corpus import Corpus, corpus_from


def ensure_fitting(handle: ModelHandle, folder: Path | None = None, settings: FitSettings | None = None,
                   corpus: Corpus | None = None) -> Job:
    """Start fitting ``folder`` (default: the default set, on the default corpus) in the
    background unless it is complete or already being fitted here; an interrupted fit
    resumes."""
    folder = Path(folder or default_transcoders_dir())

    def work(job: Job) -> None:
        if not (folder / "config.yaml").exists():
            fit_transcoders(handle, corpus or corpus_from(None), folder, settings or FitSettings(), job.report,
                            job.cancel)

    return start_job(folder, "fitting", work, done="complete",
                     cancelled="stopped; fitting again resumes at the first unfinished layer")


def stop_fitting(folder: Path | None = None) -> None:
    """Ask this process's fit of ``folder`` to stop (it stops at its next progress report)."""
    job = job_for(Path(folder or default_transcoders_dir()))
    if job is not None:
        job.cancel.set()


def fit_status(folder: Path | None = None) -> dict:
    """{"state": ready|fitting|stopped|missing|failed|cancelled, "fraction", "message", "folder"}."""
    folder = Path(folder or default_transcoders_dir())
    if (folder / "config.yaml").exists():
        return {"state": "ready", "fraction": 1.0, "message": "complete", "folder": str(folder)}
    job = job_for(folder)
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
