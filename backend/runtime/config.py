"""Limits and locations, each overridable by an environment variable (listed in the README)."""

from __future__ import annotations

import os
from pathlib import Path


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def max_prompt_tokens() -> int:
    """Longest prompt accepted, in tokens (CIRCUITSCOPE_MAX_TOKENS, default 256)."""
    return _int_env("CIRCUITSCOPE_MAX_TOKENS", 256)


def torch_threads() -> int:
    """Torch intra-op threads (CIRCUITSCOPE_THREADS). Default: half the cores, at least 1.

    On small shared machines one thread was measured faster than two (DESIGN.md, facts).
    """
    return _int_env("CIRCUITSCOPE_THREADS", max(1, min(8, (os.cpu_count() or 2) // 2)))


def cache_dir() -> Path:
    """Where converted models live (CIRCUITSCOPE_CACHE, default the user cache directory)."""
    configured = os.environ.get("CIRCUITSCOPE_CACHE")
    if configured:
        return Path(configured)
    import platformdirs

    return Path(platformdirs.user_cache_dir("circuitscope"))


def default_transcoders_dir() -> Path:
    """Where `make transcoders` (and the graph page's Fit button) put SmolLM2's default set
    (CIRCUITSCOPE_TRANSCODERS_DIR, default under the cache)."""
    configured = os.environ.get("CIRCUITSCOPE_TRANSCODERS_DIR")
    return Path(configured) if configured else cache_dir() / "transcoders" / "smollm2-default"


def max_cached_models() -> int:
    """How many models one process keeps loaded at once (CIRCUITSCOPE_MAX_MODELS, default 2)."""
    return max(1, _int_env("CIRCUITSCOPE_MAX_MODELS", 2))


def max_prompt_chars() -> int:
    """Longest prompt accepted, in characters, checked before tokenizing (CIRCUITSCOPE_MAX_CHARS)."""
    return _int_env("CIRCUITSCOPE_MAX_CHARS", 20_000)


def allowed_model_dirs() -> list[Path]:
    """Folders models may be loaded from, for a shared deployment (CIRCUITSCOPE_MODEL_DIRS,
    separated by the OS path separator). Empty = any path; when set, hub ids are refused too."""
    raw = os.environ.get("CIRCUITSCOPE_MODEL_DIRS", "")
    return [Path(part).expanduser().resolve() for part in raw.split(os.pathsep) if part.strip()]


def trust_remote_code() -> bool:
    """Run a model repository's own Python code: only when the operator sets
    CIRCUITSCOPE_TRUST_REMOTE_CODE=1 (never from the page). Default off."""
    return os.environ.get("CIRCUITSCOPE_TRUST_REMOTE_CODE") == "1"


def device_map() -> str | None:
    """Shard models over devices with Accelerate (CIRCUITSCOPE_DEVICE_MAP: auto, balanced,
    sequential); unset = the whole model on one device."""
    return os.environ.get("CIRCUITSCOPE_DEVICE_MAP") or None


def max_memory() -> dict | None:
    """Per-device budget for sharding (CIRCUITSCOPE_MAX_MEMORY, e.g. "0=20GiB,1=20GiB,cpu=64GiB");
    what does not fit is offloaded to disk under the cache directory."""
    raw = os.environ.get("CIRCUITSCOPE_MAX_MEMORY", "")
    budget = {}
    for part in raw.split(","):
        if "=" in part:
            device, size = (x.strip() for x in part.split("=", 1))
            budget[int(device) if device.isdigit() else device] = size
    return budget or None
