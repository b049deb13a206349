"""A model sharded by Accelerate (device_map="auto" with max_memory): layers split between
CPU memory and disk offload here (the only devices on these machines); every analysis gives
the same result as the unsharded model."""

import json

import numpy as np
import pytest

from backend.runtime.cache import clear_all
from backend.runtime.models import load_uncached
from tests.conftest import IOI_PROMPT
from tests.tiny import tiny_handle

CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def analyses(handle) -> dict:
    from backend.analyses.heatmaps import heatmap
    from backend.analyses.lens import logit_lens
    from backend.causal.circuit import circuit
    from backend.causal.interventions import intervene
    from backend.causal.patching import patching
    from backend.causal.paths import neuron_path
    from backend.graphs.attribution import attribution_graph
    from backend.graphs.edge_heads import edge_heads

    clear_all()
    graph = attribution_graph(handle, IOI_PROMPT, max_nodes=10)
    head_zero = {"interventions": [{"kind": "head", "layer": 1, "index": 0, "op": "zero"}], "continue_tokens": 2}
    return {
        "lens": logit_lens(handle, IOI_PROMPT).target_prob,
        "heatmap": heatmap(handle, IOI_PROMPT, "mlp_norm").values,
        "graph": np.asarray(graph.adjacency),
        "edge_heads": edge_heads(handle, graph, 0, graph.adjacency.shape[0] - 1).heads,
        "patching": patching(handle, IOI_PROMPT, CORRUPT, " Mary", " John", sites=("heads", "mlp_out")).grids,
        "circuit": circuit(handle, IOI_PROMPT, CORRUPT, " Mary", " John", method="eap-ig", steps=2,
                             n_random=1, curve_size=4).curve,
        "paths": neuron_path(handle, IOI_PROMPT, steps=3, n_random=2).path,
        "intervene": intervene(handle, IOI_PROMPT, head_zero).after,
    }


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_every_analysis_works_on_a_model_split_between_memory_and_disk(family, tmp_path, monkeypatch):
    tiny = tiny_handle(family)
    folder = tmp_path / "model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    monkeypatch.setenv("CIRCUITSCOPE_CACHE", str(tmp_path / "cache"))
    whole = load_uncached(str(folder))
    monkeypatch.setenv("CIRCUITSCOPE_DEVICE_MAP", "auto")
    monkeypatch.setenv("CIRCUITSCOPE_MAX_MEMORY", "cpu=115KB")  # the embedding and a layer; the rest to disk
    sharded = load_uncached(str(folder))
    placement = set(sharded.model.hf_device_map.values())
    assert placement == {"cpu", "disk"}, sharded.model.hf_device_map
    assert any(p.device.type == "meta" for p in sharded.model.parameters())  # really offloaded
    expected, got = analyses(whole), analyses(sharded)
    for name in expected:
        assert json.dumps(got[name], default=np.ndarray.tolist) == json.dumps(
            expected[name], default=np.ndarray.tolist
        ), name
