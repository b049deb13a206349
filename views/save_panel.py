""""Save analysis": the computed result with a title, notes, node labels and supernodes,
into the gallery database; the view's URL state is kept so the gallery reopens the same view."""

from __future__ import annotations

import json
from collections.abc import Callable

import streamlit as st

from views.common import gallery_store, presenting, set_url_state, show_user_errors, url_state


def _labels(text: str) -> dict[str, str]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("labels must be an object")
    return {str(k): str(v) for k, v in value.items()}


def node_labels() -> dict[str, str]:
    """User labels of nodes ({node: label}), kept in the URL as ``labels``."""
    return url_state("labels", {}, _labels)


def _parse_label_lines(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {node.strip(): label.strip() for node, label in pairs if node.strip() and label.strip()}


def save_panel(kind: str, default_title: str, result_json: Callable[[], str], supernodes: list | None = None) -> None:
    if presenting():
        return
    labels = node_labels()
    with st.expander("Save analysis, label nodes", expanded=False):
        text = st.text_area(
            "Node labels, one per line: node = label",
            "\n".join(f"{k} = {v}" for k, v in labels.items()),
            key=f"labels_editor_{kind}",
            placeholder="a23.h3 = name mover",
        )
        if _parse_label_lines(text) != labels:
            set_url_state("labels", _parse_label_lines(text), json.dumps)
            st.rerun()
        title = st.text_input("Title", value=default_title, key="save_title", max_chars=200)
        st.text_area("Notes (kept with the analysis and in exported figures)", key="save_notes", max_chars=20_000)
        if st.button("Save to the gallery", key="save_button"):
            selection = st.session_state.active
            url = {k: st.query_params.get(k) for k in st.query_params if k != "saved"}
            analysis = show_user_errors(
                gallery_store().save, kind, title, selection.model, selection.prompt, result_json(),
                notes=st.session_state.get("save_notes", ""), settings={"page": kind, "url": url},
                labels=labels, supernodes=supernodes or [])
            if analysis is not None:
                st.success(f"Saved as #{analysis}: open it from the Gallery page.")
