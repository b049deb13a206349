"""Benchmarks on the embedded model, side by side, written to bench/results.json and
bench/results.md.

Each section runs in its own process so that its peak memory (max RSS) is its own.
Usage: python bench/run.py [--sections load,threads,lens,graph,graph_vs_brute] [--out bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

IOI = "When Mary and John went to the store, John gave a drink to"
FRANCE = "The capital of France is"
SECTIONS = ("load", "threads", "lens", "graph", "graph_vs_brute", "patching", "circuit", "paths", "transformer_lens")
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"  # .venv + transformer-lens (make bench-venv)
PUBLISHED_GPT2_IOI = {"resid_pre": {"atp": 0.753, "relp": 0.968}, "attn_out": {"atp": 0.979, "relp": 0.962},
                      "mlp_out": {"atp": 0.195, "relp": 0.992}}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


# ---------------------------------------------------------------- sections (child processes)


def section_load() -> dict:
    import_s, _ = timed(lambda: __import__("transformers") and __import__("torch"))
    from backend.runtime.models import load_uncached

    with tempfile.TemporaryDirectory() as cache:
        os.environ["CIRCUITSCOPE_CACHE"] = cache
        cold_s, _ = timed(lambda: load_uncached("smollm2"))  # gguf parse + conversion
        cached_s, _ = timed(lambda: load_uncached("smollm2"), repeat=2)
    return {"import_torch_transformers_s": import_s, "load_cold_s": cold_s, "load_cached_s": cached_s,
            "cold_over_cached": cold_s / cached_s}


def section_threads() -> dict:
    import torch

    from backend.runtime.models import get_model

    handle = get_model("smollm2")
    ids = torch.tensor([handle.tokenizer(IOI)["input_ids"]])
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)

        def forward_backward():
            embeds = handle.adapter.embed(ids).detach().requires_grad_(True)
            handle.model(inputs_embeds=embeds).logits[0, -1].max().backward()

        with torch.no_grad():
            forward_s, _ = timed(lambda: handle.model(ids), repeat=5)
        backward_s, _ = timed(forward_backward, repeat=3)
        out[f"threads_{threads}"] = {"forward_s": forward_s, "forward_backward_s": backward_s}
    out["two_over_one_forward"] = out["threads_2"]["forward_s"] / out["threads_1"]["forward_s"]
    return out


def section_lens() -> dict:
    from backend.analyses.heatmaps import cell_detail, heatmap
    from backend.analyses.inspect_prompt import inspect_prompt
    from backend.runtime.models import get_model

    handle = get_model("smollm2")
    inspect_s, _ = timed(lambda: inspect_prompt(handle, IOI, n_continue=20))

    def heatmaps_page():  # what the heatmaps page computes on first view
        for quantity in ("target_prob", "resid_norm", "attn_norm", "mlp_norm"):
            heatmap(handle, IOI, quantity)
        cell_detail(handle, IOI, handle.adapter.n_layers, 13)

    first_s, _ = timed(heatmaps_page)
    cached_s, _ = timed(heatmaps_page, repeat=3)
    return {"n_tokens": 14, "inspector_with_20_token_continuation_s": inspect_s, "heatmaps_page_first_s": first_s,
            "heatmaps_page_cached_s": cached_s, "first_over_cached": first_s / cached_s}


def section_graph() -> dict:
    import numpy as np

    from backend.graphs.attribution import attribution_graph
    from backend.graphs.neuronpedia import to_graph_json, view_from_graph
    from backend.graphs.prune import prune
    from backend.runtime.models import get_model

    handle = get_model("smollm2")
    out = {}
    for k in (200, 1000):
        graph_s, graph = timed(lambda: attribution_graph(handle, IOI, max_nodes=k))
        rows = list(range(graph.n_features)) + list(range(graph.logit_slice.start, graph.n_nodes))
        scale = np.maximum(np.abs(graph.node_values[rows]), np.abs(graph.adjacency[rows]).sum(1))
        error = float((np.abs(graph.adjacency[rows].sum(1) - graph.node_values[rows]) / scale).max())
        reprune_s, _ = timed(lambda: prune(graph, 0.7, 0.95), repeat=5)
        view_s, view = timed(lambda: view_from_graph(graph, 0.8, 0.98), repeat=3)
        exported = json.dumps(to_graph_json(view))
        out[f"k{k}"] = {
            "graph_s": graph_s,
            "backward_batches": int(np.ceil((k + len(graph.logit_targets)) / 32)),
            "reprune_s": reprune_s,
            "view_with_scores_s": view_s,
            "conservation_max_rel_error": error,
            "nodes_kept": len(view.nodes),
            "links_kept": len(view.links),
            "json_bytes": len(exported),
            "scores": view.metadata["scores"],
        }
    influence = prune(attribution_graph(handle, FRANCE, " Paris", max_nodes=200)).influence
    graph = attribution_graph(handle, FRANCE, " Paris", max_nodes=200)
    out["france_embedding_influence"] = {
        t: float(influence[graph.embed_slice.start + i]) for i, t in enumerate(graph.tokens)
    }
    return out


def section_graph_vs_brute() -> dict:
    """Our batched-backward edges vs one perturbed replay per source, on a tiny model."""
    import numpy as np
    import torch

    from backend.graphs.attribution import attribution_graph
    from backend.runtime.linearize import linear_forward, record_frozen
    from tests.tiny import tiny_handle

    handle = tiny_handle("llama")
    prompt = "When Mary and John went to the store, John gave a drink to Mary"
    ours_s, graph = timed(lambda: attribution_graph(handle, prompt, max_nodes=40, batch_size=16))

    def brute_force() -> np.ndarray:
        frozen = record_frozen(handle, torch.tensor([graph.token_ids]))
        clean = linear_forward(handle, frozen, direct=True)
        neurons = [v.detach() for v in clean.neuron_inputs]
        matrix = torch.full((len(graph.logit_targets), clean.logits.shape[-1]), -1.0 / clean.logits.shape[-1])
        for t, info in enumerate(graph.logit_targets):
            matrix[t, info["id"]] += 1.0

        def rows(run):
            values = [run.neurons[l][0, p, i] for l, p, i in graph.features]
            return torch.cat([torch.stack(values), run.logits[0] @ matrix.T]).detach().numpy()

        base = rows(clean)
        columns = []
        with torch.no_grad():
            for layer, pos, idx in graph.features:
                changed = [v.clone() for v in neurons]
                changed[layer][0, pos, idx] = 0.0
                columns.append(base - rows(linear_forward(handle, frozen, direct=True, neuron_values=changed)))
        return np.stack(columns, axis=1)

    brute_s, brute = timed(brute_force)
    rows = list(range(graph.n_features)) + list(range(graph.logit_slice.start, graph.n_nodes))
    ours = graph.adjacency[np.ix_(rows, range(graph.n_features))]
    return {"model": "tiny llama (3 layers, d=32)", "sources": graph.n_features, "ours_s": ours_s,
            "brute_force_neuron_columns_s": brute_s, "brute_over_ours": brute_s / ours_s,
            "max_abs_difference": float(np.abs(ours - brute).max())}


def section_patching() -> dict:
    """Exact patching vs AtP vs RelP on the IOI pair, all sites, in one run."""
    from backend.runtime.models import get_model
    from backend.causal.patching import patching

    handle = get_model("smollm2")
    corrupt = "When Mary and John went to the store, Mary gave a drink to"
    result = patching(handle, IOI, corrupt, " Mary", " John")
    frozen = patching(handle, IOI, corrupt, " Mary", " John", methods=("relp",), freeze_attention=True)
    exact_grids = {site: result.grids[site]["exact"] for site in result.grids}
    from backend.causal.patching import pearson

    return {
        "pearson": result.pearson,
        "pearson_relp_frozen_attention": {s: pearson(frozen.grids[s]["relp"], exact_grids[s]) for s in exact_grids},
        "published_gpt2_small_ioi": PUBLISHED_GPT2_IOI,
        "seconds": result.seconds,
        "exact_over_atp": result.seconds["exact"] / result.seconds["atp"],
        "exact_over_relp": result.seconds["exact"] / result.seconds["relp"],
        "patched_forwards_exact": sum(len(g["exact"]) * len(g["exact"][0]) for g in result.grids.values()),
    }


def section_circuit() -> dict:
    """Component circuits on the IOI pair: EAP and EAP-IG scores vs exact single-edge patching
    (on a sample of edges: the top 20 and 20 random ones), and circuit faithfulness."""
    import numpy as np

    from backend.causal.circuit import circuit, faithfulness, ranked_edges, score_pair
    from backend.runtime.models import get_model
    from backend.causal.patching import pearson

    handle = get_model("smollm2")
    corrupt = "When Mary and John went to the store, Mary gave a drink to"
    eap_s, eap = timed(lambda: score_pair(handle, IOI, corrupt, " Mary", " John", "eap"))
    ig_s, ig = timed(lambda: score_pair(handle, IOI, corrupt, " Mary", " John", "eap-ig", steps=5))
    ranked = ranked_edges(eap, per_position=False)
    rng = np.random.default_rng(0)
    sample = np.concatenate([ranked[:20], ranked[rng.choice(np.arange(20, len(ranked)), 20, replace=False)]])
    start = time.perf_counter()
    exact = []
    for edge in sample:  # the metric with this one edge corrupted, minus the clean metric (1)
        others = ranked[(ranked[:, 0] != edge[0]) | (ranked[:, 1] != edge[1])]
        exact.append(faithfulness(handle, eap, others) - 1.0)
    per_edge_s = (time.perf_counter() - start) / len(sample)
    first_order = {name: [float(scored.scores[s, r].sum()) for s, r in sample] for name, scored in
                   (("eap", eap), ("eap_ig", ig))}
    # scores come from the cache here: this times the faithfulness curve and the random sets
    result_s, result = timed(lambda: circuit(handle, IOI, corrupt, " Mary", " John", method="eap", n_random=10))
    ig_ranked = ranked_edges(ig, per_position=False)
    return {
        "edges": len(ranked),
        "eap_scores_s": eap_s, "eap_ig5_scores_s": ig_s,
        "exact_single_edge_s": per_edge_s,
        "exact_all_edges_extrapolated_s": per_edge_s * len(ranked),
        "exact_over_eap_extrapolated": per_edge_s * len(ranked) / eap_s,
        "pearson_with_exact_40_edges": {name: pearson(values, exact) for name, values in first_order.items()},
        "curve_and_10_random_sets_s": result_s, "curve_points": len(result.curve),
        "top5pct_faithfulness": {"eap": result.faithfulness,
                                 "eap_ig5": faithfulness(handle, ig, ig_ranked[:len(result.circuit)]),
                                 "random_mean": float(np.mean(result.random_faithfulness)),
                                 "random_max": float(np.max(result.random_faithfulness))},
    }


def section_paths() -> dict:
    """NeuronPath on France -> Paris: search time and the paper's remove/enhance evaluation."""
    from backend.runtime.models import get_model
    from backend.causal.paths import neuron_path

    handle = get_model("smollm2")
    result = neuron_path(handle, FRANCE, " Paris")
    return {"search_s": result.timings["search_s"], "total_s": result.timings["total_s"],
            "passes": handle.adapter.n_layers, "rows_per_pass": result.settings["steps"],
            "jas": result.jas, "baseline_jas": result.baseline_jas, "evaluation": result.evaluation}


