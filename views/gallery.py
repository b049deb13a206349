"""Gallery: saved analyses (search, open without recomputing, rename, delete with
confirmation) and import of a circuit-tracer / Neuronpedia graph file."""

import datetime
import json

import streamlit as st

from backend.errors import UserInputError
from backend.runtime.models import EMBEDDED_MODELS
from backend.settings import CIRCUIT, GRAPH, PAIR, PATCHING, PATHS
from backend.storage.store import KINDS, import_graph
from views.common import OTHER_MODEL, gallery_store, show_user_errors

PAGES = {"graph": "views/graph.py", "circuit": "views/circuit.py", "patching": "views/patching.py",
         "paths": "views/paths.py", "lens": "views/heatmaps.py", "inspect": "views/inspector.py"}
GROUPS_OF = {"graph": (GRAPH,), "paths": (PATHS,), "circuit": (PAIR, CIRCUIT), "patching": (PAIR, PATCHING)}
FROM_SAVED = {"graph", "circuit", "patching", "paths"}  # pages that draw the saved result; the others recompute (< 2 s)

st.title("Gallery")
store = show_user_errors(gallery_store)
if store is None:
    st.stop()
st.caption(f"{store.count()} saved analyses in `{store.path}` (set CIRCUITSCOPE_DB to use another file).")


def page_params(saved) -> dict:
    """The page URL of a saved analysis: the one its page kept, or (batch runs keep setting
    values, never URLs) built from the settings records."""
    settings = saved.settings
    if "url" in settings:
        return dict(settings["url"])
    params = {"prompt": saved.prompt}
    if settings.get("target"):
        params["target"] = settings["target"]
    if settings.get("bos") == "off":
        params["bos"] = "off"
    records = [s for group in GROUPS_OF.get(saved.kind, ()) for s in group.settings]
    for name, value in settings.get("values", {}).items():
        setting = next((s for s in records if s.name == name), None)
        if setting is not None and value != setting.default:
            params[setting.url] = setting.to_text(value)
    for key in ("supernodes", "labels"):
        if settings.get(key):
            params[key] = json.dumps(settings[key])
    if settings.get("grouped"):
        params["grouped"] = "1"
    return params


def open_analysis(analysis_id: int) -> None:
    """Point the sidebar and the page settings at the saved view, then go there."""
    saved = store.get(analysis_id)
    for key in [k for k in st.session_state if str(k).startswith("url_")]:
        del st.session_state[key]
    st.session_state.model_choice = saved.model if saved.model in EMBEDDED_MODELS else OTHER_MODEL
    st.session_state.model_other = "" if saved.model in EMBEDDED_MODELS else saved.model
    st.session_state.prompt_input = saved.prompt
    st.session_state.target_input = page_params(saved).get("target", "")
    st.session_state.open_request = saved.id


if st.query_params.get("open", "").isdigit():  # a link from the Start page
    requested = int(st.query_params["open"])
    del st.query_params["open"]
    open_analysis(requested)

if st.session_state.get("open_request"):
    saved = store.get(st.session_state.pop("open_request"))
    params = {**page_params(saved), "saved": str(saved.id)}
    st.switch_page(PAGES[saved.kind], query_params=params)

cols = st.columns([3, 1])
query = cols[0].text_input("Search title, model, prompt or notes", key="gallery_query")
kind = cols[1].selectbox("Kind", ["all", *KINDS], key="gallery_kind")
rows = store.search(query, None if kind == "all" else kind)
if not rows:
    st.info("Nothing saved yet: use “Save analysis” on the graph, circuit, patching or paths page.")
for saved in rows:
    with st.container(border=True):
        head = st.columns([4, 1, 1, 1, 1])
        when = datetime.datetime.fromtimestamp(saved.updated).strftime("%Y-%m-%d %H:%M")
        head[0].markdown(f"**{saved.title}**  \n#{saved.id} · {saved.kind} · {saved.model} · {when}")
        head[0].caption(saved.prompt[:200])
        head[1].button(
            "Open",
            key=f"open_{saved.id}",
            on_click=open_analysis,
            args=(saved.id,),
            help=None if saved.kind in FROM_SAVED else "Opens the page live: it recomputes in about a second.",
        )
        head[4].download_button(
            "JSON",
            lambda analysis=saved.id: store.get(analysis).result,
            file_name=f"{saved.kind}-{saved.id}.json",
            mime="application/json",
            key=f"json_{saved.id}",
        )
        with head[2].popover("Rename"):
            new_title = st.text_input("New title", saved.title, key=f"title_{saved.id}")
            if st.button("Rename", key=f"rename_{saved.id}"):
                try:
                    store.rename(saved.id, new_title)
                    st.rerun()
                except UserInputError as exc:
                    st.error(str(exc))
        with head[3].popover("Delete"):
            st.write(f"Delete “{saved.title}”? This cannot be undone.")
            if st.button("Yes, delete", key=f"delete_{saved.id}", type="primary"):
                show_user_errors(store.delete, saved.id)
                st.rerun()

with st.expander("Import a circuit-tracer / Neuronpedia graph JSON"):
    uploaded = st.file_uploader("Graph JSON", type=["json"], key="gallery_import")
    if uploaded is not None and st.button("Import into the gallery", key="import_button"):
        analysis = show_user_errors(import_graph, store, uploaded.getvalue(), "")
        if analysis is not None:
            st.success(f"Imported as #{analysis}.")
