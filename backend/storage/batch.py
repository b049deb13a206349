"""Batch precompute: many prompts x analyses, one JSON file each plus an index, resumable.

Each (prompt, target, analysis, settings) has a file name with a hash of its inputs, and a
file is written atomically (temporary file, then rename) only once complete, so an
interrupted run resumes where it stopped: files already there are not recomputed. With a
gallery store, each result is also saved there (one row per file, replaced on a rerun).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from backend import settings as S
from backend.errors import UserInputError
from backend.runtime.models import ModelHandle
from backend.runtime.prompts import with_bos
from backend.storage.store import Store

ANALYSES = ("lens", "inspect", "graph", "paths")
SETTINGS = {"graph": S.GRAPH, "paths": S.PATHS}  # the analyses' setting records (defaults, names)
MAX_PROMPTS = 10_000
BatchProgress = Callable[[int, int, str], None]  # (done, total, message): counts, not a fraction


def read_prompts(path: Path) -> list[dict]:
    """One prompt per line; a line starting with '{' is JSON: {"prompt": ..., "target": ...}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"Could not read the prompts file {path}: {exc}") from exc
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise UserInputError(f"{path}:{number}: invalid JSON ({exc}).") from exc
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise UserInputError(f"{path}:{number}: expected an object with a string 'prompt'.")
            prompts.append({"prompt": item["prompt"], "target": item.get("target") or None})
        else:
            prompts.append({"prompt": line, "target": None})
    if not prompts:
        raise UserInputError(f"{path} holds no prompts.")
    if len(prompts) > MAX_PROMPTS:
        raise UserInputError(f"{path} holds {len(prompts)} prompts; the limit is {MAX_PROMPTS}.")
    return prompts


def compute(handle: ModelHandle, analysis: str, prompt: str, target: str | None, values: dict) -> str:
    """One analysis as the JSON text the CLI and the pages use (``values``: its settings)."""
    if analysis == "lens":
        from backend.analyses.lens import logit_lens

        return logit_lens(handle, prompt, target).to_json()
    if analysis == "inspect":
        from backend.analyses.inspect_prompt import inspect_prompt

        return inspect_prompt(handle, prompt, target).to_json()
    if analysis == "graph":
        from backend.graphs.attribution import attribution_graph
        from backend.graphs.neuronpedia import to_graph_json, view_from_graph

        graph = attribution_graph(handle, prompt, target, wrong=values["wrong"] or None, max_nodes=values["max_nodes"],
                                  other_inputs=values["other_inputs"])
        return json.dumps(to_graph_json(view_from_graph(graph, values["node_threshold"], values["edge_threshold"])))
    if analysis == "paths":
        from backend.causal.paths import neuron_path

        return neuron_path(handle, prompt, target, position=values["position"], steps=values["steps"],
                           top_k=values["top_k"]).to_json()
    raise UserInputError(f"Unknown analysis '{analysis}'; choose from {', '.join(ANALYSES)}.")


def _file_name(index: int, analysis: str, item: dict, settings: dict) -> str:
    key = json.dumps([item["prompt"], item["target"], analysis, settings], sort_keys=True, default=str)
    return f"{index:04d}-{analysis}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_batch(
    handle: ModelHandle,
    prompts: list[dict],
    analyses: list[str],
    out_dir: Path,
    *,
    settings: dict[str, dict] | None = None,
    store: Store | None = None,
    progress: BatchProgress | None = None,
    bos: str = "on",
) -> dict:
    """Compute what is missing under ``out_dir``; returns the index (also written to
    index.json). ``settings`` maps an analysis to setting values (defaults from
    backend.settings for the rest). Prompts are read with the document-start token per ``bos``
    (runtime.prompts.with_bos); the gallery keeps them as typed."""
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown or not analyses:
        raise UserInputError(f"Unknown analysis {unknown or analyses}; choose from {', '.join(ANALYSES)}.")
    given = settings or {}
    settings = {a: {**(SETTINGS[a].defaults() if a in SETTINGS else {}), **given.get(a, {})} for a in analyses}
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(i, item, analysis) for i, item in enumerate(prompts) for analysis in analyses]
    entries: list[dict] = []
    index = {"model": handle.name, "analyses": analyses, "settings": settings, "items": entries}
    for done, (i, item, analysis) in enumerate(jobs):
        name = _file_name(i, analysis, item, settings[analysis])
        entry = {"index": i, "prompt": item["prompt"], "target": item["target"], "analysis": analysis, "file": name}
        path = out_dir / name
        if path.exists():
            entry["status"] = "done"
        else:
            if progress:
                progress(done, len(jobs), f"{analysis}: {item['prompt'][:40]}")
            start = time.perf_counter()
            try:
                text = compute(
                    handle, analysis, with_bos(handle, item["prompt"], bos), item["target"], settings[analysis]
                )
            except UserInputError as exc:
                entry.update(status="error", error=str(exc))
            else:
                _write_atomic(path, text)
                entry.update(status="done", seconds=round(time.perf_counter() - start, 3))
        if store is not None and entry["status"] == "done":
            store.save(analysis, f"{analysis}: {item['prompt'][:80]}", handle.name, item["prompt"],
                       path.read_text(encoding="utf-8"),
                       settings={"page": analysis, "values": settings[analysis], "target": item["target"],
                                 "bos": bos, "batch": str(out_dir)},
                       source=f"batch:{out_dir.resolve()}:{name}")
        entries.append(entry)
        _write_atomic(out_dir / "index.json", json.dumps(index, indent=1))
    if progress:
        progress(len(jobs), len(jobs), "done")
    return index
