"""Patching page: exact activation patching, AtP and RelP side by side, with agreement."""

import numpy as np
import streamlit as st

from backend.causal.patching import METHODS, SITES, PatchResult, patch_one, patching
from components.heatmap import clickable_grid, selected_cell
from views.common import (chart, current, follow_click, opened, run_with_progress, show_user_errors, url_state,
                          write_url)
from views.intervene_panel import intervene_panel
from views.pair_inputs import pair_inputs
from views.save_panel import save_panel

NAMES = {"exact": "Exact patching", "atp": "AtP", "relp": "RelP"}
SITE_NAMES = {"resid_pre": "Residual stream (block input)", "attn_out": "Attention output", "mlp_out": "MLP output",
              "heads": "Attention heads (all positions)"}

st.title("Patching")
st.caption("Corrupted run with one site restored from the clean run; metric = logit difference, 0 = corrupted, 1 = clean.")
selection, handle = current()
clean = selection.prompt
corrupt, answer, wrong = pair_inputs(handle, selection)
url_state("methods", list(METHODS), lambda text: [m for m in text.split(",") if m in METHODS])
url_state("frozen", False, lambda text: text == "1")

cols = st.columns([3, 1])
cols[0].multiselect("Methods", list(METHODS), format_func=NAMES.get, key="url_methods",
                    help="Exact patching runs one forward per site (about a minute on 2 CPU cores for SmolLM2); "
                         "AtP and RelP need one forward and one backward.")
cols[1].toggle("RelP: freeze attention", key="url_frozen")
write_url("methods", st.session_state.url_methods, ",".join)
write_url("frozen", "1" if st.session_state.url_frozen else "")

methods = tuple(m for m in METHODS if m in st.session_state.url_methods)
if not methods:
    st.info("Choose at least one method.")
    st.stop()
saved = opened("patching")
if saved is not None:
    result = PatchResult.from_json(saved.result)
else:
    result = run_with_progress(patching, handle, clean, corrupt, answer, wrong, methods=methods,
                               freeze_attention=st.session_state.url_frozen, label="Patching", key="patching")
if result is None:
    st.stop()

timing = st.columns(len(result.seconds) + 2)
timing[0].metric("LD clean", f"{result.metric['clean']:.3f}")
timing[1].metric("LD corrupted", f"{result.metric['corrupt']:.3f}")
for column, (method, seconds) in zip(timing[2:], result.seconds.items()):
    speedup = result.seconds.get("exact", 0) / seconds if method != "exact" and "exact" in result.seconds else None
    column.metric(f"{NAMES[method]} time", f"{seconds:.2f} s", f"{speedup:.0f}x faster than exact" if speedup else None)

clicked_text = url_state("pcell", "")
for site in SITES:
    grids = result.grids.get(site, {})
    if not grids:
        continue
    r = result.pearson.get(site, {})
    agreement = ", ".join(f"r({NAMES[m]}) = {v:.3f}" for m, v in r.items() if v is not None)
    st.subheader(f"{SITE_NAMES[site]}" + (f" — {agreement}" if agreement else ""))
    bound = max(float(np.abs(np.asarray(g)).max()) for g in grids.values()) or 1.0
    columns = [f"H{h}" for h in range(handle.adapter.n_heads)] if site == "heads" else result.tokens
    rows = [f"L{l}" for l in range(handle.adapter.n_layers)]
    figure_columns = st.columns(len(grids))
    for column, (method, grid) in zip(figure_columns, grids.items()):
        figure = clickable_grid(grid, columns, rows, title=NAMES[method], diverging=True, bound=bound, row_px=14)
        event = chart(figure, f"patch_{site}_{method}", where=column, export=f"{NAMES[method]}, {SITE_NAMES[site]}: {clean}",
                      on_select="rerun", selection_mode="points")
        cell = selected_cell(event)
        follow_click(cell and f"{site}:{cell[0]},{cell[1]}", "pcell")
    if clicked_text.startswith(f"{site}:"):
        layer, index = (int(v) for v in clicked_text.split(":")[1].split(","))
        single = show_user_errors(patch_one, handle, clean, corrupt, answer,
                                  wrong, site, layer, index)
        if single is not None:
            where = f"head {index}" if site == "heads" else f"position {index} ({result.tokens[index]!r})"
            st.success(f"Patched {site} at layer {layer}, {where}: LD {single['ld']:.3f} "
                       f"→ normalized {single['normalized']:.3f}")
            if site == "heads":
                intervene_panel(handle, clean, answer,
                                [{"kind": "head", "layer": layer, "index": index, "positions": None}], "patch_intervene",
                                extra={"corrupt_prompt": corrupt, "wrong": wrong})

save_panel("patching", f"Patching: {clean[:80]}", result.to_json)
