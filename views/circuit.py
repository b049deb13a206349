"""Circuit page: component attribution graph (EAP-IG by default) for a clean/corrupted pair.
The scores and the top edges appear first; the measured faithfulness curve and the random
sets follow. Node details with a one-click ablation."""

import streamlit as st

from backend.analyses.heatmaps import attention_pattern
from backend.causal.circuit import (
    CircuitResult,
    cached_circuit,
    component_nodes,
    is_scored,
    node_ablation,
    score_pair,
    suggest_tokens_scoring_eap,
    top_edges,
)
from backend.settings import CIRCUIT
from components.circuit_view import circuit_figure, faithfulness_curve
from components.graph_view import selected_node_id
from components.heatmap import pattern_figure
from views.common import (
    chart,
    current,
    figure_frame,
    follow_click,
    opened,
    run_with_progress,
    set_url_state,
    setting_state,
    show_user_errors,
    url_state,
    why_attend_link,
    write_setting,
    write_url,
)
from views.intervene_panel import intervene_panel
from views.pair_inputs import pair_inputs, scale_caption, show_scale, tokens_pending
from views.save_panel import node_labels, save_panel

NAMES = {"eap": "EAP", "eap-ig": "EAP-IG"}

st.title("Circuit (heads and MLPs)")
st.caption("Edge score = (corrupted − clean sender output) · gradient of the metric at the receiver's input, averaged "
           "from the corrupted to the clean input (EAP-IG; EAP takes the clean point only). Faithfulness is measured "
           "by patching every edge outside the circuit to its corrupted value.")
selection, handle = current()

pair_box = st.container()  # filled below: on a new prompt the graph's frame is drawn first
for setting in CIRCUIT.settings:
    setting_state(setting)
for key in ("url_cn", "url_ctarget"):  # the widgets show "unset" as 0
    if st.session_state[key] is None:
        st.session_state[key] = 0
selected: str = url_state("cnode", "")

cols = st.columns(6)
cols[0].selectbox("Method", CIRCUIT["method"].choices, format_func=NAMES.get, key="url_cmethod")
cols[1].number_input("EAP-IG steps", 1, 100, key="url_csteps", disabled=st.session_state.url_cmethod == "eap")
cols[2].number_input("Circuit size N (edges; 0 = top 5%)", 0, 10**7, step=50, key="url_cn")
cols[3].number_input("…or smallest N reaching faithfulness (0 = off)", 0.0, 1.0, step=0.05, key="url_ctarget")
cols[4].toggle("Edges per position", key="url_cpos")
cols[5].toggle("Prune dangling edges", key="url_cprune", help="As EAP-IG's apply_topn(prune=True): components "
               "without an incoming or an outgoing circuit edge are removed with their edges, repeatedly.")
for setting in CIRCUIT.settings:
    if setting.name in ("top_n", "target_faithfulness"):
        write_url(setting.url, st.session_state[f"url_{setting.url}"] or "")
    else:
        write_setting(setting)

adapter = handle.adapter
left, right = st.columns([3, 2])


def draw_circuit(nodes, edges, where, key="circuit_chart"):
    drawn = edges[:600]
    if len(edges) > len(drawn):
        where.caption(f"Drawing the strongest {len(drawn)} of the circuit's {len(edges)} edges.")
    figure = circuit_figure(nodes, drawn, adapter.n_layers, adapter.n_heads, selected=selected or None,
                            labels=node_labels())
    return chart(figure, key, where=where, export=f"Circuit: {selection.prompt} ({pair.answer!r} vs {pair.wrong!r})",
                 on_select="rerun", selection_mode="points")


def preview_size(scored) -> int:
    return settings["top_n"] or max(1, round(settings["top_fraction"] * int(scored.allowed.sum())))


def show_eap_first(where) -> None:
    """EAP (one gradient, at the clean input) drawn while EAP-IG integrates: a first answer
    in about a second; it is cached, so switching the method to EAP later is instant."""
    eap = show_user_errors(score_pair, handle, pair.clean, pair.corrupt, pair.answer, pair.wrong, "eap", 1,
                           pair.metric)
    if eap is None:
        return
    with where.container():
        nodes, edges = top_edges(handle, eap, preview_size(eap), settings["per_position"], settings["prune"])
        st.info(f"First look: the top {preview_size(eap)} edges by EAP (one gradient, {eap.seconds:.1f} s). "
                f"EAP-IG with {settings['steps']} steps is being computed and will replace it.")
        draw_circuit(nodes, edges, st, key="circuit_eap_first")


