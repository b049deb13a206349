"""Attention explained: information-flow routes of the prompt, and why a head attends where it does."""

from dataclasses import asdict

import streamlit as st

from backend.analyses.flow import head_shares, information_flow, routes
from backend.analyses.qk import qk_attribution, strongest_key
from components.flow_view import flow_figure, selected_edge
from components.tokens import visible
from views.common import (
    chart,
    current,
    follow_click,
    in_range,
    show_user_errors,
    url_state,
    write_url,
)

st.title("Attention: routes and QK")
selection, handle = current()
adapter = handle.adapter
flow = show_user_errors(information_flow, handle, selection.text)
if flow is None:
    st.stop()
tokens = flow.tokens
P = len(tokens)


def open_qk(layer: int, head: int, query: int, key: int) -> None:
    """Point the QK explainer at a head and (query, key); also usable as an on_click callback."""
    st.session_state.qk_layer, st.session_state.qk_head = int(layer), int(head)
    st.session_state.qk_query, st.session_state.qk_key = int(query), int(key)
    st.session_state.qk_compare = None


def parse_qk(text: str) -> tuple[int, int, int, int]:
    layer, head, query, key = (int(v) for v in text.split("."))
    if not (0 <= layer < adapter.n_layers and 0 <= head < adapter.n_heads and 0 <= key <= query < P):
        raise ValueError("outside this model or prompt")
    return layer, head, query, key


st.subheader("Information-flow routes")
st.caption("Ferrando & Voita (2024), as the LLM Transparency Tool: every head and MLP's proportional contribution "
           "to each residual state (L1 proximity), from one forward pass; kept: edges above the threshold that lead to "
           f"the prediction. Computed in {flow.seconds:.2f} s; parts sum to each state to {flow.max_error:.1e}.")
controls = st.columns(2)
url_state("tau", 0.04, in_range(float, 0.01, 0.5))
threshold = controls[0].slider("Threshold (importance)", 0.01, 0.5, step=0.01, key="url_tau")
write_url("tau", "" if threshold == 0.04 else threshold)
position = controls[1].selectbox("Prediction at", list(range(P)), index=P - 1, key="flow_position",
                                 format_func=lambda p: f"{p}: {visible(tokens[p])}")
edges = [asdict(e) for e in routes(flow, threshold, position)]
edge_text = url_state("edge", "")
chosen_edge = tuple(int(v) for v in edge_text.split(".")) if edge_text.count(".") == 2 else None
event = chart(flow_figure(edges, tokens, adapter.n_layers, flow.parallel, selected=chosen_edge), "flow_chart",
              export=f"Information-flow routes: {selection.prompt}", on_select="rerun", selection_mode="points")
clicked = selected_edge(event)
follow_click(clicked, "edge", clicked and ".".join(map(str, clicked)))
st.caption(f"{len(edges)} route edges. Click an attention edge's dot for the heads that carry it.")

if chosen_edge is not None and 0 <= chosen_edge[0] < adapter.n_layers and chosen_edge[1] <= chosen_edge[2] < P:
    layer, source, target = chosen_edge
    shares = show_user_errors(head_shares, handle, selection.text, layer, target)
    if shares is not None:
        st.markdown(f"**Layer {layer}: {visible(tokens[source])!s} @{source} → {visible(tokens[target])!s} @{target}**"
                    f" (importance {flow.attention[layer, target, source]:.3f})")
        order = sorted(range(adapter.n_heads), key=lambda h: -float(shares[h, source]))
        cols = st.columns(min(5, adapter.n_heads))
        for column, head in zip(cols, order):
            column.button(f"a{layer}.h{head} ({float(shares[head, source]):.3f})", key=f"why_{layer}_{head}",
                          help="Share of this state carried by the head from this source. Click: why does the head "
                               "attend here? (QK attribution below)",
                          on_click=open_qk, args=(layer, head, target, source))

st.subheader("Why does a head attend here? (QK attribution)")
st.caption("The head's pre-softmax score from the query to the key, split exactly into (query-side component) × "
           "(key-side component) terms through the frozen norm scales and RoPE; components = the input embeddings, "
           "every earlier head and MLP, and the projections' biases.")
linked = st.query_params.get("qk", "")
if "qk_layer" not in st.session_state or (linked and linked != st.session_state.get("qk_written")):
    try:  # a link (first visit, or another page's "why does this head attend here?"), else a default
        seeded = parse_qk(linked)
    except ValueError:
        seeded = (adapter.n_layers - 1, 0, P - 1, P - 1)
    open_qk(*seeded)
st.session_state.qk_query = min(st.session_state.qk_query, P - 1)  # the prompt may have become shorter
st.session_state.qk_key = min(st.session_state.qk_key, st.session_state.qk_query)
pick = st.columns(5)
layer = pick[0].number_input("Layer", 0, adapter.n_layers - 1, key="qk_layer")
head = pick[1].number_input("Head", 0, adapter.n_heads - 1, key="qk_head")
query = pick[2].selectbox("Query", list(range(P)), key="qk_query", format_func=lambda p: f"{p}: {visible(tokens[p])}")
key = pick[3].selectbox("Key", list(range(query + 1)), key="qk_key",
                        format_func=lambda p: f"{p}: {visible(tokens[p])}")
compare = pick[4].selectbox("Compare with key", [None, *range(query + 1)], key="qk_compare",
                            format_func=lambda p: "none" if p is None else f"{p}: {visible(tokens[p])}")
st.session_state.qk_written = f"{layer}.{head}.{query}.{key}"
write_url("qk", st.session_state.qk_written)
result = show_user_errors(qk_attribution, handle, selection.text, int(layer), int(head), int(query), int(key),
                          compare_key=compare)
if result is not None:
    facts = st.columns(4)
    facts[0].metric("Score (q·k scaled)", f"{result.score:.3f}")
    facts[1].metric("Attention weight", f"{result.probability:.3f}")
    facts[2].metric("Terms sum to the score", f"±{abs(result.residual):.1e}")
    if result.comparison:
        facts[3].metric(f"Over key {compare}", f"{result.comparison['difference']:+.3f}",
                        help="score(key) - score(compare key); the tables below then explain this difference")
    shown = result.comparison or asdict(result)
    left, right = st.columns(2)
    left.markdown("**Top pairs** (query-side × key-side)")
    left.dataframe([{"query side": t["query"], "key side": t["key"], "value": round(t["value"], 4)}
                    for t in shown["terms"][:20]], hide_index=True)
    left.caption(f"The other pairs sum to {shown['rest']:+.4f}.")
    right.markdown("**Each side's contributors** (with the whole other side)")
    both = [{"side": side, "component": r["component"], "value": round(r["value"], 4)}
            for side in ("query", "key") for r in shown[f"{side}_side"][:10]]
    table = right.dataframe(both, hide_index=True, on_select="rerun", selection_mode="single-row", key="qk_sides")
    picked = table.selection.rows if table else []
    if picked:
        row = both[picked[0]]
        name = row["component"]
        if name.startswith("a") and ".h" in name:  # a head: explain its own attention where it wrote this
            h_layer, h_head = (int(v) for v in name[1:].split(".h"))
            at = int(query) if row["side"] == "query" else int(key)
            target = show_user_errors(strongest_key, handle, selection.text, h_layer, h_head, at)
            if target is not None:
                st.button(f"Why does {name} attend from {visible(tokens[at])} @{at} to {visible(tokens[target])} "
                          f"@{target} (its strongest key)?", key="qk_recurse", on_click=open_qk,
                          args=(h_layer, h_head, at, target))
