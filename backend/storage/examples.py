"""Worked examples for the gallery, computed by the product itself on a model (never
hand-written numbers): the IOI circuit with its faithfulness and random control, the
France -> Paris graph with supernodes chosen by rule, induction on a repeated random token
sequence (a circuit whose heads are labelled by their measured attention), and an IOI
patching grid.

Each is saved in the gallery with ``source = "example:{name}:{model}"`` (a rebuild replaces
it), its notes state what was measured, and its settings are setting *values* (the gallery
turns them into the page's link), so it reopens drawn as saved or live. ``make examples``
builds them; the app builds the missing ones in the background on its first start.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import numpy as np

from backend.runtime.models import ModelHandle, get_model
from backend.runtime.prompts import encode_prompt, token_text, with_bos
from backend.storage.store import Store

IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
FRANCE = "The capital of France is"
NAMES = ("ioi-circuit", "france-graph", "induction-circuit", "ioi-patching")
Report = Callable[[int, int, str], None]

status = {"state": "idle", "done": 0, "total": len(NAMES), "message": ""}  # the background build, for pages
_build_lock = threading.Lock()


def source(name: str, model: str) -> str:
    return f"example:{name}:{model}"


def missing(store: Store, model: str) -> list[str]:
    present = store.sources("example:")
    return [name for name in NAMES if source(name, model) not in present]


# ---------------------------------------------------------------- the examples


def _ioi_circuit(handle: ModelHandle, store: Store) -> int:
    from backend.causal.circuit import circuit

    result = circuit(handle, with_bos(handle, IOI), with_bos(handle, IOI_CORRUPT), " Mary", " John", n_random=10)
    into_logits = [e for e in result.circuit if e["target"] == "logits"][:3]
    movers = ", ".join(e["source"] for e in into_logits)
    notes = (
        f"EAP-IG ({result.settings['steps']} steps), the top {result.settings['top_n']} of {result.n_edges} edges "
        f"pruned of dangling ones to {len(result.circuit)}. Measured faithfulness {result.faithfulness:.3f} "
        f"({'normalized' if result.metric['normalized'] else 'raw change, not normalized'}; denominator "
        f"{result.metric['denominator']:+.2f} nats); {len(result.random_faithfulness)} random sets of "
        f"the same size: mean {np.mean(result.random_faithfulness):.3f}. Strongest edges into the logits come from "
        f"{movers}."
    )
    return store.save(
        "circuit",
        "Example: the IOI circuit (EAP-IG) against random edge sets",
        handle.name,
        IOI,
        result.to_json(),
        notes=notes,
        source=source("ioi-circuit", handle.name),
        settings={"page": "circuit", "values": {"corrupt": IOI_CORRUPT, "answer": " Mary", "wrong": " John"}},
    )


def _one_token(handle: ModelHandle, text: str) -> str | None:
    """``text`` when it is one token of this model's vocabulary (else the top prediction is used)."""
    from backend.errors import UserInputError
    from backend.runtime.prompts import resolve_token

    try:
        resolve_token(handle, text)
    except UserInputError:
        return None
    return text