def suggest_scoring_eap(handle, clean: str, corrupt: str, answer: str | None):
    """The pair's suggested tokens, with EAP's first look scored by the same two runs."""
    metric = st.session_state.get("url_metric") or "logit_diff"
    return suggest_tokens_scoring_eap(handle, clean, corrupt, answer, metric)


def draw_frame(where) -> None:
    """The graph's frame (its nodes, no edges) while the first scores are computed."""
    frame = circuit_figure(component_nodes(handle), [], adapter.n_layers, adapter.n_heads)
    figure_frame(frame.update_layout(title="Scoring edges…"), "circuit", where=where)


saved = opened("circuit")
first_look = st.empty()
# a new prompt's pair tokens come from EAP's runs (~1 s): the frame first, so the browser
# loads and runs Plotly meanwhile
framed = saved is None and tokens_pending(handle, selection)
if framed:
    draw_frame(first_look)
with pair_box:
    pair = pair_inputs(handle, selection, "circuit", suggest=suggest_scoring_eap)
settings = {"method": st.session_state.url_cmethod, "steps": int(st.session_state.url_csteps),
            "top_n": int(st.session_state.url_cn) if st.session_state.url_cn else None,
            "target_faithfulness": float(st.session_state.url_ctarget) if st.session_state.url_ctarget else None,
            "top_fraction": float(st.session_state.url_cfrac), "per_position": bool(st.session_state.url_cpos),
            "prune": bool(st.session_state.url_cprune), "n_random": int(st.session_state.url_crandom),
            "metric": pair.metric}
if settings["top_n"] is not None:
    settings["target_faithfulness"] = None
if saved is not None:
    result = CircuitResult.from_json(saved.result)
else:

    def scored_already(method: str) -> bool:
        return is_scored(handle, pair.clean, pair.corrupt, pair.answer, pair.wrong, method, settings["steps"],
                         pair.metric)

    if not scored_already(settings["method"]):
        if not framed and not scored_already("eap"):  # nothing to draw for a second or more
            draw_frame(first_look)
        if settings["method"] == "eap-ig":
            show_eap_first(first_look)
    scored = run_with_progress(score_pair, handle, pair.clean, pair.corrupt, pair.answer, pair.wrong,
                               settings["method"], settings["steps"], pair.metric, label="Scoring edges",
                               key="circuit_scores")
    if scored is None:
        first_look.empty()
        st.stop()
    first_look.empty()
    preview = st.empty()
    with preview.container():
        n_preview = preview_size(scored)
        nodes, edges = top_edges(handle, scored, n_preview, settings["per_position"], settings["prune"])
        st.info(f"{NAMES[settings['method']]} scores ready ({scored.seconds:.1f} s): the top {n_preview} edges are "
                "drawn; measuring their faithfulness and the random sets now.")
        draw_circuit(nodes, edges, st, key="circuit_preview")
        result = run_with_progress(cached_circuit, handle, pair.clean, pair.corrupt, pair.answer, pair.wrong,
                                   **settings, label="Measuring faithfulness", key="circuit")
    if result is None:
        st.stop()
    preview.empty()

show_scale(result.metric)
n_chosen = len(result.circuit)
random_mean = sum(result.random_faithfulness) / max(len(result.random_faithfulness), 1)
facts = st.columns(3)
facts[0].metric("Circuit edges", f"{n_chosen}")
facts[1].metric("Faithfulness", f"{result.faithfulness:.3f}")
facts[2].metric("Random sets", f"{random_mean:.3f}".replace("-0.000", "0.000"))
if result.faithfulness_note:
    st.warning(result.faithfulness_note)
