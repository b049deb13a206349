"""Hooks on the shared model, only inside a context manager and under the model's lock."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from backend.runtime.models import ModelHandle


@dataclass(frozen=True)
class Hook:
    """``kind`` is "forward" (fn(module, args, output) -> new output or None) or
    "pre" (fn(module, args) -> new args or None)."""

    module: nn.Module
    kind: str
    fn: Callable


@contextmanager
def hooked(handle: ModelHandle, hooks: Sequence[Hook]) -> Iterator[None]:
    """Attach ``hooks`` for the duration of the block; always removed, even on error."""
    with handle.lock:
        removers = []
        try:
            for hook in hooks:
                if hook.kind == "forward":
                    removers.append(hook.module.register_forward_hook(hook.fn))
                elif hook.kind == "pre":
                    removers.append(hook.module.register_forward_pre_hook(hook.fn))
                else:
                    raise ValueError(f"unknown hook kind {hook.kind!r}")
            yield
        finally:
            for remover in removers:
                remover.remove()


def first_tensor(value):
    """Module outputs are a tensor or a tuple whose first item is the tensor."""
    return value[0] if isinstance(value, tuple) else value
