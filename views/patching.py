"""Patching page: exact activation patching, AtP and RelP side by side, with agreement."""

import numpy as np
import streamlit as st

from backend.errors import UserInputError
from backend.inspect_prompt import inspect_prompt
from backend.patching import METHODS, SITES, patch_one, patching, propose_corruption
from components.heatmap import clickable_grid, selected_cell
from views.common import current, set_url_state, show_user_errors, url_state, write_url
from views.intervene_panel import intervene_panel

NAMES = {"exact": "Exact patching", "atp": "AtP", "relp": "RelP"}
SITE_NAMES = {"resid_pre": "Residual stream (block input)", "attn_out": "Attention output", "mlp_out": "MLP output",
              "heads": "Attention heads (all positions)"}

st.title("Patching")
st.caption("Corrupted run with one site restored from the clean run; metric = logit difference, 0 = corrupted, 1 = clean.")
selection, handle = current()
clean = selection.prompt


def default_corruption() -> str:
    try:
        return propose_corruption(clean)
    except UserInputError:
        return ""


def default_tokens() -> tuple[str, str]:
    clean_top = inspect_prompt(handle, clean, n_continue=0)
    answer = selection.target or clean_top.top_predictions[0]["token"]
    corrupt = st.session_state.get("url_corrupt") or default_corruption()
    if corrupt:
        corrupt_top = show_user_errors(inspect_prompt, handle, corrupt, None, 0)
        if corrupt_top and corrupt_top.top_predictions[0]["token"] != answer:
            return answer, corrupt_top.top_predictions[0]["token"]
    return answer, next(p["token"] for p in clean_top.top_predictions if p["token"] != answer)


url_state("corrupt", default_corruption())
answer_default, wrong_default = default_tokens()
url_state("answer", answer_default)
url_state("wrong", wrong_default)
url_state("methods", list(METHODS), lambda text: [m for m in text.split(",") if m in METHODS])
url_state("frozen", False, lambda text: text == "1")


def propose() -> None:
    st.session_state.url_corrupt = default_corruption()


cols = st.columns([4, 1])
cols[0].text_input("Corrupted prompt (same token length as the prompt in the sidebar)", key="url_corrupt")
cols[1].button("Propose (swap names)", on_click=propose)
cols = st.columns([1, 1, 2, 1])
cols[0].text_input("Answer token", key="url_answer")
cols[1].text_input("Wrong token", key="url_wrong")
cols[2].multiselect("Methods", list(METHODS), format_func=NAMES.get, key="url_methods",
                    help="Exact patching runs one forward per site (about a minute on 2 CPU cores for SmolLM2); "
                         "AtP and RelP need one forward and one backward.")
cols[3].toggle("RelP: freeze attention", key="url_frozen")
for key in ("corrupt", "answer", "wrong"):
    write_url(key, st.session_state[f"url_{key}"])
write_url("methods", st.session_state.url_methods, ",".join)
write_url("frozen", "1" if st.session_state.url_frozen else "")

methods = tuple(m for m in METHODS if m in st.session_state.url_methods)
if not methods:
    st.info("Choose at least one method.")
    st.stop()
bar = st.progress(0.0, text="Patching")
result = show_user_errors(
    patching, handle, clean, st.session_state.url_corrupt, st.session_state.url_answer, st.session_state.url_wrong,
    methods=methods, freeze_attention=st.session_state.url_frozen,
    progress=lambda fraction, message: bar.progress(min(fraction, 1.0), text=message),
)
bar.empty()
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
        event = column.plotly_chart(figure, key=f"patch_{site}_{method}", on_select="rerun", selection_mode="points")
        cell = selected_cell(event)
        if cell and f"{site}:{cell[0]},{cell[1]}" != st.session_state.get("patch_last_click"):
            st.session_state.patch_last_click = f"{site}:{cell[0]},{cell[1]}"
            set_url_state("pcell", f"{site}:{cell[0]},{cell[1]}")
            st.rerun()
    if clicked_text.startswith(f"{site}:"):
        layer, index = (int(v) for v in clicked_text.split(":")[1].split(","))
        single = show_user_errors(patch_one, handle, clean, st.session_state.url_corrupt, st.session_state.url_answer,
                                  st.session_state.url_wrong, site, layer, index)
        if single is not None:
            where = f"head {index}" if site == "heads" else f"position {index} ({result.tokens[index]!r})"
            st.success(f"Patched {site} at layer {layer}, {where}: LD {single['ld']:.3f} "
                       f"→ normalized {single['normalized']:.3f}")
            if site == "heads":
                intervene_panel(handle, clean, st.session_state.url_answer,
                                [{"kind": "head", "layer": layer, "index": index, "positions": None}], "patch_intervene",
                                extra={"corrupt_prompt": st.session_state.url_corrupt, "wrong": st.session_state.url_wrong})
