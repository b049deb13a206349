"""Shared fixtures: tiny random models of every family, and the real SmolLM2 (loaded once)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub during tests
os.environ.setdefault("CIRCUITSCOPE_EXAMPLES", "0")  # no background example builds competing for the CPU
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("CIRCUITSCOPE_INDEX_AUTOBUILD", "0")  # pages do not start index builds during tests

import pytest
import torch

from tests.tiny import FAMILIES, tiny_handle

# This test process's own gallery, index root and default transcoder folder (never the user's).
SCRATCH = {
    "CIRCUITSCOPE_DB": lambda: os.path.join(tempfile.mkdtemp(prefix="circuitscope-"), "gallery.sqlite"),
    "CIRCUITSCOPE_INDEX_DIR": lambda: tempfile.mkdtemp(prefix="circuitscope-index-"),
    "CIRCUITSCOPE_TRANSCODERS_DIR": lambda: os.path.join(tempfile.mkdtemp(prefix="circuitscope-tc-"),
                                                         "smollm2-default"),  # tests choose their sets
}


def use_scratch_folders(replace: bool) -> None:
    for name, make in SCRATCH.items():
        if replace or name not in os.environ:
            os.environ[name] = make()


use_scratch_folders(replace=False)


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker (pytest -n N)
        use_scratch_folders(replace=True)  # it inherited the controller's folders: its own instead
        workers = int(config.workerinput["workercount"])
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // workers))  # the workers share the cores


IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"
FRANCE_PROMPT = "The capital of France is"


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request):
    """One tiny random model per supported family."""
    return tiny_handle(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_handle("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model, shared by all integration tests."""
    from backend.runtime.models import get_model

    return get_model("smollm2")


@pytest.fixture
def normalize_small_spans(monkeypatch):
    """Tiny random models move a logit difference by far less than pairs.MIN_SPAN, where
    numbers are shown raw; tests of the normalized scale lower the threshold (and drop cached
    pairs that were scaled under the default)."""
    from backend.causal import pairs
    from backend.runtime.cache import clear_all

    monkeypatch.setattr(pairs, "MIN_SPAN", 1e-4)
    clear_all()
    yield
    clear_all()


REAL_MODEL_FIXTURES = {"smollm2_transcoders", "smollm2", "app", "gemma", "smollm2_index"}
REAL_MODEL_MODULES = ("test_cli", "test_gemma3")  # subprocesses / fixtures of their own load a real model


SHARED_BUILD_FIXTURES = ("smollm2_transcoders", "smollm2_index")  # minutes to build: one worker builds each


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Tiers by what a test loads: browser (Chromium), app (AppTest pages), integration
    (a real model), else unit. Under ``pytest -n N --dist loadgroup`` a module's tests stay on
    one worker (its module fixtures and the process caches are computed once), and the tests
    of each expensive session fixture share one worker, which builds it once."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_worker_group(item)))
        if item.get_closest_marker("browser"):
            continue
        if item.module.__name__.endswith("test_app"):
            item.add_marker(pytest.mark.app)
        elif (REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or "smollm2" in item.module.__name__
              or item.module.__name__.endswith(REAL_MODEL_MODULES)):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


def _worker_group(item: pytest.Item) -> str:
    fixtures = set(getattr(item, "fixturenames", ()))
    return next((name for name in SHARED_BUILD_FIXTURES if name in fixtures), item.module.__name__)


SMOLLM2_INDEX_TOKENS = 20_000  # ~70 s on 2 CPU cores; the default index (250k tokens) is for users and bench


@pytest.fixture(scope="session")
def smollm2_index(smollm2):
    """A small index of the default corpus for SmolLM2, under this session's index root (the
    served app of the browser tests finds it there too)."""
    from backend.units.build import build_index
    from backend.units.corpus import corpus_from
    from backend.units.service import open_index

    return open_index(build_index(smollm2, corpus_from(None), tokens=SMOLLM2_INDEX_TOKENS))


@pytest.fixture(scope="session")
def smollm2_transcoders(smollm2, tmp_path_factory):
    """A small transcoder set for SmolLM2 fitted by the CLI (64 features, 3,000 tokens, 30
    epochs: 45 s on 2 cores), and its features' index of 2,000 default-corpus tokens under this
    session's index root."""
    from backend.cli import main
    from backend.replacement.transcoders import open_transcoders
    from backend.units.build import build_index
    from backend.units.corpus import corpus_from

    folder = tmp_path_factory.mktemp("transcoders") / "set"
    assert main(["fit-transcoders", "--features", "64", "--k", "8", "--tokens", "3000", "--context", "64",
                 "--epochs", "30", "--out", str(folder)]) == 0
    build_index(smollm2, corpus_from(None), tokens=2000, units=open_transcoders(folder, smollm2))
    return folder