pruned_from = result.settings.get("top_n")
st.caption(
    f"{n_chosen} of {result.n_edges} edges ({100 * n_chosen / result.n_edges:.1f}%) by {NAMES[result.method]}"
    + (f", the top {pruned_from} pruned of dangling edges" if result.settings.get("prune") else "")
    + f"; faithfulness {scale_caption(result.metric)}, measured by patching the other edges; random sets: mean of "
    f"{len(result.random_faithfulness)} random sets of {n_chosen} edges. "
    f"Computed in {sum(result.seconds.values()):.1f} s."
)

with left:
    event = draw_circuit(result.nodes, result.circuit, st)
    follow_click(selected_node_id(event), "cnode")
    st.caption("Blue: corrupting the edge lowers the metric (it carries the behaviour); red: it raises it. "
               "Width grows with |score|; large markers are the circuit's nodes.")
    chart(faithfulness_curve(result.curve, n_chosen, result.random_faithfulness), "circuit_curve",
          export=f"Faithfulness curve: {selection.prompt}")


def select(name: str) -> None:
    set_url_state("cnode", name)


def edge_list(name: str, direction: str) -> None:
    end, other = ("target", "source") if direction == "in" else ("source", "target")
    for i, edge in enumerate([e for e in result.circuit if e[end] == name][:8]):
        arrow = "←" if direction == "in" else "→"
        where = f" @{edge['position']}" if "position" in edge else ""
        st.button(f"{arrow} {edge[other]}{where}   ({edge['score']:+.3g})", key=f"cedge_{direction}_{i}",
                  on_click=select, args=(edge[other],))


with right:
    node = next((n for n in result.nodes if n["name"] == selected), None)
    if node is None:
        st.info("Click a head or an MLP in the graph: its attention pattern, direct effect on the logits, "
                "and a one-click ablation.")
    else:
        st.subheader(node["name"])
        direct = result.direct_logit.get(node["name"])
        if direct:
            st.caption("Direct effect on the logits (its output at the last position through the frozen final norm)")
            cols = st.columns(3)
            cols[0].metric(result.answer, f"{direct['answer']:+.3f}")
            if "wrong" in direct:
                cols[1].metric(result.wrong, f"{direct['wrong']:+.3f}")
                cols[2].metric("difference", f"{direct['answer'] - direct['wrong']:+.3f}")
        ablation_key = (node["name"], result.clean, result.corrupt, result.answer, result.wrong, repr(settings))
        if node["kind"] != "logits" and st.button("Ablate (corrupt this node's output)", key="circuit_ablate"):
            st.session_state.circuit_ablation = ablation_key
        if st.session_state.get("circuit_ablation") == ablation_key:
            scored = score_pair(handle, result.clean, result.corrupt, result.answer, result.wrong, result.method,
                                result.settings["steps"], result.metric.get("kind", "logit_diff"))
            effect = show_user_errors(node_ablation, handle, scored, result.circuit, node["name"])
            if effect is not None:
                full = 1.0 if result.metric["normalized"] else result.metric["denominator"]
                cols = st.columns(2)
                cols[0].metric(
                    "Model metric", f"{effect['model']:.3f}", f"{effect['model'] - full:+.3f} from {full:.3f}"
                )
                cols[1].metric("Circuit metric", f"{effect['circuit']:.3f}",
                               f"{effect['circuit'] - result.faithfulness:+.3f} from {result.faithfulness:.3f}")
        st.markdown("**Circuit edges in**")
        edge_list(node["name"], "in")
        st.markdown("**Circuit edges out**")
        edge_list(node["name"], "out")
        if node["kind"] == "head":
            pattern = show_user_errors(attention_pattern, handle, result.clean, node["layer"])
            if pattern is not None:
                st.plotly_chart(pattern_figure(pattern[node["head"]], result.tokens,
                                               f"{node['name']} attention on the clean prompt"), key="circuit_pattern",
                                theme=None)
                why_attend_link(handle, result.clean, node["layer"], node["head"])
            intervene_panel(handle, result.clean, result.answer, [{"kind": "head", "layer": node["layer"],
                                                                   "index": node["head"], "positions": None}],
                            "circuit_intervene", extra={"corrupt_prompt": result.corrupt, "wrong": result.wrong})

save_panel("circuit", f"Circuit: {selection.prompt[:80]}", result.to_json)
st.download_button("Download the circuit JSON", result.to_json, file_name="circuit.json", mime="application/json")