def _france_graph(handle: ModelHandle, store: Store) -> int:
    from backend.graphs.attribution import attribution_graph
    from backend.graphs.neuronpedia import to_graph_json, view_from_graph

    target = _one_token(handle, " Paris")
    graph = attribution_graph(handle, with_bos(handle, FRANCE), target, max_nodes=200)
    view = view_from_graph(graph)
    neurons = [n for n in view.nodes if n.kind == "neuron"]
    paris = view.nodes[[n.kind for n in view.nodes].index("logit")].node_id
    direct = {l["source"]: abs(l["weight"]) for l in view.links if l["target"] == paris}
    says = sorted((n for n in neurons if n.node_id in direct), key=lambda n: -direct[n.node_id])[:5]
    answer = graph.logit_targets[0]["token"].strip()
    groups = [[f"says {answer} (strongest direct edges to the logit)", *(n.node_id for n in says)]]
    for pos in range(1, graph.n_pos - 1):
        here = sorted((n for n in neurons if n.ctx_idx == pos and n not in says),
                      key=lambda n: n.influence if n.influence is not None else 1.0)[:5]
        if len(here) >= 2:
            groups.append([f"{graph.tokens[pos].strip()} position neurons", *(n.node_id for n in here)])
    exported = to_graph_json(view, supernodes=groups)
    contributions = {graph.tokens[p]: graph.embed_contributions[p] for p in range(1, graph.n_pos - 1)}
    subject = max(contributions, key=lambda token: contributions[token])
    notes = (
        f"K = 200 neurons chosen by influence as circuit-tracer chooses features; replacement "
        f"{view.metadata['scores']['replacement']:.3f}, completeness {view.metadata['scores']['completeness']:.3f}. "
        f"Supernodes are chosen by rule: the 5 neurons with the strongest direct edges into {answer!r}, and the 5 most "
        f"influential neurons at each context position. The context token contributing most to the logit: "
        f"{subject!r} ({contributions[subject]:+.2f})."
    )
    return store.save("graph", f"Example: France -> {answer}, neuron graph with supernodes", handle.name, FRANCE,
                      json.dumps(exported), notes=notes, supernodes=groups, source=source("france-graph", handle.name),
                      settings={"page": "graph", "target": target or "", "values": {"max_nodes": 200},
                                "supernodes": groups, "grouped": True})


def induction_words(handle: ModelHandle, n: int, seed: int = 0) -> list[str]:
    """``n`` + 1 distinct random words of the vocabulary, each one token (" word"), lowercase
    letters (at least three when the vocabulary has enough, else any)."""
    from backend.errors import UserInputError

    texts = [token_text(handle, i) for i in range(handle.vocab_size)]
    words = sorted({t for t in texts if t.startswith(" ") and t[1:].isalpha() and t[1:].islower()})
    long_words = [w for w in words if len(w) > 3]
    pool = long_words if len(long_words) > n else words
    if len(pool) <= n:
        raise UserInputError(
            f"The vocabulary has only {len(pool)} one-token words; the induction example needs {n + 1}."
        )
    chosen = np.random.default_rng(seed).choice(len(pool), n + 1, replace=False)
    return [pool[i] for i in chosen]


def induction_pair(handle: ModelHandle, n: int = 8, seed: int = 0) -> tuple[str, str, str, str]:
    """A random word sequence seen once, then repeated up to its last word (clean: the
    answer is that word); the corrupted prompt changes the last word of the first copy."""
    words = induction_words(handle, n, seed)
    body, other = words[:n], words[n]
    clean = "".join(body) + "".join(body[:-1])
    corrupt = "".join(body[:-1] + [other]) + "".join(body[:-1])
    return clean, corrupt, body[-1], other


