"""Every setting of every analysis, once: its keyword, URL key, default, bounds and CLI flag.

Pages seed their widgets from the URL with ``Setting.from_text`` and write them back with
``to_text``; the CLI builds its arguments from the same records (``add_arguments``); batch
runs and saved analyses keep *values* keyed by ``name``, never page URLs. A URL key means one
thing across the whole app (``tests/test_settings.py`` checks they are unique), except that
the clean/corrupted pair is deliberately shared by the patching and circuit pages.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _bool(text: str) -> bool:
    if text not in ("0", "1", "true", "false"):
        raise ValueError("expected 0 or 1")
    return text in ("1", "true")


def _csv(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


@dataclass(frozen=True)
class Setting:
    name: str  # the backend keyword argument (and the key of saved values)
    url: str  # the page's query-parameter key
    default: Any
    parse: Callable[[str], Any] = str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    help: str = ""
    cli: bool = True  # also a CLI flag (--name-with-dashes)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value):
        """The value if it is within bounds / among the choices, else ValueError."""
        if value is None:
            return value
        if self.choices is not None:
            values = value if isinstance(value, list) else [value]
            if any(v not in self.choices for v in values):
                raise ValueError(f"not one of {', '.join(map(str, self.choices))}")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise ValueError(f"outside {self.low}..{self.high}")
        return value

    def from_text(self, text: str):
        return self.check(self.parse(text))

    def to_text(self, value) -> str:
        if isinstance(value, bool):
            return "1" if value else ""
        if isinstance(value, list):
            return ",".join(map(str, value))
        return "" if value is None else str(value)


@dataclass(frozen=True)
class Group:
    """The settings of one analysis (or of the shared pair / sidebar)."""

    name: str
    settings: tuple[Setting, ...]

    def __getitem__(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)

    def defaults(self) -> dict:
        return {s.name: s.default for s in self.settings}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """One CLI flag per setting, with its default shown in --help."""
        for s in self.settings:
            if not s.cli:
                continue
            if s.parse is _bool:
                parser.add_argument(s.flag, action=argparse.BooleanOptionalAction, default=s.default, help=s.help)
            elif s.parse is _csv:
                parser.add_argument(s.flag, type=s.from_text, default=s.default, help=f"{s.help} (comma-separated)")
            else:
                parser.add_argument(s.flag, type=s.from_text, default=s.default, help=s.help,
                                    metavar=s.name.upper() if s.choices is None else None, choices=s.choices)

    def values(self, namespace: argparse.Namespace) -> dict:
        return {s.name: getattr(namespace, s.name) for s in self.settings if s.cli}


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: parse(text) if text else None


SIDEBAR = Group("sidebar", (
    Setting("model", "model", "smollm2", help="smollm2, gemma3-270m, a folder, a .gguf or a hub id"),
    Setting("prompt", "prompt", "When Mary and John went to the store, John gave a drink to", cli=False),
    Setting("target", "target", "", help="one token, e.g. ' Paris' (default: the top prediction)", cli=False),
    Setting("bos", "bos", "on", choices=("on", "off"),
            help="prepend the model's document-start token (e.g. <|endoftext|>) when its tokenizer adds none"),
))

GRAPH = Group("graph", (
    Setting("max_nodes", "k", 200, int, 0, 5000, help="neuron nodes K"),
    Setting("wrong", "gwrong", "", help="attribute logit(target) - logit(wrong)"),
    Setting("node_threshold", "nt", 0.8, float, 0.0, 1.0, help="keep the nodes reaching this share of influence"),
    Setting("edge_threshold", "et", 0.98, float, 0.0, 1.0, help="keep the edges reaching this share of influence"),
    Setting("other_inputs", "oin", True, _bool, help="'other neurons' nodes get incoming edges (exact under the "
            "linearization); off = circuit-tracer's error semantics (no inputs)"),
    Setting("transcoders", "tc", "", help="a transcoder set's folder (circuit-tracer's format): a graph over its "
            "features instead of the MLP neurons"),
))

PAIR = Group("pair", (
    Setting("corrupt", "corrupt", "", help="the corrupted prompt (same token length as the clean one)"),
    Setting("answer", "answer", "", help="the clean run's answer token, e.g. ' Mary'"),
    Setting("wrong", "wrong", "", help="the competing token, e.g. ' John'"),
    Setting("metric", "metric", "logit_diff", choices=("logit_diff", "logprob"),
            help="logit(answer) - logit(wrong), or log p(answer)"),
))

PATCHING = Group("patching", (
    Setting("methods", "methods", ["exact", "atp", "relp"], _csv, choices=("exact", "atp", "relp"),
            help="methods to run"),
    Setting("freeze_attention", "frozen", False, _bool, help="RelP with frozen attention patterns"),
))

CIRCUIT = Group("circuit", (
    Setting("method", "cmethod", "eap-ig", choices=("eap-ig", "eap"), help="edge scores"),
    Setting("steps", "csteps", 5, int, 1, 100, help="EAP-IG integration steps"),
    Setting("top_n", "cn", None, _optional(int), 0, 10**7, help="circuit size in edges (default: the top fraction)"),
    Setting("target_faithfulness", "ctarget", None, _optional(float), 0.0, 1.0,
            help="instead of top-n: the smallest N on the curve reaching this faithfulness"),
    Setting("top_fraction", "cfrac", 0.05, float, 1e-6, 1.0, help="default circuit size: this fraction of edges"),
    Setting("per_position", "cpos", False, _bool, help="edges per token position"),
    Setting("prune", "cprune", True, _bool, help="remove dangling edges as EAP-IG's apply_topn(prune=True)", cli=False),
    Setting("n_random", "crandom", 5, int, 0, 100, help="random edge sets of the same size"),
))

PATHS = Group("paths", (
    Setting("steps", "steps", 20, int, 1, 100, help="scaling steps m"),
    Setting("top_k", "topk", 1, int, 1, 10, help="neurons per layer"),
    Setting("position", "ppos", None, _optional(int), 0, 10**6, help="token position (default: the last)"),
))

INTERVENE = Group("intervene", (
    Setting("controls", "icontrols", 0, int, 0, 2000, help="also run N random-set and re-initialized controls"),
    Setting("null", "inull", "matched", choices=("matched", "plain"),
            help="random sets matched on activation magnitude (default) or drawn uniformly"),
))

HEATMAP = Group("heatmap", (
    Setting("quantity", "q", "target_prob", choices=("target_prob", "target_rank", "second_prob", "resid_norm",
                                                     "attn_norm", "mlp_norm", "neuron"), help="grid quantity"),
    Setting("second", "second", "", help="a second token whose probability is also tracked"),
))

# Page state that is not an analysis setting, listed so that its URL keys stay unique too.
UI_KEYS = {
    "page state": ("node", "pinned", "supernodes", "grouped", "labels", "saved", "present", "cell", "hl", "head", "nl",
                   "ni", "compare", "pcell", "cnode", "neuron", "others", "unit", "inc"),
}

GROUPS = (SIDEBAR, GRAPH, PAIR, PATCHING, CIRCUIT, PATHS, INTERVENE, HEATMAP)
