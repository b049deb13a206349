"""Start here: what the tool does, the worked examples, and where each page leads."""

import streamlit as st

from backend.storage import examples
from views.common import current, gallery_store

st.title("Circuitscope")
st.markdown(
    "Find the circuit behind one prediction of a transformer language model, computed on your prompt: "
    "**attribution graphs** of neurons (as circuit-tracer draws them), **component circuits** of heads and MLPs, "
    "**patching**, **neuron paths** and **interventions** tested against controls.  \n"
    "Everything is computed here, on the CPU or a GPU, for the model and prompt in the sidebar; links reopen the same "
    "view, and saved analyses keep their notes.  \n"
    "Start with a worked example below, or type a prompt in the sidebar and open a page."
)
selection, handle = current()
store = gallery_store()

st.subheader("Worked examples")
rows = sorted((r for r in store.search("Example:") if (r.source or "").startswith("example:")),
              key=lambda r: examples.NAMES.index(r.source.split(":")[1]) if r.source.split(":")[1] in examples.NAMES
              else 99)
state = examples.status
if state["state"] == "building":
    st.progress(state["done"] / max(state["total"], 1),
                text=f"Building the worked examples in the background ({state['message']}); this page can be "
                     "reloaded meanwhile.")
elif state["state"] == "failed":
    st.error(f"Building the worked examples failed: {state['message']}")
if not rows and state["state"] != "building":
    st.info("No worked examples in this gallery yet (`make examples` builds them).")
    if st.button("Build the worked examples now", key="build_examples",
                 help="About three minutes on 2 CPU cores, in the background."):
        examples.build_missing_in_background(selection.model, store)
        st.rerun()
for saved in rows:
    with st.container(border=True):
        cols = st.columns([5, 1])
        cols[0].markdown(f"**{saved.title.removeprefix('Example: ')}**  \n{saved.model} · “{saved.prompt}”")
        cols[0].caption(saved.notes)
        cols[1].page_link("views/gallery.py", label="Open in the gallery", query_params={"open": str(saved.id)})

st.subheader("Pages")
for path, title, text in [
    ("views/inspector.py", "Prompt inspector", "tokens, the next-token distribution, a continuation"),
    ("views/heatmaps.py", "Heatmaps and logit lens", "layer × position grids; click a cell for its neurons and heads"),
    ("views/graph.py", "Attribution graph", "which neurons carry the prediction, and how; pin, group, intervene"),
    ("views/patching.py", "Patching", "exact activation patching beside AtP and RelP, for a clean/corrupted pair"),
    ("views/circuit.py", "Circuit (heads, MLPs)", "EAP-IG edges, a circuit and its measured faithfulness"),
    ("views/paths.py", "Neuron paths", "NeuronPath's influential path, against baselines"),
    ("views/units.py", "Neurons across a corpus", "where a neuron fires in a corpus, its label; search neurons"),
    ("views/attention.py", "Attention: routes and QK", "which heads move information to the prediction, and why a "
     "head attends where it does"),
    ("views/gallery.py", "Gallery", "saved analyses and imported graphs"),
]:
    st.page_link(path, label=f"{title} — {text}")
