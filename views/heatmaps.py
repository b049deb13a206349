"""Heatmaps, logit lens and attention of one prompt; click a cell to drill down."""

import streamlit as st

from backend.analyses.heatmaps import (
    LENS_QUANTITIES,
    QUANTITIES,
    attention_pattern,
    cell_detail,
    compare_grids,
    grid_labels,
    heatmap,
    heatmap_ready,
)
from components.heatmap import (
    clickable_grid,
    grid_frame,
    head_multiples,
    pattern_figure,
    selected_cell,
    selected_head,
)
from views.common import (
    current,
    drill_down,
    figure_frame,
    follow_click,
    in_range,
    open_key,
    set_url_state,
    show_user_errors,
    url_state,
    why_attend_link,
    write_url,
)
from views.intervene_panel import intervene_panel
from views.unit_panel import unit_panel

LABELS = {
    "target_prob": "Logit lens: p(target)",
    "target_rank": "Logit lens: rank of target",
    "second_prob": "Logit lens: p(second token)",
    "resid_norm": "Residual stream norm",
    "attn_norm": "Attention output norm",
    "mlp_norm": "MLP output norm",
    "neuron": "One neuron's activation",
}

st.title("Heatmaps and logit lens")
selection, handle = current()
n_layers, d_mlp = handle.adapter.n_layers, handle.adapter.d_mlp
url_state("q", "target_prob", lambda text: text if text in QUANTITIES else QUANTITIES[0])
url_state("second", "")
url_state("nl", n_layers - 1, in_range(int, 0, n_layers - 1))
url_state("ni", 0, in_range(int, 0, d_mlp - 1))
url_state("compare", "")
cell_text = url_state("cell", "")
head_layer = url_state("hl", n_layers - 1, in_range(int, 0, n_layers - 1))
head = url_state("head", 0, in_range(int, 0, handle.adapter.n_heads - 1))

controls = st.columns([2, 1, 1, 1])
controls[0].selectbox("Quantity", QUANTITIES, format_func=LABELS.get, key="url_q")
controls[1].text_input("Second token", key="url_second", help="Tracked by 'Logit lens: p(second token)'.")
controls[2].number_input("Neuron layer", 0, n_layers - 1, key="url_nl")
controls[3].number_input("Neuron index", 0, d_mlp - 1, key="url_ni")
st.text_input("Compare with a second prompt (same token length)", key="url_compare")
for key in ("q", "second", "nl", "ni", "compare"):
    write_url(key, st.session_state[f"url_{key}"])

quantity = st.session_state.url_q
neuron = (int(st.session_state.url_nl), int(st.session_state.url_ni))
second = st.session_state.url_second or None
target = selection.target or None


def grid_for(prompt: str):
    return show_user_errors(heatmap, handle, prompt, quantity, target, second, neuron)


frame = None  # the grid's frame while a new prompt's forward pass runs
if not heatmap_ready(handle, selection.text, quantity, target, second):
    labels = show_user_errors(grid_labels, handle, selection.text, quantity, neuron)
    if labels is not None:
        frame = figure_frame(grid_frame(labels[1], labels[0], title=f"{LABELS[quantity]}: computing…"), "heatmap")
grid = grid_for(selection.text)
if frame is not None:
    frame.empty()
if grid is None:
    st.stop()
cell = tuple(int(v) for v in cell_text.split(",")) if cell_text.count(",") == 1 else None
if cell and not (cell[0] < len(grid.rows) and cell[1] < len(grid.tokens)):
    cell = None

figure = clickable_grid(
    grid.values,
    grid.tokens,
    grid.rows,
    text=grid.text if quantity in LENS_QUANTITIES else None,
    title=LABELS[quantity],
    diverging=quantity == "neuron",
    colorscale="Viridis_r" if quantity == "target_rank" else "Viridis",
    selected=cell,
)
event = st.plotly_chart(figure, key="heatmap_grid", on_select="rerun", selection_mode="points", theme=None)
clicked = selected_cell(event)
follow_click(clicked, "cell", clicked and f"{clicked[0]},{clicked[1]}")

compare_prompt = st.session_state.url_compare.strip()
if compare_prompt:
    other = grid_for(selection.with_prompt(compare_prompt))
    difference = show_user_errors(compare_grids, grid, other) if other is not None else None
    if difference is not None:
        left, right = st.columns(2)
        left.plotly_chart(
            clickable_grid(other.values, other.tokens, other.rows, title=f"{LABELS[quantity]}: second prompt"),
            key="compare_grid",
            theme=None,
        )
        right.plotly_chart(clickable_grid(difference.values, difference.tokens, difference.rows, diverging=True,
                                          title="first − second"), key="difference_grid", theme=None)


