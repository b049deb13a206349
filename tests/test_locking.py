"""Every forward pass of every analysis runs under the model's lock (models.py's contract):
a hook on the decoder stack records any forward made without it, also on the controls'
re-initialized model. The concurrency test then shows that nothing interleaves badly."""

import pytest

from backend.analyses.heatmaps import cell_detail, heatmap
from backend.analyses.inspect_prompt import inspect_prompt
from backend.analyses.lens import logit_lens
from backend.analyses.neurons import neuron_view
from backend.causal.circuit import circuit, node_ablation, score_pair, suggest_tokens_scoring_eap
from backend.causal.controls import controls, dead_salmon
from backend.causal.interventions import intervene, neuron_items
from backend.causal.pairs import default_answer_wrong
from backend.causal.patching import patch_one, patching
from backend.causal.paths import neuron_path
from backend.graphs.attribution import attribution_graph
from backend.graphs.edge_heads import edge_heads
from backend.runtime.cache import clear_all
from tests.tiny import tiny_handle

PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def analyses(handle):
    graph = lambda: attribution_graph(handle, PROMPT, max_nodes=10)  # noqa: E731
    spec = {"interventions": neuron_items([(1, 5, 3), (2, 5, 7)], "zero"), "continue_tokens": 2}
    return {
        "inspect": lambda: inspect_prompt(handle, PROMPT, n_continue=2),
        "lens": lambda: logit_lens(handle, PROMPT),
        "heatmap": lambda: heatmap(handle, PROMPT, "mlp_norm"),
        "cell": lambda: cell_detail(handle, PROMPT, 2, 3),
        "neuron": lambda: neuron_view(handle, PROMPT, 1, 4),
        "graph": graph,
        "edge_heads": lambda: edge_heads(handle, graph(), 0, graph().n_nodes - 1),
        "patching": lambda: patching(handle, PROMPT, CORRUPT, " Mary", " John"),
        "patch_one": lambda: patch_one(handle, PROMPT, CORRUPT, " Mary", " John", "heads", 1, 1),
        "circuit": lambda: circuit(handle, PROMPT, CORRUPT, " Mary", " John", top_n=5, n_random=2, curve_size=3),
        "node_ablation": lambda: node_ablation(handle, score_pair(handle, PROMPT, CORRUPT, " Mary", " John"), [], "m1"),
        "paths": lambda: neuron_path(handle, PROMPT, steps=2, n_random=3),
        "intervene": lambda: intervene(handle, PROMPT, spec),
        "controls": lambda: controls(handle, PROMPT, spec, n_random=5),
        "pair tokens": lambda: default_answer_wrong(handle, PROMPT, CORRUPT),
        "pair tokens with EAP": lambda: suggest_tokens_scoring_eap(handle, PROMPT, CORRUPT, " Mary"),
    }


def watch(handle, unlocked: list, label: list) -> object:
    def check(module, args, kwargs=None):
        if not handle.lock._is_owned():
            unlocked.append(label[0])

    return handle.adapter.base.register_forward_pre_hook(check)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_analysis_runs_the_model_without_its_lock(family):
    handle = tiny_handle(family)
    salmon = dead_salmon(handle, 0)
    clear_all()
    unlocked: list[str] = []
    label = [""]
    removers = [watch(handle, unlocked, label), watch(salmon, unlocked, label)]
    try:
        for name, run in analyses(handle).items():
            label[0] = name
            run()
    finally:
        for remover in removers:
            remover.remove()
        clear_all()
    assert unlocked == []
