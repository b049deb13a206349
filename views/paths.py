"""Neuron paths page: NeuronPath's layer-progressive search (drawn layer by layer as it is
found), the baselines and the paper's evaluation, with the best path named honestly."""

import streamlit as st

from backend.causal.interventions import neuron_items
from backend.causal.paths import NAMED, PathResult, neuron_path, path_ready, recurring_neurons
from backend.settings import PATHS
from components.heatmap import selected_cell
from components.paths_view import ROWS, evaluation_figure, path_figure
from views.common import (
    chart,
    current,
    figure_frame,
    follow_click,
    opened,
    run_with_progress,
    setting_state,
    show_user_errors,
    url_state,
    write_setting,
    write_url,
)
from views.intervene_panel import intervene_panel
from views.save_panel import save_panel
from views.unit_panel import neuron_labels, unit_panel

st.title("Influential neuron path")
st.caption("NeuronPath (Wang et al., 2025), as the authors' code computes it: layer by layer, one neuron per layer "
           "chosen by joint attribution to p(target), at the last position; against the most activated neuron and "
           "greedy gradient × activation.")
selection, handle = current()
for name in ("steps", "top_k"):
    setting_state(PATHS[name])
url_state("others", "")
chosen_text = url_state("neuron", "")
n_layers = handle.adapter.n_layers

cols = st.columns(3)
cols[0].number_input("Scaling steps m", 1, 100, key="url_steps")
cols[1].number_input("Neurons per layer (top-k)", 1, 10, key="url_topk")
for name in ("steps", "top_k"):
    write_setting(PATHS[name])
chosen = tuple(int(v) for v in chosen_text.split(",")) if chosen_text.count(",") == 1 else None

saved = opened("paths")
if saved is not None:
    result = PathResult.from_json(saved.result)
else:
    growing = st.empty()
    steps, top_k = int(st.session_state.url_steps), int(st.session_state.url_topk)
    if not path_ready(handle, selection.text, selection.target or None, steps=steps, top_k=top_k):
        frame = path_figure([], {}, n_layers).update_layout(title="Searching the path, layer by layer…")
        figure_frame(frame, "paths", where=growing)

    def draw_partial(path, scores) -> None:
        rows = [{"layer": l, "neuron": n, "activation": 0.0, "score": s} for (l, n), s in zip(path, scores)]
        growing.plotly_chart(path_figure(rows, {}, n_layers), key=f"growing_{len(rows)}", theme=None)

    result = run_with_progress(neuron_path, handle, selection.text, selection.target or None,
                               steps=steps, top_k=top_k, on_layer=draw_partial, label="Searching the path", key="paths")
    growing.empty()
if result is None:
    st.stop()

metrics = st.columns(4)
metrics[0].metric("Target", repr(result.target["token"]), f"p = {result.target['prob']:.3f}", delta_color="off")
metrics[1].metric("JAS (path)", f"{result.jas:.3g}")
metrics[2].metric("JAS (most activated)", f"{result.baseline_jas['activation_baseline']:.3g}")
metrics[3].metric("Search time", f"{result.timings['search_s']:.1f} s")

chip_labels = neuron_labels(handle, [(r["layer"], r["neuron"]) for rows in (result.path, *result.baselines.values())
                                     for r in rows])
event = chart(path_figure(result.path, result.baselines, n_layers, chosen, labels=chip_labels), "path_chart",
              export=f"Neuron path: {selection.prompt}", on_select="rerun", selection_mode="points")
clicked = selected_cell(event)
follow_click(clicked, "neuron", clicked and f"{clicked[0]},{clicked[1]}")

left, right = st.columns([2, 3])
with left:
    st.markdown("**Remove (zero) or enhance (×2) each path: change in p(target)**")
    chart(evaluation_figure(result.evaluation), "evaluation_chart", export=f"Path evaluation: {selection.prompt}")
with right:
    table = [{"path": ROWS[name][0], "remove": f"{result.evaluation['remove'][name]:+.4f}",
              "enhance": f"{result.evaluation['enhance'][name]:+.4f}",
              "top-1 after remove": repr(result.top1_changes["remove"][name]),
              "top-1 after enhance": repr(result.top1_changes["enhance"][name])} for name in NAMED]
    randoms = {op: f"{result.evaluation[op]['random_mean']:+.4f} ± {result.evaluation[op]['random_std']:.4f}"
               for op in ("remove", "enhance")}
    table.append({"path": f"random (n={result.settings['random_paths']})", **randoms, "top-1 after remove": "",
                  "top-1 after enhance": ""})
    st.dataframe(table, hide_index=True)
    for operation, verb in (
        ("remove", "removing it lowers p(target) most"),
        ("enhance", "enhancing it raises p(target) most"),
    ):
        best = result.evaluation[operation].get("best")
        if best and best != "path":
            st.warning(f"{ROWS[best][0]} beats NeuronPath here: {verb}.")
        elif best == "path":
            st.caption(f"NeuronPath does best: {verb}.")

if chosen is None:
    st.info("Click a neuron chip: its activation over the prompt and the tokens it promotes.")
else:
    layer, neuron = chosen
    st.subheader(f"Neuron L{layer} N{neuron}")
    unit_panel(handle, selection.text, layer, neuron, "path_unit")

intervene_panel(handle, selection.text, result.target["token"],
                neuron_items([(r["layer"], result.position, r["neuron"]) for r in result.path]), "path_intervene",
                extra={"selection": {"method": "path", "steps": result.settings["steps"],
                                     "top_k": result.settings["top_k"]}})

st.subheader("Recurring neurons across prompts with the same target")
st.text_area("Other prompts, one per line (e.g. more 'capital of' prompts)", key="url_others", height=90)
write_url("others", st.session_state.url_others)
others = [line.strip() for line in st.session_state.url_others.splitlines() if line.strip()]
if others:
    results = [result]
    for i, prompt in enumerate(others):
        with st.spinner(f"Path for prompt {i + 2} of {len(others) + 1}"):
            other = show_user_errors(neuron_path, handle, selection.with_prompt(prompt),
                                     selection.target or result.target["token"], steps=int(st.session_state.url_steps),
                                     top_k=int(st.session_state.url_topk))
        if other is not None:
            results.append(other)
    rows = [r for r in recurring_neurons(results) if r["count"] > 1]
    st.caption(f"{len(rows)} neurons appear on more than one of the {len(results)} paths.")
    st.dataframe([{"layer": r["layer"], "neuron": r["neuron"], "paths": r["count"]} for r in rows], hide_index=True)

save_panel("paths", f"Neuron path: {selection.prompt[:80]}", result.to_json)
