"""Circuit page: component attribution graph (EAP / EAP-IG) for a clean/corrupted pair, the
top-N circuit with its measured faithfulness, and node details with a one-click ablation."""

import streamlit as st

from backend.causal.circuit import METHODS, CircuitResult, cached_circuit, node_ablation, score_pair
from backend.analyses.heatmaps import attention_pattern
from components.circuit_view import circuit_figure, faithfulness_curve
from components.graph_view import selected_node_id
from components.heatmap import pattern_figure
from views.common import (chart, current, follow_click, in_range, opened, run_with_progress, set_url_state,
                          show_user_errors, url_state, write_url)
from views.intervene_panel import intervene_panel
from views.pair_inputs import pair_inputs
from views.save_panel import node_labels, save_panel

NAMES = {"eap": "EAP", "eap-ig": "EAP-IG"}

st.title("Circuit (heads and MLPs)")
st.caption("Edge score = (corrupted − clean sender output) · gradient of the metric at the receiver's input; "
           "metric = logit difference, 0 = corrupted, 1 = clean. Faithfulness is measured by patching every edge "
           "outside the circuit to its corrupted value.")
selection, handle = current()
clean = selection.prompt
corrupt, answer, wrong = pair_inputs(handle, selection)

url_state("cmethod", "eap", lambda text: text if text in METHODS else "eap")
url_state("csteps", 5, in_range(int, 1, 50))
url_state("cn", 0, in_range(int, 0, 10**7))
url_state("ctarget", 0.0, in_range(float, 0.0, 1.0))
url_state("cpos", False, lambda text: text == "1")
selected: str = url_state("cnode", "")

cols = st.columns([1, 1, 1, 1, 1])
cols[0].selectbox("Method", list(METHODS), format_func=NAMES.get, key="url_cmethod")
cols[1].number_input("EAP-IG steps", 1, 50, key="url_csteps", disabled=st.session_state.url_cmethod == "eap")
cols[2].number_input("Circuit size N (edges; 0 = top 5%)", 0, 10**7, step=50, key="url_cn")
cols[3].number_input("…or smallest N reaching faithfulness (0 = off)", 0.0, 1.0, step=0.05, key="url_ctarget")
cols[4].toggle("Edges per position", key="url_cpos")
for key in ("cmethod", "csteps", "cn", "ctarget"):
    write_url(key, st.session_state[f"url_{key}"])
write_url("cpos", "1" if st.session_state.url_cpos else "")

settings = {"method": st.session_state.url_cmethod, "steps": int(st.session_state.url_csteps),
            "top_n": int(st.session_state.url_cn) or None,
            "target_faithfulness": float(st.session_state.url_ctarget) or None,
            "per_position": bool(st.session_state.url_cpos)}
if settings["top_n"] is not None:
    settings["target_faithfulness"] = None
saved = opened("circuit")
if saved is not None:
    result = CircuitResult.from_json(saved.result)
else:
    result = run_with_progress(cached_circuit, handle, clean, corrupt, answer, wrong, **settings,
                               label="Scoring edges", key="circuit")
if result is None:
    st.stop()

n_chosen = len(result.circuit)
random_mean = sum(result.random_faithfulness) / max(len(result.random_faithfulness), 1)
facts = st.columns(5)
facts[0].metric("LD clean", f"{result.metric['clean']:.2f}")
facts[1].metric("LD corrupted", f"{result.metric['corrupt']:.2f}")
facts[2].metric("Circuit edges", f"{n_chosen}")
facts[3].metric("Faithfulness", f"{result.faithfulness:.3f}")
facts[4].metric("Random sets", f"{random_mean:.3f}".replace("-0.000", "0.000"))
st.caption(f"{n_chosen} of {result.n_edges} edges ({100 * n_chosen / result.n_edges:.1f}%) by {NAMES[result.method]}; "
           f"faithfulness measured by patching the other edges; random sets: mean of "
           f"{len(result.random_faithfulness)} random sets of {n_chosen} edges. "
           f"Computed in {sum(result.seconds.values()):.1f} s.")

adapter = handle.adapter
left, right = st.columns([3, 2])
with left:
    drawn = result.circuit[:600]
    if len(result.circuit) > len(drawn):
        st.caption(f"Drawing the strongest {len(drawn)} of the circuit's {len(result.circuit)} edges.")
    figure = circuit_figure(result.nodes, drawn, adapter.n_layers, adapter.n_heads, selected=selected or None,
                            labels=node_labels())
    event = chart(figure, "circuit_chart", export=f"Circuit: {clean} ({answer!r} vs {wrong!r})", on_select="rerun",
                  selection_mode="points")
    follow_click(selected_node_id(event), "cnode")
    st.caption("Blue: corrupting the edge lowers the metric (it carries the behaviour); red: it raises it. "
               "Width grows with |score|; large markers are the circuit's nodes.")
    chart(faithfulness_curve(result.curve, n_chosen, result.random_faithfulness), "circuit_curve",
          export=f"Faithfulness curve: {clean}")


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
            cols[0].metric(answer, f"{direct['answer']:+.3f}")
            cols[1].metric(wrong, f"{direct['wrong']:+.3f}")
            cols[2].metric("difference", f"{direct['answer'] - direct['wrong']:+.3f}")
        ablation_key = (node["name"], clean, corrupt, answer, wrong, repr(settings))
        if node["kind"] != "logits" and st.button("Ablate (corrupt this node's output)", key="circuit_ablate"):
            st.session_state.circuit_ablation = ablation_key
        if st.session_state.get("circuit_ablation") == ablation_key:
            scored = score_pair(handle, clean, corrupt, answer, wrong, result.method, settings["steps"])
            effect = show_user_errors(node_ablation, handle, scored, result.circuit, node["name"])
            if effect is not None:
                cols = st.columns(2)
                cols[0].metric("Model metric", f"{effect['model']:.3f}", f"{effect['model'] - 1:+.3f} from 1.000")
                cols[1].metric("Circuit metric", f"{effect['circuit']:.3f}",
                               f"{effect['circuit'] - result.faithfulness:+.3f} from {result.faithfulness:.3f}")
        st.markdown("**Circuit edges in**")
        edge_list(node["name"], "in")
        st.markdown("**Circuit edges out**")
        edge_list(node["name"], "out")
        if node["kind"] == "head":
            pattern = show_user_errors(attention_pattern, handle, clean, node["layer"])
            if pattern is not None:
                st.plotly_chart(pattern_figure(pattern[node["head"]], result.tokens,
                                               f"{node['name']} attention on the clean prompt"), key="circuit_pattern")
            intervene_panel(handle, clean, answer, [{"kind": "head", "layer": node["layer"], "index": node["head"],
                                                     "positions": None}], "circuit_intervene",
                            extra={"corrupt_prompt": corrupt, "wrong": wrong})

save_panel("circuit", f"Circuit: {clean[:80]}", result.to_json)
st.download_button("Download the circuit JSON", result.to_json, file_name="circuit.json", mime="application/json")
