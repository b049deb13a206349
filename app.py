"""Circuitscope: `streamlit run app.py`. Shared sidebar, then the chosen page."""

from __future__ import annotations

import streamlit as st

from pages.common import sidebar

st.set_page_config(page_title="Circuitscope", layout="wide")

PAGES = [
    st.Page("pages/inspector.py", title="Prompt inspector", url_path="inspector", default=True),
]

navigation = st.navigation(PAGES)
st.sidebar.markdown("### Circuitscope")
sidebar()
navigation.run()
