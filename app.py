"""Circuitscope: `streamlit run app.py`. Shared sidebar, then the chosen page."""

from __future__ import annotations

import streamlit as st

from views.common import sidebar

st.set_page_config(page_title="Circuitscope", layout="wide")

PAGES = [
    st.Page("views/inspector.py", title="Prompt inspector", url_path="inspector", default=True),
    st.Page("views/heatmaps.py", title="Heatmaps and logit lens", url_path="heatmaps"),
    st.Page("views/graph.py", title="Attribution graph", url_path="graph"),
    st.Page("views/patching.py", title="Patching", url_path="patching"),
    st.Page("views/circuit.py", title="Circuit (heads, MLPs)", url_path="circuit"),
    st.Page("views/paths.py", title="Neuron paths", url_path="paths"),
]

navigation = st.navigation(PAGES)
st.sidebar.markdown("### Circuitscope")
sidebar()
navigation.run()
