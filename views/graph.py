"""Attribution graph page: compute (or open) a neuron-level graph and explore it by clicking."""

import json

import streamlit as st

from backend.graphs.edge_heads import edge_heads
from backend.graphs.attribution import AttributionGraph, attribution_graph
from backend.graphs.neuronpedia import GraphView, node_ids, parse_graph_json, to_graph_json, view_from_graph
from backend.causal.interventions import neuron_items
from backend.analyses.neurons import neuron_view
from components.charts import head_grid
from components.graph_view import edges_of, graph_figure, selected_node_id
from components.neuron_panel import neuron_panel
from views.common import (chart, current, follow_click, in_range, opened, run_with_progress, set_url_state,
                          show_user_errors, url_state, write_url)
from views.intervene_panel import intervene_panel
from views.save_panel import node_labels, save_panel

st.title("Attribution graph")
selection, handle = current()


def _csv(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def _supernodes(text: str) -> list[list[str]]:
    """[[name, member, ...], ...] from the URL; anything else is ignored."""
    groups = json.loads(text)
    if not isinstance(groups, list):
        raise ValueError("supernodes must be a list")
    return [g for g in groups if isinstance(g, list) and len(g) >= 2 and all(isinstance(x, str) for x in g)]


pinned: list[str] = url_state("pinned", [], _csv)
supernodes: list[list[str]] = url_state("supernodes", [], _supernodes)
selected: str = url_state("node", "")
url_state("k", 200, in_range(int, 1, 2000))
url_state("nt", 0.8, in_range(float, 0.1, 1.0))
url_state("et", 0.98, in_range(float, 0.1, 1.0))
url_state("wrong", "")

with st.expander("Settings", expanded=False):
    cols = st.columns(5)
    cols[0].number_input("Neuron nodes (K)", 1, 2000, step=50, key="url_k",
                         help="Neurons ranked by total attribution to the targets; the rest become 'other neurons' nodes.")
    cols[1].text_input("Wrong token (logit difference)", key="url_wrong",
                       help="With a target token set in the sidebar: attribute logit(target) − logit(wrong).")
    cols[2].slider("Node threshold", 0.1, 1.0, step=0.01, key="url_nt")
    cols[3].slider("Edge threshold", 0.1, 1.0, step=0.005, key="url_et")
    max_links = cols[4].slider("Edges drawn (strongest)", 50, 3000, 400, step=50)
    uploaded = st.file_uploader("Open a circuit-tracer / Neuronpedia graph JSON instead", type=["json"])
for key in ("k", "nt", "et", "wrong"):
    write_url(key, st.session_state[f"url_{key}"])


def compute_graph() -> tuple[GraphView | None, AttributionGraph | None]:
    """The view to draw, and the full graph behind it (None for a saved or imported file)."""
    saved = opened("graph")
    if saved is not None:
        return show_user_errors(parse_graph_json, saved.result), None
    if uploaded is not None:
        return show_user_errors(parse_graph_json, uploaded.getvalue()), None
    graph = run_with_progress(
        attribution_graph, handle, selection.prompt, selection.target or None,
        wrong=st.session_state.url_wrong.strip() or None, max_nodes=int(st.session_state.url_k),
        label="Computing the attribution graph", key="graph",
    )
    if graph is None:
        return None, None
    return show_user_errors(view_from_graph, graph, st.session_state.url_nt, st.session_state.url_et), graph


view, graph = compute_graph()
if view is None:
    st.stop()

known_ids = {n["node_id"] for n in view.nodes}
meta = view.metadata
scores = meta.get("scores", {})
cols = st.columns(5)
cols[0].metric("Nodes shown", len(view.nodes))
cols[1].metric("Links", len(view.links))
cols[2].metric("Replacement", f"{scores['replacement']:.3f}" if "replacement" in scores else "–")
cols[3].metric("Completeness", f"{scores['completeness']:.3f}" if "completeness" in scores else "–")
cols[4].metric("Computed in", f"{meta['timings']['total_s']:.1f} s" if "timings" in meta else "imported")

filters = st.columns([3, 1])
kinds = filters[0].multiselect(
    "Node kinds", ["embedding", "neuron", "other", "bias", "logit"], ["embedding", "neuron", "other", "bias", "logit"]
)
only_pinned = filters[1].toggle("Pinned subgraph only", value=False, disabled=not pinned)
shown = [n for n in view.nodes if n["kind"] in kinds and (not only_pinned or n["node_id"] in pinned or n["kind"] == "logit")]
labels = {**{member: name for name, *members in supernodes for member in members}, **node_labels()}

left, right = st.columns([3, 2])
with left:
    figure = graph_figure(
        shown, view.links, view.tokens, selected=selected, pinned=set(pinned), labels=labels, max_links=max_links
    )
    event = chart(figure, "graph_chart", export=f"Attribution graph: {''.join(view.tokens)}", on_select="rerun",
                  selection_mode="points")
    follow_click(selected_node_id(event), "node")


def select(node_id: str) -> None:
    set_url_state("node", node_id)


def toggle_pin(node_id: str) -> None:
    set_url_state("pinned", [p for p in pinned if p != node_id] if node_id in pinned else pinned + [node_id], ",".join)


def edge_buttons(node_id: str, direction: str) -> None:
    for i, link in enumerate(edges_of(node_id, view.links, direction)):
        other = link["source"] if direction == "in" else link["target"]
        node = view.node(other)
        name = node["label"] if node else other
        arrow = "←" if direction == "in" else "→"
        st.button(f"{arrow} {name}   ({link['weight']:+.3g})", key=f"edge_{direction}_{i}", on_click=select, args=(other,))


def show_edge_heads(target_id: str, incoming: list[dict]) -> None:
    """Split one incoming edge over the attention heads that carry it."""
    names = {l["source"]: (view.node(l["source"]) or {"label": l["source"]})["label"] for l in incoming}
    source_id = st.selectbox("Which heads carry the edge from…", list(names), format_func=names.get, key="edge_source")
    index = {node_id: i for i, node_id in enumerate(node_ids(graph))}
    split = show_user_errors(edge_heads, handle, graph, index[source_id], index[target_id])
    if split is not None:
        st.caption(f"edge {split.edge:+.4g} = heads {split.heads.sum():+.4g} + residual stream only {split.residual:+.4g}")
        st.plotly_chart(head_grid(split.heads, "Direct effect by last attention hop"), key="edge_heads_grid")


with right:
    node = view.node(selected) if selected else None
    if node is None:
        st.info("Click a node in the graph to see what feeds it and what it feeds.")
    else:
        st.subheader(node["label"])
        st.caption(f"{node['kind']} · layer {node['layer']} · position {node['ctx_idx']} · id {node['node_id']}")
        facts = st.columns(2)
        if node.get("activation") is not None:
            facts[0].metric("Activation", f"{node['activation']:.4g}")
        if node.get("influence") is not None:
            facts[1].metric("Cumulative influence", f"{node['influence']:.3f}")
        st.button("Unpin" if node["node_id"] in pinned else "Pin", on_click=toggle_pin, args=(node["node_id"],))
        st.markdown("**Strongest incoming edges**")
        edge_buttons(node["node_id"], "in")
        st.markdown("**Strongest outgoing edges**")
        edge_buttons(node["node_id"], "out")
        incoming = edges_of(node["node_id"], view.links, "in")
        if graph is not None and incoming:
            show_edge_heads(node["node_id"], incoming)
        if node["kind"] == "neuron" and meta.get("scan") == handle.name:
            detail = show_user_errors(neuron_view, handle, selection.prompt, node["layer"], int(node["feature"]))
            if detail is not None:
                neuron_panel(detail.tokens, detail.activations, detail.promotes, detail.suppresses, "neuron_acts")

def neuron_triples(node_ids: list[str]) -> list[tuple[int, int, int]]:
    """(layer, position, neuron) of the neuron nodes among ``node_ids``; supernodes expand to members."""
    expanded = [member for node_id in node_ids for member in ([node_id] + [m for name, *ms in supernodes
                if name == node_id for m in ms])]
    nodes = [view.node(node_id) for node_id in dict.fromkeys(expanded)]
    return [(n["layer"], n["ctx_idx"], int(n["feature"])) for n in nodes if n and n["kind"] == "neuron"]


if meta.get("scan") == handle.name:
    intervene_panel(handle, selection.prompt, selection.target or None,
                    neuron_items(neuron_triples(pinned or ([selected] if selected else []))), "graph_intervene")

st.subheader("Pinned nodes and supernodes")
pin_cols = st.columns([2, 2])
with pin_cols[0]:
    chosen = st.multiselect("Pinned", sorted(known_ids | set(pinned)), default=pinned, key="pinned_editor")
    if chosen != pinned:
        set_url_state("pinned", chosen, ",".join)
        st.rerun()
with pin_cols[1]:
    with st.form("supernode_form", clear_on_submit=True):
        name = st.text_input("Supernode name")
        members = st.multiselect("Members (pinned nodes)", pinned)
        if st.form_submit_button("Group into a supernode") and name.strip() and members:
            set_url_state("supernodes", supernodes + [[name.strip(), *members]], json.dumps)
            st.rerun()
    for i, (group, *members) in enumerate(supernodes):
        row = st.columns([4, 1])
        row[0].markdown(f"**{group}**: {', '.join(members)}")
        if row[1].button("Remove", key=f"remove_supernode_{i}"):
            set_url_state("supernodes", supernodes[:i] + supernodes[i + 1 :], json.dumps)
            st.rerun()

exported = to_graph_json(view, pinned=pinned, supernodes=supernodes, clicked=selected)
save_panel("graph", f"Graph: {''.join(view.tokens)[:80]}", lambda: json.dumps(exported), supernodes=supernodes)
st.download_button("Download graph JSON (Neuronpedia schema)", lambda: json.dumps(exported), file_name="attribution-graph.json",
                   mime="application/json")
