"""Circuitscope: `streamlit run app.py`. Shared sidebar, then the chosen page."""

from __future__ import annotations

import streamlit as st

from components.theme import install as install_figure_theme
from views.common import presenting, share_box, sidebar, start_examples_once

st.set_page_config(page_title="Circuitscope", layout="wide")
install_figure_theme()

PAGES = [
    st.Page("views/start.py", title="Start here", url_path="start", default=True),
    st.Page("views/inspector.py", title="Prompt inspector", url_path="inspector"),
    st.Page("views/heatmaps.py", title="Heatmaps and logit lens", url_path="heatmaps"),
    st.Page("views/graph.py", title="Attribution graph", url_path="graph"),
    st.Page("views/patching.py", title="Patching", url_path="patching"),
    st.Page("views/circuit.py", title="Circuit (heads, MLPs)", url_path="circuit"),
    st.Page("views/paths.py", title="Neuron paths", url_path="paths"),
    st.Page("views/units.py", title="Neurons across a corpus", url_path="units"),
    st.Page("views/attention.py", title="Attention: routes and QK", url_path="attention"),
    st.Page("views/gallery.py", title="Gallery", url_path="gallery"),
]

# Presentation mode: every control hidden except the way out, figures enlarged (views/common.chart).
PRESENTATION_CSS = """<style>
section[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"], header[data-testid="stHeader"],
.stTextInput, .stNumberInput, .stSelectbox, .stMultiSelect, .stSlider, .stTextArea, .stCheckbox,
.stButton, .stDownloadButton, .stFileUploader, [data-testid="stExpander"], .stPopover, .stCaption
{display: none !important;}
.st-key-exit_presentation, .st-key-exit_presentation .stButton {display: block !important;}
.block-container {max-width: 100% !important; padding-top: 1rem !important;}
h1 {font-size: 2.8rem !important;}
</style>"""


def set_presentation(on: bool) -> None:
    if on:
        st.query_params["present"] = "1"
    elif "present" in st.query_params:
        del st.query_params["present"]


navigation = st.navigation(PAGES)
st.sidebar.markdown("### Circuitscope")
selection = sidebar()
start_examples_once(selection.model)
if presenting():
    st.markdown(PRESENTATION_CSS, unsafe_allow_html=True)
    st.button("Exit presentation", key="exit_presentation", on_click=set_presentation, args=(False,))
else:
    st.sidebar.button("Present (hide controls, enlarge figures)", key="start_presentation", on_click=set_presentation,
                      args=(True,))
navigation.run()
share_box()
