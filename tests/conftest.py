"""Shared fixtures: tiny random models of every family, and the real SmolLM2 (loaded once)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub during tests
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("CIRCUITSCOPE_DB", os.path.join(tempfile.mkdtemp(prefix="circuitscope-"), "gallery.sqlite"))

import pytest

from tests.tiny import FAMILIES, tiny_handle

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
