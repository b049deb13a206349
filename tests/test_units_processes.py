"""The index CLI as separate processes: killed mid-build and resumed, two builders at once.

A tiny random model saved as a folder is the model (`--model FOLDER`); every build of the
same corpus and settings must give byte-identical arrays.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backend.units.index import UnitIndex, read_meta
from tests.test_units import make_corpus
from tests.tiny import tiny_handle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("procs")
    handle = tiny_handle("llama")
    handle.model.save_pretrained(folder / "model")
    handle.tokenizer.save_pretrained(folder / "model")
    make_corpus(folder / "corpus.txt", n_docs=800)
    whole = folder / "whole"
    assert index_command(folder, whole).wait(timeout=300) == 0
    return folder, UnitIndex(whole)


def index_command(folder: Path, out: Path, log: str = "log") -> subprocess.Popen:
    """The CLI building ``out``; its stderr goes to ``out``.``log`` (a pipe would fill up and block it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stderr = open(out.parent / f"{out.name}.{log}", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "backend", "index", "--model", str(folder / "model"), "--corpus",
         str(folder / "corpus.txt"), "--tokens", "15000", "--context", "24", "--batch-tokens", "32", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "CIRCUITSCOPE_INDEX_CHECKPOINT_S": "0"},
        stdout=subprocess.DEVNULL, stderr=stderr)


def log_of(out: Path, log: str = "log") -> str:
    return (out.parent / f"{out.name}.{log}").read_text()


def assert_same_index(a: UnitIndex, b: UnitIndex) -> None:
    assert set(a.arrays) == set(b.arrays)
    for name in a.arrays:
        np.testing.assert_array_equal(np.asarray(a.arrays[name]), np.asarray(b.arrays[name]), err_msg=name)


def fraction(out: Path) -> float:
    try:
        return json.loads((out / "build" / "progress.json").read_text())["fraction"]
    except (OSError, ValueError, KeyError):
        return 0.0


def test_a_killed_build_resumes_to_the_same_index(setup):
    folder, whole = setup
    out = folder / "killed"
    proc = index_command(folder, out)
    deadline = time.time() + 120
    while fraction(out) < 0.25 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the build ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = fraction(out)
    assert 0.25 <= killed_at < 1.0 and read_meta(out) is None
    resumed = index_command(folder, out, "resumed")
    assert resumed.wait(timeout=300) == 0, log_of(out, "resumed")
    assert "resuming at" in log_of(out, "resumed")
    assert_same_index(whole, UnitIndex(out))


def test_two_concurrent_builders_produce_one_index(setup):
    folder, whole = setup
    out = folder / "shared"
    first, second = index_command(folder, out, "first"), index_command(folder, out, "second")
    assert [p.wait(timeout=300) for p in (first, second)] == [0, 0], log_of(out, "first") + log_of(out, "second")
    logs = [log_of(out, "first"), log_of(out, "second")]
    assert sum("another builder" in log for log in logs) == 1  # one built, the other waited
    assert_same_index(whole, UnitIndex(out))
    assert not (out / "build").exists()


def test_index_cli_bad_input_exits_2(setup, tmp_path):
    folder, _ = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    proc = subprocess.run([sys.executable, "-m", "backend", "index", "--model", str(folder / "model"), "--corpus",
                           str(empty), "--out", str(tmp_path / "idx")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: The corpus") and "empty" in proc.stderr
