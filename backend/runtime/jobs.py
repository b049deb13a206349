"""Background jobs for the pages (index builds, transcoder fits): one per key per process,
with progress, a message and a cancel event the work checks at its progress reports."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import UserInputError


class Cancelled(Exception):
    """The job was cancelled; what it finished is kept and a later run resumes it."""


@dataclass
class Job:
    key: Path
    running: str  # the state's name while it runs ("building", "fitting")
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = ""  # running, done, failed, cancelled
    fraction: float = 0.0
    message: str = "starting"

    def __post_init__(self) -> None:
        self.state = self.state or self.running

    @property
    def is_running(self) -> bool:
        return self.state == self.running

    def report(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message


_jobs: dict[Path, Job] = {}
_jobs_lock = threading.Lock()


def start_job(key: Path, running: str, work: Callable[[Job], None], *, done: str, cancelled: str) -> Job:
    """Run ``work(job)`` in a daemon thread unless a job for ``key`` is running here (that one
    is returned). Its end sets the state: done, cancelled (work raised Cancelled), failed
    (the message says why; what was finished stays for a retry)."""
    with _jobs_lock:
        job = _jobs.get(key)
        if job is not None and job.is_running:
            return job
        job = Job(key, running)
        _jobs[key] = job

    def run() -> None:
        try:
            work(job)
            job.state, job.fraction, job.message = "done", 1.0, done
        except Cancelled:
            job.state, job.message = "cancelled", cancelled
        except UserInputError as exc:
            job.state, job.message = "failed", str(exc)
        except Exception as exc:  # shown on the page
            job.state, job.message = "failed", f"{type(exc).__name__}: {exc}"

    threading.Thread(target=run, name=f"circuitscope-{running}", daemon=True).start()
    return job


def job_for(key: Path) -> Job | None:
    with _jobs_lock:
        return _jobs.get(key)