def section_transformer_lens() -> dict:
    """Another library doing the same work: TransformerLens 4 (TransformerBridge over the same
    HF model) activation patching of resid_pre on the IOI pair, against our exact grid."""
    import numpy as np
    import torch
    from importlib.metadata import version

    import transformer_lens.patching as tl_patching
    from transformer_lens.model_bridge import TransformerBridge

    from backend.runtime.models import get_model, load_uncached
    from backend.causal.patching import patching
    from backend.runtime.prompts import encode_prompt, resolve_token

    handle = get_model("smollm2")
    corrupt = "When Mary and John went to the store, Mary gave a drink to"
    separate = load_uncached("smollm2").model  # the bridge rewires the model it wraps: give it its own copy
    bridge = TransformerBridge.boot_transformers("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=separate,
                                                 tokenizer=handle.tokenizer)
    bridge.enable_compatibility_mode()
    clean_t = torch.tensor([encode_prompt(handle, IOI)])
    corrupt_t = torch.tensor([encode_prompt(handle, corrupt)])
    mary, john = resolve_token(handle, " Mary"), resolve_token(handle, " John")
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean_t)

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    tl_s, tl_grid = timed(lambda: tl_patching.get_act_patch_resid_pre(bridge, corrupt_t, clean_cache, metric))
    ours_s, ours = timed(lambda: patching(handle, IOI, corrupt, " Mary", " John", methods=("exact",),
                                          sites=("resid_pre",)))
    span = ours.metric["clean"] - ours.metric["corrupt"]
    tl_normalized = (tl_grid.detach().double().numpy() - ours.metric["corrupt"]) / span
    ours_grid = np.asarray(ours.grids["resid_pre"]["exact"], dtype=float)
    return {"library": f"transformer-lens {version('transformer-lens')}", "patched_runs": int(ours_grid.size),
            "transformer_lens_s": tl_s, "ours_exact_s": ours_s, "transformer_lens_over_ours": tl_s / ours_s,
            "max_abs_difference_normalized": float(np.abs(tl_normalized - ours_grid).max())}


