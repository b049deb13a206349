"""Patching page: AtP and RelP at once, then exact activation patching filling in batch by
batch, side by side with their agreement. Every piece is cached by the backend, so a click
or a rerun redraws without recomputing."""

import numpy as np
import streamlit as st

from backend.causal.pairs import check_pair
from backend.causal.patching import (
    METHODS,
    SITES,
    PatchResult,
    approximate,
    approximation_ready,
    exact_grid,
    patch_one,
    patching,
    prepare_pair,
)
from backend.runtime.prompts import token_texts
from backend.settings import PATCHING
from components.heatmap import THIRD_PLOT_PX, clickable_grid, grid_frame, plain_grid, selected_cell
from views.common import (
    Throttle,
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
)
from views.intervene_panel import intervene_panel
from views.pair_inputs import pair_inputs, scale_caption, show_scale
from views.save_panel import save_panel

NAMES = {"exact": "Exact patching", "atp": "AtP", "relp": "RelP"}
# The streamed exact grid is redrawn at most this often (and when a site is complete). Redrawn
# after every batch (~3 a second), it kept a fresh browser so busy that the AtP grids drawn
# just before stayed grey skeletons until the exact grid was done (CI, 2 cores).
PARTIAL_EVERY_S = 2.5
SITE_NAMES = {"resid_pre": "Residual stream (block input)", "attn_out": "Attention output", "mlp_out": "MLP output",
              "heads": "Attention heads (all positions)"}

st.title("Patching")
st.caption("Corrupted run with one site restored from the clean run. AtP and RelP appear at once; the exact grid fills "
           "in as its batches finish.")
selection, handle = current()
pair = pair_inputs(handle, selection, "patching")
setting_state(PATCHING["methods"])
setting_state(PATCHING["freeze_attention"])
cols = st.columns([3, 1])
cols[0].multiselect("Methods", list(METHODS), format_func=NAMES.get, key="url_methods",
                    help="Exact patching runs the corrupted prompt once per cell, from the cell's position on "
                         "(about 20 s on 2 CPU cores for SmolLM2's IOI pair); "
                         "AtP and RelP need one forward and one backward.")
cols[1].toggle("RelP: freeze attention", key="url_frozen")
for name in ("methods", "freeze_attention"):
    write_setting(PATCHING[name])
methods = tuple(m for m in METHODS if m in st.session_state.url_methods)
if not methods:
    st.info("Choose at least one method.")
    st.stop()
frozen = st.session_state.url_frozen
n_layers = handle.adapter.n_layers
rows = [f"L{l}" for l in range(n_layers)]


def columns_of(site: str, tokens: list[str]) -> list[str]:
    return [f"H{h}" for h in range(handle.adapter.n_heads)] if site == "heads" else tokens


def draw(grid, site: str, method: str, tokens: list[str], where, bound: float, key: str):
    figure = clickable_grid(grid, columns_of(site, tokens), rows, title=NAMES[method], diverging=True, bound=bound,
                            row_px=14, plot_px=THIRD_PLOT_PX)
    return chart(figure, key, where=where, export=f"{NAMES[method]}, {SITE_NAMES[site]}: {selection.prompt}",
                 on_select="rerun", selection_mode="points")


