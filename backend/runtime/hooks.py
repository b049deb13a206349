"""Hooks on the shared model, only inside a context manager and under the model's lock.

``hooked`` attaches a list of ``Hook``s for the duration of a block. ``read_site`` and
``edit_site`` build hooks for a named site of the architecture adapter (arch.SITES), so no
analysis needs to know whether a tensor is a module's input or its output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from backend.runtime.arch import Site
from backend.runtime.models import ModelHandle


@dataclass(frozen=True)
class Hook:
    """``kind`` is "forward" (fn(module, args, output) -> new output or None),
    "pre" (fn(module, args) -> new args or None) or "pre_kwargs" (fn(module, args, kwargs) ->
    None or new (args, kwargs), for modules called with keyword arguments)."""

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
                elif hook.kind == "pre_kwargs":
                    removers.append(hook.module.register_forward_pre_hook(hook.fn, with_kwargs=True))
                else:
                    raise ValueError(f"unknown hook kind {hook.kind!r}")
            yield
        finally:
            for remover in removers:
                remover.remove()


def first_tensor(value):
    """Module outputs are a tensor or a tuple whose first item is the tensor."""
    return value[0] if isinstance(value, tuple) else value


def read_site(site: Site, fn: Callable[[torch.Tensor], None]) -> Hook:
    """A hook calling ``fn`` with the site's tensor (in the autograd graph when there is one)."""
    if site.kind == "pre":
        return Hook(site.module, "pre", lambda module, args: fn(args[0]))
    return Hook(site.module, "forward", lambda module, args, output: fn(first_tensor(output)))


def edit_site(site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> Hook:
    """A hook replacing the site's tensor by ``fn(tensor)``."""
    if site.kind == "pre":
        return Hook(site.module, "pre", lambda module, args: (fn(args[0]),) + tuple(args[1:]))

    def forward(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    return Hook(site.module, "forward", forward)


def embed_leaf(handle: ModelHandle, keep: Callable[[torch.Tensor], None] | None = None,
               value: torch.Tensor | None = None) -> Hook:
    """Make the embeddings (block 0's input) a fresh leaf that requires grad, so a backward
    pass stops there; ``value`` replaces them, ``keep`` receives the leaf."""

    def fn(tensor: torch.Tensor) -> torch.Tensor:
        leaf = (tensor if value is None else value.to(tensor.dtype)).detach().clone().requires_grad_(True)
        if keep is not None:
            keep(leaf)
        return leaf

    return edit_site(handle.adapter.site("resid_pre", 0), fn)
