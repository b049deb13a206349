"""CLI: ``python -m backend <command> --model M --prompt TEXT [--target TOK] --out FILE``.

Each command writes the same JSON object the dashboard page uses. Bad input exits with
code 2 and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from backend.errors import OUT_OF_MEMORY, UserInputError, is_out_of_memory
from backend.runtime.models import DEFAULT_MODEL, ModelHandle, get_model


def _lens(handle: ModelHandle, args: argparse.Namespace):
    from backend.analyses.lens import logit_lens

    return logit_lens(handle, args.prompt, args.target, args.second)


def _inspect(handle: ModelHandle, args: argparse.Namespace):
    from backend.analyses.inspect_prompt import inspect_prompt

    return inspect_prompt(handle, args.prompt, args.target, n_continue=args.continue_tokens)


def _graph(handle: ModelHandle, args: argparse.Namespace):
    from backend.graphs.attribution import attribution_graph
    from backend.graphs.neuronpedia import to_graph_json, view_from_graph

    graph = attribution_graph(handle, args.prompt, args.target, wrong=args.wrong, max_nodes=args.max_nodes)
    return to_graph_json(view_from_graph(graph, args.node_threshold, args.edge_threshold))


def _heatmap(handle: ModelHandle, args: argparse.Namespace):
    from backend.analyses.heatmaps import heatmap

    neuron = None
    if args.neuron:
        try:
            layer, index = (int(part) for part in args.neuron.split(","))
        except ValueError as exc:
            raise UserInputError("--neuron takes LAYER,INDEX, e.g. 12,345.") from exc
        neuron = (layer, index)
    return heatmap(handle, args.prompt, args.quantity, args.target, args.second, neuron)


def _patch(handle: ModelHandle, args: argparse.Namespace):
    from backend.causal.patching import METHODS, patching

    methods = METHODS if args.method == "all" else (args.method,)
    return patching(handle, args.clean, args.corrupt, args.answer, args.wrong, methods=methods,
                    freeze_attention=args.freeze_attention)


def _circuit(handle: ModelHandle, args: argparse.Namespace):
    from backend.causal.circuit import circuit

    return circuit(handle, args.clean, args.corrupt, args.answer, args.wrong, method=args.method, steps=args.steps,
                   top_n=args.top_n, target_faithfulness=args.target_faithfulness, top_fraction=args.top_fraction,
                   per_position=args.per_position, n_random=args.random)


def _paths(handle: ModelHandle, args: argparse.Namespace):
    from backend.causal.paths import neuron_path

    return neuron_path(handle, args.prompt, args.target, position=args.position, steps=args.steps, top_k=args.top_k)


def _intervene(handle: ModelHandle, args: argparse.Namespace):
    from backend.causal.interventions import controls, intervene

    try:
        spec = json.loads(args.spec.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"Could not read the spec {args.spec}: {exc}") from exc
    if not isinstance(spec, dict):
        raise UserInputError("The spec must be a JSON object with a list 'interventions'.")
    if args.target:
        spec["target"] = args.target
    result = intervene(handle, args.prompt, spec).to_dict()
    if args.controls:
        result["controls"] = controls(handle, args.prompt, spec, n_random=args.controls).to_dict()
    return result


def _batch(handle: ModelHandle, args: argparse.Namespace):
    from tqdm import tqdm

    from backend.storage.batch import read_prompts, run_batch
    from backend.storage.store import Store

    prompts = read_prompts(args.prompts)
    analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
    bar = tqdm(total=len(prompts) * len(analyses), unit="analysis", file=sys.stderr)

    def progress(done: int, total: int, message: str) -> None:
        bar.n = done
        bar.set_description(message)
        bar.refresh()

    index = run_batch(handle, prompts, analyses, args.out, settings={"max_nodes": args.max_nodes, "steps": args.steps},
                      store=Store() if args.into_db else None, progress=progress)
    bar.close()
    failed = [e for e in index["items"] if e["status"] == "error"]
    for entry in failed:
        print(f"item {entry['index']} ({entry['analysis']}): {entry['error']}", file=sys.stderr)
    if failed:
        raise UserInputError(f"{len(failed)} of {len(index['items'])} analyses failed (see {args.out / 'index.json'}).")
    return None


COMMANDS: dict[str, tuple[str, Callable]] = {
    "lens": ("logit lens: top token and target probability per layer and position", _lens),
    "heatmap": ("one layer x position grid (--quantity), from one cached forward pass", _heatmap),
    "graph": ("neuron-level attribution graph, circuit-tracer / Neuronpedia JSON", _graph),
    "paths": ("influential neuron path (NeuronPath) with baselines and remove/enhance evaluation", _paths),
    "intervene": ("ablate / scale / steer neurons, heads or residual directions; before and after", _intervene),
    "patch": ("exact activation patching, AtP and RelP over resid_pre/attn_out/mlp_out/heads", _patch),
    "circuit": ("component circuit (heads, MLPs) by EAP / EAP-IG with measured faithfulness", _circuit),
    "inspect": ("tokens, top-20 next tokens, target probability/rank, greedy continuation", _inspect),
    "batch": ("many prompts x analyses: one JSON each + index.json, resumable, optionally into the gallery", _batch),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description="Circuitscope analyses as JSON.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--model", default=DEFAULT_MODEL, help="smollm2, gemma3-270m, a folder, a .gguf or a hub id")
        if name == "batch":
            cmd.add_argument("--out", required=True, type=Path, help="folder for the JSON files and index.json")
            cmd.add_argument("--prompts", required=True, type=Path,
                             help='one prompt per line, or JSON lines {"prompt": ..., "target": ...}')
            cmd.add_argument("--analyses", default="graph,paths,lens", help="comma-separated: lens,inspect,graph,paths")
            cmd.add_argument("--into-db", action="store_true", help="also save each result in the gallery database")
            cmd.add_argument("--max-nodes", type=int, default=200, help="graph: neuron nodes K (default 200)")
            cmd.add_argument("--steps", type=int, default=20, help="paths: scaling steps m (default 20)")
            continue
        cmd.add_argument("--out", required=True, type=Path, help="JSON file to write ('-' for stdout)")
        if name in ("patch", "circuit"):
            cmd.add_argument("--clean", required=True)
            cmd.add_argument("--corrupt", required=True, help="same token length as --clean")
            cmd.add_argument("--answer", required=True, help="the clean run's answer token, e.g. ' Mary'")
            cmd.add_argument("--wrong", required=True, help="the competing token, e.g. ' John'")
        if name == "patch":
            cmd.add_argument("--method", default="all", choices=("exact", "atp", "relp", "all"))
            cmd.add_argument("--freeze-attention", action="store_true", help="RelP with frozen attention patterns")
            continue
        if name == "circuit":
            cmd.add_argument("--method", default="eap", choices=("eap", "eap-ig"))
            cmd.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps (default 5)")
            cmd.add_argument("--top-n", type=int, default=None, help="circuit size in edges")
            cmd.add_argument("--target-faithfulness", type=float, default=None,
                             help="instead of --top-n: the smallest N on the curve reaching this faithfulness")
            cmd.add_argument("--top-fraction", type=float, default=0.05, help="default size: this fraction of edges")
            cmd.add_argument("--per-position", action="store_true", help="edges per token position")
            cmd.add_argument("--random", type=int, default=5, help="random edge sets of the same size to compare")
            continue
        cmd.add_argument("--prompt", required=True)
        cmd.add_argument("--target", default=None, help="one token, e.g. ' Paris' (default: the top prediction)")
        if name in ("lens", "heatmap"):
            cmd.add_argument("--second", default=None, help="a second token whose probability is also tracked")
        if name == "heatmap":
            from backend.analyses.heatmaps import QUANTITIES

            cmd.add_argument("--quantity", required=True, choices=QUANTITIES)
            cmd.add_argument("--neuron", default=None, help="LAYER,INDEX for --quantity neuron")
        if name == "graph":
            cmd.add_argument("--max-nodes", type=int, default=200, help="neuron nodes K (default 200)")
            cmd.add_argument("--wrong", default=None, help="attribute logit(target) - logit(wrong)")
            cmd.add_argument("--node-threshold", type=float, default=0.8)
            cmd.add_argument("--edge-threshold", type=float, default=0.98)
        if name == "paths":
            cmd.add_argument("--steps", type=int, default=20, help="scaling steps m (default 20)")
            cmd.add_argument("--top-k", type=int, default=1, help="neurons per layer (default 1)")
            cmd.add_argument("--position", type=int, default=None, help="token position (default: the last)")
        if name == "intervene":
            cmd.add_argument("--spec", required=True, type=Path, help="JSON spec (see backend/interventions.py)")
            cmd.add_argument("--controls", type=int, default=0, help="also run N random-set and re-initialized controls")
        if name == "inspect":
            cmd.add_argument("--continue-tokens", type=int, default=10, help="greedy continuation length")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        handle = get_model(args.model)
        result = COMMANDS[args.command][1](handle, args)
        if result is None:
            return 0
        text = json.dumps(result) if isinstance(result, dict) else result.to_json()
        if str(args.out) == "-":
            sys.stdout.write(text + "\n")
        else:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        print(f"error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
