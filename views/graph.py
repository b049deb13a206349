"""Attribution graph page: compute (or open) a graph over MLP neurons or transcoder features and explore it
by clicking."""

import json

import numpy as np
import streamlit as st

from backend.causal.interventions import neuron_items
from backend.graphs.attribution import attribution_graph
from backend.graphs.edge_heads import edge_heads
from backend.graphs.features import feature_graph
from backend.graphs.graph import AttributionGraph
from backend.graphs.grouping import group_id, grouped_view
from backend.graphs.neuronpedia import GraphView, node_ids, parse_graph_json, to_graph_json, view_from_graph
from backend.graphs.viewer_export import viewer_zip
from backend.replacement.service import ensure_fitting, fit_status, stop_fitting
from backend.replacement.transcoders import open_transcoders
from backend.settings import GRAPH
from backend.units.service import find_index
from components.charts import head_grid
from components.graph_view import edges_of, graph_figure, selected_node_id
from components.tokens import visible
from views.common import (
    chart,
    current,
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
from views.save_panel import node_labels, save_panel
from views.unit_panel import active_corpus, neuron_labels, unit_panel

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


def _included(text: str) -> list[tuple[int, int, int]]:
    """Promoted neurons "layer.pos.index,..." from the URL."""
    return [tuple(int(x) for x in part.split(".")) for part in _csv(text) if part.count(".") == 2]


if "wrong" in st.query_params and "gwrong" not in st.query_params:  # links made before the key was renamed
    st.query_params["gwrong"] = st.query_params["wrong"]
    del st.query_params["wrong"]
for setting in GRAPH.settings:
    setting_state(setting)
pinned: list[str] = url_state("pinned", [], _csv)
supernodes: list[list[str]] = url_state("supernodes", [], _supernodes)
selected: str = url_state("node", "")
url_state("grouped", False, lambda text: text == "1")
included: list[tuple[int, int, int]] = url_state("inc", [], _included)

def use_folder(folder: str) -> None:
    st.session_state.url_tc = folder


def default_set_box() -> None:
    """The default SmolLM2 set: use it when fitted, else fit it in the background (progress, Stop)."""
    if handle.name != "smollm2":
        return
    status = fit_status()
    if status["state"] == "ready":
        if st.session_state.url_tc.strip() != status["folder"]:
            st.button("Use the default transcoder set", on_click=use_folder, args=(status["folder"],),
                      help=f"{status['folder']}: 4096 features per layer, TopK k=32, fitted here")
        return

    @st.fragment(run_every=2.0 if status["state"] == "fitting" else None)
    def live() -> None:
        current = fit_status()
        if current["state"] == "ready":
            st.rerun()
        if current["state"] == "fitting":
            st.progress(min(1.0, current["fraction"]), text=f"Fitting the default transcoder set: {current['message']}")
            if st.button("Stop fitting", key="stop_fit", help="Finished layers are kept: fitting again resumes."):
                stop_fitting()
            return
        if current["state"] != "missing":
            st.caption(f"Default transcoder set: {current['message']}")
        if st.button("Fit the default transcoder set" if current["state"] == "missing" else "Resume fitting",
                     key="start_fit", help="4096 features per layer, TopK k=32, 60k tokens of the default corpus: "
                                           "about 40 minutes on 2 CPU cores, minutes on a GPU. Pages keep working."):
            show_user_errors(ensure_fitting, handle)
            st.rerun()

    live()


with st.expander("Settings", expanded=bool(st.session_state.url_tc.strip())):
    st.text_input("Basis: transcoder set folder (empty = MLP neurons)", key="url_tc",
                  placeholder="a folder with config.yaml and layer_{i}.safetensors (fit one: make transcoders)",
                  help="With a folder, the nodes are the set's active features (circuit-tracer's local replacement "
                       "model: error nodes hold what the transcoders miss, and have no inputs).")
    default_set_box()
    cols = st.columns(6)
    cols[0].number_input("Unit nodes (K)", 1, 5000, step=50, key="url_k",
                         help="Neurons or features, chosen as circuit-tracer chooses features: by influence on the "
                              "logits through the graph built so far; the rest of each (layer, position) is its "
                              "'other' (error) node.")
    cols[1].text_input("Wrong token (logit difference)", key="url_gwrong",
                       help="With a target token set in the sidebar: attribute logit(target) − logit(wrong).")
    cols[2].slider("Node threshold", 0.1, 1.0, step=0.01, key="url_nt")
    cols[3].slider("Edge threshold", 0.1, 1.0, step=0.005, key="url_et")
    cols[4].toggle("'Other' nodes get inputs", key="url_oin", disabled=bool(st.session_state.url_tc.strip()),
                   help="On: 'other neurons' nodes are exact linear functions of upstream nodes, so influence flows "
                        "through them to the tokens. Off: circuit-tracer's error semantics (no inputs).")
    max_links = cols[5].slider("Edges drawn (strongest)", 50, 3000, 400, step=50)
    uploaded = st.file_uploader("Open a circuit-tracer / Neuronpedia graph JSON instead", type=["json"])
for setting in GRAPH.settings:
    write_setting(setting)


def compute_graph() -> tuple[GraphView | None, AttributionGraph | None]:
    """The view to draw, and the full graph behind it (None for a saved or imported file)."""
    saved = opened("graph")
    if saved is not None:
        return show_user_errors(parse_graph_json, saved.result), None
    if uploaded is not None:
        return show_user_errors(parse_graph_json, uploaded.getvalue()), None
    common = dict(wrong=st.session_state.url_gwrong.strip() or None, max_nodes=int(st.session_state.url_k),
                  include=included, key="graph")
    if transcoder_folder:
        graph = run_with_progress(feature_graph, handle, selection.text, transcoder_folder, selection.target or None,
                                  label="Computing the transcoder-feature graph", **common)
    else:
        graph = run_with_progress(attribution_graph, handle, selection.text, selection.target or None,
                                  other_inputs=bool(st.session_state.url_oin), label="Computing the attribution graph",
                                  **common)
    if graph is None:
        return None, None
    return show_user_errors(view_from_graph, graph, st.session_state.url_nt, st.session_state.url_et), graph


transcoder_folder = st.session_state.url_tc.strip()
full_view, graph = compute_graph()
if full_view is None:
    st.stop()
meta = full_view.metadata
feature_units = show_user_errors(open_transcoders, meta["transcoders"], handle) \
    if meta.get("basis") == "transcoders" and meta.get("transcoders") else None
unit_word = "feature" if meta.get("basis") == "transcoders" else "neuron"
kind_names = {"neuron": unit_word, "other": "error" if meta.get("basis") == "transcoders" else "other neurons"}
selected = full_view.canonical_id(selected) if selected else selected
pinned = [full_view.canonical_id(p) for p in pinned]
supernodes = [[name, *(full_view.canonical_id(m) for m in members)] for name, *members in supernodes]
view = full_view

scores = meta.get("scores", {})
cols = st.columns(5)
cols[0].metric("Nodes shown", len(full_view.nodes))
cols[1].metric("Links", len(full_view.links))
cols[2].metric("Replacement", f"{scores['replacement']:.3f}" if "replacement" in scores else "–",
               help="Of the influence reaching an input or a dead-end 'other' node, the share reaching an input "
                    "along paths that avoid every 'other neurons' node.")
cols[3].metric("Completeness", f"{scores['completeness']:.3f}" if "completeness" in scores else "–",
               help="Influence-weighted share of each node's incoming |edges| not coming from 'other neurons'.")
cols[4].metric("Computed in", f"{meta['timings']['total_s']:.1f} s" if "timings" in meta else "imported")

embeddings = sorted((n for n in full_view.nodes if n.kind == "embedding"), key=lambda n: n.ctx_idx)
context = [n for n in embeddings if n.ctx_idx != meta.get("sink") and n.ctx_idx < len(full_view.tokens) - 1]
if context and context[0].influence is not None:
    with st.expander("Context tokens: influence and exact contribution", expanded=False):
        by_influence = min(context, key=lambda n: n.influence)  # cumulative: smaller = more influential
        rows = [{"position": n.ctx_idx, "token": visible(full_view.tokens[n.ctx_idx]),
                 "cumulative influence": round(n.influence, 4),
                 "contribution to the target": None if n.contribution is None else round(n.contribution, 3)}
                for n in context]
        st.dataframe(rows, hide_index=True)
        st.caption(f"Most influential by circuit-tracer's measure (absolute edge shares, no cancellation): "
                   f"{visible(full_view.tokens[by_influence.ctx_idx])!s}. The contribution is the token's exact "
                   "signed share of the weighted target logits in the linearized model (contributions + bias = the "
                   "targets); it lets paths that cancel cancel. The last position and the sink are left out.")

filters = st.columns([3, 1, 1])
kinds = filters[0].multiselect("Node kinds", ["embedding", "neuron", "other", "bias", "logit"],
                               ["embedding", "neuron", "other", "bias", "logit"],
                               format_func=lambda kind: {"neuron": unit_word, "other": "other / error"}.get(kind, kind))
only_pinned = filters[1].toggle("Pinned subgraph only", value=False, disabled=not pinned)
filters[2].toggle("Group supernodes", key="url_grouped", disabled=not supernodes,
                  help="Draw each supernode as one box; its edges are its members' edges summed.")
write_url("grouped", "1" if st.session_state.url_grouped else "")
grouped = bool(st.session_state.url_grouped and supernodes)
if grouped:
    view = show_user_errors(grouped_view, full_view, supernodes) or full_view
shown = [n for n in view.nodes if (n.kind in kinds or n.kind == "supernode")
         and (not only_pinned or n.node_id in pinned or n.kind in ("logit", "supernode"))]
unit_names = neuron_labels(handle, [(n.layer, n.feature) for n in shown if n.kind == "neuron"], feature_units) \
    if meta.get("scan") == handle.name else {}
unit_labels = {n.node_id: unit_names[(n.layer, n.feature)] for n in shown
               if n.kind == "neuron" and (n.layer, n.feature) in unit_names}
labels = {**({} if grouped else {member: name for name, *members in supernodes for member in members}),
          **node_labels()}

left, right = st.columns([3, 2])
with left:
    figure = graph_figure(shown, view.links, view.tokens, selected=selected, pinned=set(pinned), labels=labels,
                          unit_labels=unit_labels, max_links=max_links, kind_names=kind_names)
    event = chart(figure, "graph_chart", export=f"Attribution graph: {''.join(view.tokens)}", on_select="rerun",
                  selection_mode="points")
    follow_click(selected_node_id(event), "node")


def select(node_id: str) -> None:
    set_url_state("node", node_id)


def toggle_pin(node_id: str) -> None:
    set_url_state("pinned", [p for p in pinned if p != node_id] if node_id in pinned else pinned + [node_id], ",".join)


def promote(layer: int, pos: int, neuron: int) -> None:
    set_url_state(
        "inc", included + [(layer, pos, neuron)], lambda units: ",".join(".".join(map(str, u)) for u in units)
    )
    set_url_state("node", f"{layer}_{neuron}_{pos}")


def edge_buttons(node_id: str, direction: str) -> None:
    for i, link in enumerate(edges_of(node_id, view.links, direction)):
        other = link["source"] if direction == "in" else link["target"]
        node = view.node(other)
        name = node.label if node else other
        arrow = "←" if direction == "in" else "→"
        st.button(
            f"{arrow} {name}   ({link['weight']:+.3g})", key=f"edge_{direction}_{i}", on_click=select, args=(other,)
        )


def show_edge_heads(target_id: str, incoming: list[dict]) -> None:
    """Split one incoming edge over the attention heads that carry it."""
    names = {l["source"]: (view.node(l["source"]).label if view.node(l["source"]) else l["source"]) for l in incoming}
    source_id = st.selectbox("Which heads carry the edge from…", list(names), format_func=names.get, key="edge_source")
    index = {node_id: i for i, node_id in enumerate(node_ids(graph))}
    split = show_user_errors(edge_heads, handle, graph, index[source_id], index[target_id])
    if split is not None:
        st.caption(
            f"edge {split.edge:+.4g} = heads {split.heads.sum():+.4g} + residual stream only {split.residual:+.4g}"
        )
        st.plotly_chart(head_grid(split.heads, "Direct effect by last attention hop"), key="edge_heads_grid",
                        theme=None)
        source, target = full_view.node(source_id), full_view.node(target_id)
        if source is not None and target is not None and source.ctx_idx <= target.ctx_idx:
            layer, head = np.unravel_index(np.abs(split.heads).argmax(), split.heads.shape)
            why_attend_link(handle, selection.text, int(layer), int(head), target.ctx_idx, source.ctx_idx)


def other_members(node) -> None:
    members = meta.get("other_members", {}).get(f"{node.layer},{node.ctx_idx}", [])
    if not members:
        return
    st.markdown("**Members with the most influence** (not listed as nodes; promote one to see its edges)")
    for i, m in enumerate(members):
        m = {"unit": m.get("neuron"), **m}  # graphs saved before 2026-11-23 name the member "neuron"
        st.button(f"↑ L{node.layer} {unit_word[0].upper()}{m['unit']}: influence {m['influence']:.3g}, direct effect "
                  f"on the targets {m['logit_effect']:+.3g}, activation {m['activation']:.3g}", key=f"promote_{i}",
                  on_click=promote, args=(node.layer, node.ctx_idx, m["unit"]),
                  disabled=graph is None, help=f"Recompute the graph with this {unit_word} as a node.")


with right:
    node = view.node(selected) if selected else None
    if node is None:
        st.info("Click a node in the graph to see what feeds it and what it feeds.")
    else:
        st.subheader(node.label)
        st.caption(f"{kind_names.get(node.kind, node.kind)} · layer {node.layer} · position {node.ctx_idx} · "
                   f"id {node.node_id}")
        facts = st.columns(3)
        if node.activation is not None:
            facts[0].metric(
                "Activation" if node.kind == "neuron" else "Effect on the targets", f"{node.activation:.4g}",
                help=None if node.kind == "neuron" else "What this node writes, projected on the gradient of the "
                "weighted targets through every later path of the linearized model."
            )
        if node.influence is not None:
            facts[1].metric("Cumulative influence", f"{node.influence:.3f}")
        if node.contribution is not None:
            facts[2].metric("Contribution to the target", f"{node.contribution:+.3f}")
        if node.kind == "supernode":
            st.markdown("**Members**: " + ", ".join(node.members))
        else:
            st.button("Unpin" if node.node_id in pinned else "Pin", on_click=toggle_pin, args=(node.node_id,))
        st.markdown("**Strongest incoming edges**")
        edge_buttons(node.node_id, "in")
        st.markdown("**Strongest outgoing edges**")
        edge_buttons(node.node_id, "out")
        if node.kind == "other":
            other_members(node)
        incoming = edges_of(node.node_id, view.links, "in")
        if graph is not None and incoming and node.kind != "supernode" and not grouped:
            show_edge_heads(node.node_id, incoming)
        if node.kind == "neuron" and meta.get("scan") == handle.name \
                and (feature_units is not None or meta.get("basis") != "transcoders"):
            st.markdown(f"**{unit_word.capitalize()} dashboard**")
            unit_panel(handle, selection.text, node.layer, node.feature, "graph_unit", units=feature_units)


def neuron_triples(ids: list[str]) -> list[tuple[int, int, int]]:
    """(layer, position, neuron) of the neuron nodes among ``ids``; supernodes expand to members."""
    expanded = [member for node_id in ids for member in ([node_id] + [m for name, *ms in supernodes
                if node_id in (name, group_id(name)) for m in ms])]
    nodes = [full_view.node(node_id) for node_id in dict.fromkeys(expanded)]
    return [(n.layer, n.ctx_idx, n.feature) for n in nodes if n and n.kind == "neuron"]


if meta.get("basis") == "transcoders":
    st.caption("Interventions act on neurons and heads; on transcoder features they are not available yet.")
elif meta.get("scan") == handle.name:
    intervene_panel(handle, selection.text, selection.target or None,
                    neuron_items(neuron_triples(pinned or ([selected] if selected else []))), "graph_intervene",
                    extra={"selection": {"method": "graph", "max_nodes": int(st.session_state.url_k)}})

st.subheader("Pinned nodes and supernodes")
known_ids = {n.node_id for n in full_view.nodes}
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
            set_url_state("supernodes", supernodes[:i] + supernodes[i + 1:], json.dumps)
            st.rerun()

all_names = neuron_labels(handle, [(n.layer, n.feature) for n in full_view.nodes if n.kind == "neuron"],
                          feature_units) if meta.get("scan") == handle.name else {}
clerps = {**{n.node_id: all_names[(n.layer, n.feature)] for n in full_view.nodes
             if n.kind == "neuron" and (n.layer, n.feature) in all_names}, **node_labels()}
exported = to_graph_json(full_view, pinned=pinned, supernodes=supernodes, clicked=selected, clerps=clerps)
save_panel("graph", f"Graph: {''.join(full_view.tokens)[:80]}", lambda: json.dumps(exported), supernodes=supernodes)
downloads = st.columns(3)
downloads[0].download_button("Download graph JSON (Neuronpedia schema)", lambda: json.dumps(exported),
                             file_name="attribution-graph.json", mime="application/json")
if grouped:
    downloads[1].download_button("Download the grouped graph JSON", lambda: json.dumps(to_graph_json(view)),
                                 file_name="attribution-graph-grouped.json", mime="application/json")
unit_index = show_user_errors(find_index, handle, active_corpus(), feature_units) \
    if meta.get("scan") == handle.name and (feature_units is not None or meta.get("basis") != "transcoders") else None
if unit_index is not None:
    downloads[2].download_button(
        "Download for circuit-tracer's viewer (zip)", lambda: viewer_zip(handle, exported, unit_index, feature_units,
                                                                         "circuitscope-graph"),
        file_name="circuitscope-graph-viewer.zip", mime="application/zip",
        help="The graph and one feature file per node (its corpus examples): unzip into the folder given to "
             "circuit_tracer.frontend.local_server.serve(data_dir=...).")