# ---------------------------------------------------------------- driver


def run_child(name: str) -> dict:
    start = time.perf_counter()
    result = globals()[f"section_{name}"]()
    result["section_wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_mb()
    return result


def machine() -> dict:
    import torch

    from backend.runtime.config import torch_threads

    return {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads_default": torch_threads()}


def markdown(results: dict) -> str:
    lines = ["# Circuitscope benchmarks", "", f"Machine: `{json.dumps(results['machine'])}`", "",
             "| section | measure | value |", "|---|---|---|"]
    for section, values in results["sections"].items():
        for key, value in _flatten(values):
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {section} | {key} | {shown} |")
    return "\n".join(lines) + "\n"


def _flatten(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child)))
        return
    previous = args.out / "results.json"
    sections = json.loads(previous.read_text())["sections"] if previous.exists() else {}
    results = {"machine": machine(), "sections": sections}  # sections not re-run keep their last numbers
    failed: list[str] = []
    for name in args.sections.split(","):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        python = sys.executable
        if name == "transformer_lens":
            if not BENCH_PYTHON.exists():
                print("[bench] transformer_lens skipped: run `make bench-venv` first", file=sys.stderr)
                continue
            python = str(BENCH_PYTHON)
        proc = subprocess.run([python, __file__, "--child", name], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            failed.append(name)
            print(f"[bench] section {name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results["sections"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        args.out.mkdir(parents=True, exist_ok=True)  # written after each section: a failure keeps the rest
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    if failed:
        raise SystemExit(f"failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