def lens_row(row_label: str) -> int:
    """Row of the logit lens for a grid row label ('emb' -> 0, 'L3' or 'L3 N7' -> 4)."""
    return 0 if row_label == "emb" else int(row_label.split()[0][1:]) + 1


def open_neuron(layer: int, index: int) -> None:
    st.session_state.url_nl, st.session_state.url_ni = layer, index
    st.session_state[open_key("unit")] = True  # the neuron section below opens on it


def open_head(layer: int, index: int) -> None:
    set_url_state("hl", layer)
    set_url_state("head", index)
    st.session_state[open_key("attn")] = True  # the attention section below opens on it


if cell is None:
    st.info("Click a cell: the logit lens's top tokens there, the top neurons and heads of that layer.")
else:
    row, position = cell
    detail = show_user_errors(
        cell_detail, handle, selection.text, lens_row(grid.rows[row]), position, target
    )
    if detail is not None:
        where = "embeddings" if detail.layer < 0 else f"block {detail.layer}"
        st.subheader(f"{where}, position {position} ({grid.tokens[position]!r})")
        cols = st.columns(3)
        cols[0].markdown("**Logit lens, top 10**")
        cols[0].dataframe(
            [{"token": repr(r["token"]), "prob": round(r["prob"], 4)} for r in detail.lens_top], hide_index=True
        )
        if detail.layer >= 0:
            cols[1].markdown("**Neurons by direct effect on the target**")
            for r in detail.neurons_by_effect[:8]:
                cols[1].button(f"N{r['neuron']}: effect {r['effect']:+.3g}, act {r['activation']:.3g}",
                               key=f"ne_{r['neuron']}", on_click=open_neuron, args=(detail.layer, r["neuron"]))
            cols[1].markdown("**Neurons by activation**")
            for r in detail.neurons_by_activation[:5]:
                cols[1].button(f"N{r['neuron']}: act {r['activation']:.3g}", key=f"na_{r['neuron']}",
                               on_click=open_neuron, args=(detail.layer, r["neuron"]))
            cols[2].markdown("**Heads by direct effect on the target**")
            for r in detail.heads_by_effect:
                cols[2].button(f"head {r['head']}: {r['effect']:+.3g}", key=f"h_{r['head']}",
                               on_click=open_head, args=(detail.layer, r["head"]))

# The attention and neuron sections are drill-downs, drawn only when open: their figures took
# the browser ~2 s on 2 cores, and the grid waited for them.
attention_section = drill_down("Attention patterns of one layer (click a head)", "attn")
with attention_section:
    if attention_section.open:
        layer_choice = st.number_input("Layer", 0, n_layers - 1, value=head_layer, key="attention_layer")
        if layer_choice != head_layer:
            set_url_state("hl", int(layer_choice))
        patterns = show_user_errors(attention_pattern, handle, selection.text, int(layer_choice))
        if patterns is not None:
            small, large = st.columns([3, 2])
            with small:
                head_event = st.plotly_chart(head_multiples(patterns, grid.tokens, selected=head), key="head_grid",
                                             on_select="rerun", selection_mode="points", theme=None)
                follow_click(selected_head(head_event), "head")
            with large:
                shown_head = min(head, len(patterns) - 1)
                st.plotly_chart(
                    pattern_figure(patterns[shown_head], grid.tokens, f"Layer {int(layer_choice)}, head {shown_head}"),
                    key="head_large",
                    theme=None,
                )
                why_attend_link(handle, selection.text, int(layer_choice), shown_head)
            intervene_panel(
                handle,
                selection.text,
                target,
                [{"kind": "head", "layer": int(layer_choice), "index": shown_head, "positions": None}],
                "head_intervene",
            )

unit_section = drill_down(f"Neuron L{neuron[0]} N{neuron[1]}: its activations, dashboard and interventions",
                          "unit")
with unit_section:
    if unit_section.open:
        unit_panel(handle, selection.text, neuron[0], neuron[1], "heatmap_unit")
        intervene_panel(
            handle,
            selection.text,
            target,
            [{"kind": "neuron", "layer": neuron[0], "index": neuron[1], "positions": None}],
            "heatmap_intervene",
        )