def early_results() -> bool:
    """AtP and RelP at once, then the exact grids filling in batch by batch (cached pieces
    return at once). The first approximation's first grid is framed while the pair runs.
    False when cancelled or refused."""
    ids = show_user_errors(check_pair, handle, pair.clean, pair.corrupt)  # the tokenizer only
    if ids is None:
        return False
    tokens = token_texts(handle, ids[0])
    scale = st.empty()
    shown = [m for m in ("atp", "relp") if m in methods]
    placeholders = {}
    for site in SITES:
        cols = st.columns(len(shown) + 1)
        placeholders[site] = cols[0].empty()
        for column, method in zip(cols[1:], shown):
            placeholders[site, method] = column.empty()
    if shown and not approximation_ready(handle, pair.clean, pair.corrupt, pair.answer, pair.wrong, shown[0],
                                         metric=pair.metric, freeze_attention=frozen):
        first, site = shown[0], SITES[0]  # one frame: four took the browser longer than the approximation
        frame = grid_frame(columns_of(site, tokens), rows, title=f"{NAMES[first]}: {SITE_NAMES[site]} (computing…)",
                           row_px=10, plot_px=THIRD_PLOT_PX)
        figure_frame(frame, f"{site}_{first}", where=placeholders[site, first])
    prepared = show_user_errors(prepare_pair, handle, pair.clean, pair.corrupt, pair.answer, pair.wrong, pair.metric)
    if prepared is None:
        return False
    with scale.container():
        show_scale({"kind": pair.metric, **prepared.scale.to_dict()})
    for method in shown:  # each drawn as soon as it is computed (AtP first: the fastest answer)
        found = show_user_errors(approximate, handle, pair.clean, pair.corrupt, pair.answer, pair.wrong, method,
                                 metric=pair.metric, freeze_attention=frozen)
        if found is None:
            continue
        for site in SITES:
            bound = float(np.abs(found[0][site]).max()) or 1e-9  # its own scale until all are in
            placeholders[site, method].plotly_chart(
                plain_grid(found[0][site], columns_of(site, tokens), rows, title=f"{NAMES[method]}: "
                           f"{SITE_NAMES[site]}", diverging=True, bound=bound, row_px=10,
                           plot_px=THIRD_PLOT_PX),
                key=f"early_{site}_{method}", theme=None)
    if "exact" not in methods:
        return True

    redraw = Throttle(PARTIAL_EVERY_S)  # from now: the approximations are drawn first

    def partial(site: str, grid: np.ndarray) -> None:
        done = np.isfinite(grid)
        if not redraw.ready(final=done.all()):
            return
        bound = float(np.abs(grid[done]).max()) if done.any() else 1.0
        figure = plain_grid(np.where(done, grid, 0.0), columns_of(site, tokens), rows, diverging=True,
                            bound=bound or 1.0, row_px=10, plot_px=THIRD_PLOT_PX,
                            title=f"Exact: {SITE_NAMES[site]} ({int(done.sum())}/{grid.size})")
        placeholders[site].plotly_chart(figure, key=f"stream_{site}_{int(done.sum())}", theme=None)

    def stream(progress) -> bool:
        for k, site in enumerate(SITES):
            exact_grid(handle, pair.clean, pair.corrupt, pair.answer, pair.wrong, site, metric=pair.metric,
                       progress=lambda f, m, k=k: progress((k + f) / len(SITES), m), on_partial=partial)
        return True

    return run_with_progress(stream, label="Exact patching", key="patching") is not None


saved = opened("patching")
if saved is not None:
    result = PatchResult.from_json(saved.result)
else:
    early = st.empty()
    with early.container():
        complete = early_results()
    if not complete:
        st.stop()
    early.empty()
    result = show_user_errors(patching, handle, pair.clean, pair.corrupt, pair.answer, pair.wrong, methods=methods,
                              metric=pair.metric, freeze_attention=frozen)
if result is None:
    st.stop()

show_scale(result.metric)
timing = st.columns(len(result.seconds))
for column, (method, seconds) in zip(timing, result.seconds.items()):
    speedup = result.seconds.get("exact", 0) / seconds if method != "exact" and "exact" in result.seconds else None
    column.metric(f"{NAMES[method]} time", f"{seconds:.2f} s", f"{speedup:.0f}x faster than exact" if speedup else None)
st.caption(f"Values: {scale_caption(result.metric)}.")

clicked_text = url_state("pcell", "")
for site in SITES:
    grids = result.grids.get(site, {})
    if not grids:
        continue
    r = result.pearson.get(site, {})
    agreement = ", ".join(f"r({NAMES[m]}) = {v:.3f}" for m, v in r.items() if v is not None)
    st.subheader(f"{SITE_NAMES[site]}" + (f" — {agreement}" if agreement else ""))
    bound = max(float(np.abs(np.asarray(g)).max()) for g in grids.values()) or 1.0
    figure_columns = st.columns(len(grids))
    for column, (method, grid) in zip(figure_columns, grids.items()):
        event = draw(grid, site, method, result.tokens, column, bound, f"patch_{site}_{method}")
        cell = selected_cell(event)
        follow_click(cell and f"{site}:{cell[0]},{cell[1]}", "pcell")
    if clicked_text.startswith(f"{site}:"):
        layer, index = (int(v) for v in clicked_text.split(":")[1].split(","))
        single = show_user_errors(patch_one, handle, result.clean, result.corrupt, result.answer, result.wrong, site,
                                  layer, index, result.metric.get("kind", "logit_diff"))
        if single is not None:
            where = f"head {index}" if site == "heads" else f"position {index} ({result.tokens[index]!r})"
            st.success(f"Patched {site} at layer {layer}, {where}: metric {single['value']:.3f} "
                       f"→ {single['scaled']:.3f} ({'normalized' if single['normalized'] else 'raw change'})")
            if site == "heads":
                intervene_panel(
                    handle,
                    result.clean,
                    result.answer,
                    [{"kind": "head", "layer": layer, "index": index, "positions": None}],
                    "patch_intervene",
                    extra={"corrupt_prompt": result.corrupt, "wrong": result.wrong},
                )

save_panel("patching", f"Patching: {selection.prompt[:80]}", result.to_json)
