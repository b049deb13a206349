"""Eight clients at once on one shared model: every result equals the serial result, no hook
or intervention leaks into another request, caches stay within their bounds."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from backend.causal import circuit as circuit_module
from backend.runtime.cache import BoundedCache, clear_all, results_cache
from tests.conftest import FRANCE_PROMPT, IOI_PROMPT

CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def jobs(handle):
    """Eight different analyses, as eight clients would ask for them."""
    from backend.analyses.heatmaps import heatmap
    from backend.analyses.inspect_prompt import inspect_prompt
    from backend.analyses.lens import logit_lens
    from backend.causal.interventions import intervene
    from backend.causal.patching import patching
    from backend.graphs.attribution import attribution_graph

    zero_neurons = {"interventions": [{"kind": "neuron", "layer": 20, "index": i, "op": "zero"} for i in range(50)],
                    "continue_tokens": 3}
    scale_head = {"interventions": [{"kind": "head", "layer": 23, "index": 3, "op": "scale", "factor": 3.0}],
                  "continue_tokens": 3}
    return {
        "lens_france": lambda: logit_lens(handle, FRANCE_PROMPT, " Paris"),
        "lens_ioi": lambda: logit_lens(handle, IOI_PROMPT),
        "inspect": lambda: inspect_prompt(handle, "The Eiffel Tower is in the city of", n_continue=5),
        "heatmap": lambda: heatmap(handle, IOI_PROMPT, "attn_norm"),
        "intervene_neurons": lambda: intervene(handle, FRANCE_PROMPT, zero_neurons),
        "intervene_head": lambda: intervene(handle, IOI_PROMPT, scale_head),
        "patching": lambda: patching(handle, IOI_PROMPT, CORRUPT, " Mary", " John", methods=("atp", "relp"),
                                     sites=("heads",)),
        "graph": lambda: attribution_graph(handle, FRANCE_PROMPT, " Paris", max_nodes=20),
    }


def clear_caches():
    clear_all()


TIMINGS = {"seconds", "timings"}


def plain(result) -> dict:
    """A comparable view of any result: its JSON without wall-clock timings (graphs: the
    adjacency and node values)."""
    if hasattr(result, "adjacency"):
        return {"adjacency": np.asarray(result.adjacency).tolist(), "values": np.asarray(result.node_values).tolist()}
    return {k: v for k, v in json.loads(result.to_json()).items() if k not in TIMINGS}


def test_eight_concurrent_clients_get_the_serial_results(smollm2):
    work = jobs(smollm2)
    clear_caches()
    serial = {name: plain(job()) for name, job in work.items()}
    clear_caches()
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {name: pool.submit(job) for name, job in work.items()}
        concurrent = {name: plain(future.result(timeout=600)) for name, future in futures.items()}
    for name in work:
        assert concurrent[name] == serial[name], name
    leaked = [m for m in smollm2.model.modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    assert leaked == [] and not any(p.requires_grad for p in smollm2.model.parameters())
    assert serial["intervene_head"]["after"] != serial["intervene_head"]["before"]  # the intervention acted...
    assert serial["lens_ioi"]["top_predictions"][0]["token"] == " Mary"  # ...and left no trace in the others


def test_caches_are_bounded():
    cache = BoundedCache("test", max_entries=3)
    for i in range(100):
        cache.get_or_compute(i, lambda i=i: i * i)
    assert len(cache) == 3 and cache.get_or_compute(99, lambda: pytest.fail("evicted")) == 99 * 99
    assert results_cache.max_entries <= 64 and circuit_module.circuit_cache.max_entries <= 8


class Cancelled(Exception):
    """What Streamlit raises inside a running script when its user cancels (a rerun)."""


@pytest.mark.parametrize("analysis", ["graph", "circuit", "patching", "paths"])
def test_a_cancelled_analysis_leaves_the_model_clean(tiny_llama, analysis):
    import torch

    from backend.causal.circuit import circuit
    from backend.causal.patching import patching
    from backend.causal.paths import neuron_path
    from backend.graphs.attribution import attribution_graph

    calls = []

    def cancel_on_second_report(fraction, message):
        calls.append(message)
        if len(calls) == 2:
            raise Cancelled

    run = {
        "graph": lambda: attribution_graph(tiny_llama, IOI_PROMPT, max_nodes=30, progress=cancel_on_second_report),
        "circuit": lambda: circuit(tiny_llama, IOI_PROMPT, CORRUPT, " Mary", " John", method="eap-ig",
                                   progress=cancel_on_second_report),
        "patching": lambda: patching(tiny_llama, IOI_PROMPT, CORRUPT, " Mary", " John",
                                     progress=cancel_on_second_report),
        "paths": lambda: neuron_path(tiny_llama, IOI_PROMPT, steps=3, progress=cancel_on_second_report),
    }[analysis]
    ids = torch.tensor([tiny_llama.tokenizer(IOI_PROMPT)["input_ids"]])
    with torch.no_grad():
        before = tiny_llama.model(ids).logits
    clear_caches()
    with pytest.raises(Cancelled):
        run()
    assert not tiny_llama.lock._is_owned()
    assert [m for m in tiny_llama.model.modules() if m._forward_hooks or m._forward_pre_hooks] == []
    with torch.no_grad():
        assert torch.equal(tiny_llama.model(ids).logits, before)
    calls.clear()
    run_again = {"graph": lambda: attribution_graph(tiny_llama, IOI_PROMPT, max_nodes=30)}.get(analysis)
    if run_again:
        assert run_again().settings["max_nodes"] == 30  # nothing half-done was cached


@pytest.mark.parametrize("analysis, moment", [("graph", "Neuron rows"), ("patching", "exact"), ("paths", "Layer")])
def test_other_requests_are_served_during_a_long_analysis(tiny_llama, analysis, moment):
    """Long analyses hold the model's lock only for each pass (a graph not at all during its
    backward passes): another request completes in the middle of one (were the lock held
    throughout, it would wait for the end and this test would time out)."""
    import threading

    from backend.analyses.lens import logit_lens
    from backend.causal.patching import patching
    from backend.causal.paths import neuron_path
    from backend.graphs.attribution import attribution_graph

    clear_caches()
    served = threading.Event()

    def meanwhile(fraction, message):
        if message.startswith(moment) and not served.is_set():
            worker = threading.Thread(target=lambda: (logit_lens(tiny_llama, "a b c d"), served.set()))
            worker.start()
            worker.join(timeout=60)
            assert served.is_set(), "the lens request waited for the whole analysis"

    run = {
        "graph": lambda: attribution_graph(tiny_llama, IOI_PROMPT, max_nodes=20, progress=meanwhile),
        "patching": lambda: patching(tiny_llama, IOI_PROMPT, CORRUPT, " Mary", " John", batch_size=16,
                                     progress=meanwhile),
        "paths": lambda: neuron_path(tiny_llama, IOI_PROMPT, steps=3, n_random=2, progress=meanwhile),
    }[analysis]
    run()
    assert served.is_set()
