"""Neuron paths page: NeuronPath's layer-progressive search, baselines and evaluation."""

import streamlit as st

from backend.causal.interventions import neuron_items
from backend.analyses.neurons import neuron_view
from backend.causal.paths import PathResult, neuron_path, recurring_neurons
from components.heatmap import selected_cell
from components.neuron_panel import neuron_panel
from components.paths_view import evaluation_figure, path_figure
from views.common import (chart, current, follow_click, in_range, opened, run_with_progress, show_user_errors,
                          url_state, write_url)
from views.intervene_panel import intervene_panel
from views.save_panel import save_panel

st.title("Influential neuron path")
st.caption("NeuronPath (Wang et al., 2025): one neuron per layer chosen by joint attribution to p(target), "
           "at the last position; compared with the most activated neuron and greedy gradient × activation.")
selection, handle = current()
url_state("steps", 20, in_range(int, 1, 100))
url_state("topk", 1, in_range(int, 1, 10))
url_state("others", "")
chosen_text = url_state("neuron", "")

cols = st.columns(3)
cols[0].number_input("Scaling steps m", 1, 100, key="url_steps")
cols[1].number_input("Neurons per layer (top-k)", 1, 10, key="url_topk")
for key in ("steps", "topk"):
    write_url(key, st.session_state[f"url_{key}"])

saved = opened("paths")
if saved is not None:
    result = PathResult.from_json(saved.result)
else:
    result = run_with_progress(neuron_path, handle, selection.prompt, selection.target or None,
                               steps=int(st.session_state.url_steps), top_k=int(st.session_state.url_topk),
                               label="Searching the path", key="paths")
if result is None:
    st.stop()

metrics = st.columns(4)
metrics[0].metric("Target", repr(result.target["token"]), f"p = {result.target['prob']:.3f}", delta_color="off")
metrics[1].metric("JAS (path)", f"{result.jas:.3g}")
metrics[2].metric("JAS (activation baseline)", f"{result.baseline_jas['activation_baseline']:.3g}")
metrics[3].metric("Search time", f"{result.timings['search_s']:.1f} s")

chosen = tuple(int(v) for v in chosen_text.split(",")) if chosen_text.count(",") == 1 else None
left, right = st.columns([3, 2])
with left:
    event = chart(path_figure(result.path, result.baselines, chosen), "path_chart", export=f"Neuron path: {selection.prompt}",
                  on_select="rerun", selection_mode="points")
    clicked = selected_cell(event)
    follow_click(clicked, "neuron", clicked and f"{clicked[0]},{clicked[1]}")
with right:
    st.markdown("**Remove (zero) or enhance (×2) each path: change in p(target)**")
    chart(evaluation_figure(result.evaluation), "evaluation_chart", export=f"Path evaluation: {selection.prompt}")
    table = [{"path": name.replace("_", " "), "remove": f"{result.evaluation['remove'][name]:+.4f}",
              "enhance": f"{result.evaluation['enhance'][name]:+.4f}",
              "top-1 after remove": repr(result.top1_changes["remove"][name]),
              "top-1 after enhance": repr(result.top1_changes["enhance"][name])}
             for name in ("path", "activation_baseline", "gradient_baseline")]
    table.append({"path": f"random (n={result.settings['random_paths']})",
                  "remove": f"{result.evaluation['remove']['random_mean']:+.4f} ± {result.evaluation['remove']['random_std']:.4f}",
                  "enhance": f"{result.evaluation['enhance']['random_mean']:+.4f} ± {result.evaluation['enhance']['random_std']:.4f}",
                  "top-1 after remove": "", "top-1 after enhance": ""})
    st.dataframe(table, hide_index=True)

if chosen is None:
    st.info("Click a neuron of the path: its activation over the prompt and the tokens it promotes.")
else:
    layer, neuron = chosen
    view = show_user_errors(neuron_view, handle, selection.prompt, layer, neuron)
    if view is not None:
        st.subheader(f"Neuron L{layer} N{neuron}")
        neuron_panel(view.tokens, view.activations, view.promotes, view.suppresses, "path_neuron")

intervene_panel(handle, selection.prompt, result.target["token"],
                neuron_items([(r["layer"], result.position, r["neuron"]) for r in result.path]), "path_intervene")

st.subheader("Recurring neurons across prompts with the same target")
st.text_area("Other prompts, one per line (e.g. more 'capital of' prompts)", key="url_others", height=90)
write_url("others", st.session_state.url_others)
others = [line.strip() for line in st.session_state.url_others.splitlines() if line.strip()]
if others:
    results = [result]
    for i, prompt in enumerate(others):
        with st.spinner(f"Path for prompt {i + 2} of {len(others) + 1}"):
            other = show_user_errors(neuron_path, handle, prompt, selection.target or result.target["token"],
                                     steps=int(st.session_state.url_steps), top_k=int(st.session_state.url_topk))
        if other is not None:
            results.append(other)
    rows = [r for r in recurring_neurons(results) if r["count"] > 1]
    st.caption(f"{len(rows)} neurons appear on more than one of the {len(results)} paths.")
    st.dataframe([{"layer": r["layer"], "neuron": r["neuron"], "paths": r["count"]} for r in rows], hide_index=True)

save_panel("paths", f"Neuron path: {selection.prompt[:80]}", result.to_json)