def head_scores(handle: ModelHandle, text: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per head [L, H]: mean attention to the previous token, and to the token after the
    earlier copy of the current token (induction), over the repeated half."""
    from backend.analyses.neurons import cached_trace

    patterns = cached_trace(handle, text).patterns  # [L, H, P, P]
    assert patterns is not None  # cached traces keep them
    offset = len(encode_prompt(handle, text)) - (2 * n - 1)  # a document-start token, if any
    second = range(offset + n, offset + 2 * n - 1)
    previous = np.mean([patterns[:, :, q, q - 1] for q in second], axis=0)
    induction = np.mean([patterns[:, :, q, q - n + 1] for q in second], axis=0)
    return previous, induction


def _induction_circuit(handle: ModelHandle, store: Store) -> int:
    from backend.causal.circuit import circuit

    n = 8
    clean, corrupt, answer, wrong = induction_pair(handle, n)
    result = circuit(handle, with_bos(handle, clean), with_bos(handle, corrupt), answer, wrong, n_random=5)
    previous, induction = head_scores(handle, with_bos(handle, clean), n)
    in_circuit = {e[end] for e in result.circuit for end in ("source", "target")}
    labels = {}
    for name, scores, title in (("previous-token head", previous, "prev"), ("induction head", induction, "ind")):
        order = np.dstack(np.unravel_index(np.argsort(-scores, axis=None), scores.shape))[0]
        for layer, head in order[:4]:
            node = f"a{layer}.h{head}"
            if scores[layer, head] > 0.3:
                labels[node] = f"{name} ({title} {scores[layer, head]:.2f})"
    shown = ", ".join(f"{node} = {label}" for node, label in labels.items() if node in in_circuit) or "none"
    notes = (f"Random words seen once, then repeated: the model should continue with {answer!r}; the corrupted prompt "
             f"changes that word's first occurrence to {wrong!r}. EAP-IG circuit of {len(result.circuit)} edges, "
             f"faithfulness {result.faithfulness:.3f}. Heads labelled by their measured attention on the clean prompt "
             f"(mean over the repeated half): previous-token score = attention to the previous token, induction score "
             f"= attention to the token after the earlier copy. In the circuit: {shown}.")
    return store.save("circuit", "Example: induction on a repeated random word sequence", handle.name, clean,
                      result.to_json(), notes=notes, labels=labels, source=source("induction-circuit", handle.name),
                      settings={"page": "circuit", "labels": labels,
                                "values": {"corrupt": corrupt, "answer": answer, "wrong": wrong}})


def _ioi_patching(handle: ModelHandle, store: Store) -> int:
    from backend.causal.patching import patching

    result = patching(handle, with_bos(handle, IOI), with_bos(handle, IOI_CORRUPT), " Mary", " John",
                      sites=("resid_pre", "heads"))
    r = result.pearson
    notes = (
        f"Exact activation patching (denoising) of the residual stream and of every head, with AtP and RelP "
        f"beside it. Pearson r with the exact grid, AtP / RelP: residual {r['resid_pre']['atp']:.3f} / "
        f"{r['resid_pre']['relp']:.3f}, heads {r['heads']['atp']:.3f} / {r['heads']['relp']:.3f}. Exact "
        f"{result.seconds['exact']:.1f} s, AtP {result.seconds['atp']:.2f} s, RelP {result.seconds['relp']:.2f} s."
    )
    return store.save("patching", "Example: IOI activation patching vs AtP and RelP", handle.name, IOI,
                      result.to_json(), notes=notes, source=source("ioi-patching", handle.name),
                      settings={"page": "patching", "values": {"corrupt": IOI_CORRUPT, "answer": " Mary",
                                                               "wrong": " John"}})


BUILDERS = {"ioi-circuit": _ioi_circuit, "france-graph": _france_graph, "induction-circuit": _induction_circuit,
            "ioi-patching": _ioi_patching}


def build_examples(handle: ModelHandle, store: Store, names: list[str] | None = None,
                   progress: Report | None = None) -> list[int]:
    """Compute and save the examples (all of ``NAMES`` by default); returns their ids."""
    names = list(names or NAMES)
    ids = []
    for k, name in enumerate(names):
        if progress:
            progress(k, len(names), f"example {k + 1}/{len(names)}: {name}")
        ids.append(BUILDERS[name](handle, store))
    if progress:
        progress(len(names), len(names), "examples ready")
    return ids


def build_missing_in_background(model: str, store: Store) -> bool:
    """Start one background thread per process building the examples this gallery lacks;
    False when nothing is missing or a build is already running."""
    with _build_lock:
        if status["state"] == "building" or not missing(store, model):
            return False
        status.update(state="building", done=0, message="starting")

    def run() -> None:
        try:
            todo = missing(store, model)
            status["total"] = len(todo)

            def report(done: int, total: int, message: str) -> None:
                status.update(done=done, total=total, message=message)

            build_examples(get_model(model), store, todo, report)
            status.update(state="done", message="examples ready")
        except Exception as exc:  # the app keeps serving; the Start page shows what went wrong
            status.update(state="failed", message=f"{type(exc).__name__}: {exc}")

    threading.Thread(target=run, name="circuitscope-examples", daemon=True).start()
    return True
