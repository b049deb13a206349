"""Glue for units on every page: the neuron dashboard (from the corpus index), the index's
status with progress while it is built in the background, labels for graph nodes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import streamlit as st

from backend.analyses.neurons import neuron_view
from backend.runtime.models import ModelHandle
from backend.units.corpus import Corpus, corpus_from
from backend.units.dashboard import auto_labels, unit_dashboard
from backend.units.labels import label_key
from backend.units.service import ensure_building, find_index, index_status, job_for
from backend.units.unitset import Neurons, UnitSet
from components.neuron_panel import neuron_panel
from components.unit_view import unit_view
from views.common import gallery_store, show_user_errors, url_state


def active_corpus() -> Corpus:
    """The corpus the dashboards read (``?corpus=FILE``; default: the State of the Union corpus)."""
    name = url_state("corpus", "")
    return show_user_errors(corpus_from, name) or corpus_from(None)


def load_prompt(text: str) -> None:
    """on_click: make ``text`` the sidebar's prompt (the sidebar validates it on the rerun)."""
    st.session_state.prompt_input = text
    st.session_state.target_input = ""


def edited_labels(handle: ModelHandle, units: UnitSet | None = None) -> dict[str, str]:
    return show_user_errors(lambda: gallery_store().unit_labels(label_key(handle, units))) or {}


def save_label(handle: ModelHandle, name: str, text: str, units: UnitSet | None = None) -> None:
    show_user_errors(lambda: gallery_store().set_unit_label(label_key(handle, units), name, text))


def unit_panel(handle: ModelHandle, prompt_text: str, layer: int, neuron: int, key: str,
               units: UnitSet | None = None) -> None:
    """The unit's dashboard (a neuron, or a transcoder feature with ``units``); while its
    index does not exist yet, a neuron on this prompt and the index's build status (the
    build starts in the background on first need)."""
    corpus = active_corpus()
    index = show_user_errors(find_index, handle, corpus, units)
    if index is None:
        index_status_box(handle, corpus, key, start=True, units=units)
        view = None if units is not None else show_user_errors(neuron_view, handle, prompt_text, layer, neuron)
        if view is not None:
            neuron_panel(view.tokens, view.activations, view.promotes, view.suppresses, f"{key}_plain", as_text=True)
        return
    name = (units or Neurons.of(handle)).name(layer, neuron)
    started = time.perf_counter()
    dashboard = show_user_errors(unit_dashboard, handle, index, layer, neuron, units=units, prompt=prompt_text,
                                 edited_label=edited_labels(handle, units).get(name))
    if dashboard is None:
        return
    unit_view(dashboard.to_dict(), key, on_load=load_prompt,
              on_label=lambda text: save_label(handle, name, text, units))
    st.caption(f"Dashboard read in {1000 * (time.perf_counter() - started):.0f} ms.")


def index_status_box(handle: ModelHandle, corpus: Corpus, key: str, start: bool = False,
                     units: UnitSet | None = None) -> None:
    """Where the index stands, refreshed every 2 s until it is complete (then the page is
    redrawn with it); ``start``: begin building
    it in the background when it does not exist (pages keep working meanwhile;
    CIRCUITSCOPE_INDEX_AUTOBUILD=0 leaves that to the Build button)."""
    status = show_user_errors(index_status, handle, corpus, units=units)
    if status is None:
        return
    if status["state"] == "ready":  # nothing to follow: no polling
        st.caption(f"Index: {status['message']}.")
        return
    if start and status["state"] == "missing" and os.environ.get("CIRCUITSCOPE_INDEX_AUTOBUILD", "1") != "0":
        show_user_errors(ensure_building, handle, corpus, units=units)

    @st.fragment(run_every=2.0)
    def live() -> None:
        current = index_status(handle, corpus, units=units)
        state = current["state"]
        if state == "ready":  # it was just completed: redraw the page, now with the dashboards
            st.rerun()
        if state == "building":
            st.progress(min(1.0, current["fraction"]), text=f"index {100 * current['fraction']:.0f}% built — "
                                                              f"{current['message']}")
            st.caption(f"Corpus: {corpus.title}. Top examples, bins and histograms appear when it is complete; "
                       "everything else works meanwhile.")
            job = job_for(Path(current["directory"]))
            if job is not None and st.button("Stop building", key=f"{key}_stop_index",
                                             help="Keeps what is done: building again resumes there."):
                job.cancel.set()
            return
        st.warning(f"Index of {corpus.title}: {current['message']}")
        if st.button("Build the index" if state == "missing" else "Resume building", key=f"{key}_build_index"):
            show_user_errors(ensure_building, handle, corpus, units=units)

    live()


def neuron_labels(handle: ModelHandle, neurons: list[tuple[int, int]],
                  units: UnitSet | None = None) -> dict[tuple[int, int], str]:
    """Labels {(layer, unit): label} of these neurons (or features of ``units``): edited ones,
    else automatic (needs the index); empty when there is no index yet."""
    index = show_user_errors(find_index, handle, active_corpus(), units)
    if index is None or not neurons:
        return {}
    wanted = list(dict.fromkeys(neurons))
    automatic = show_user_errors(auto_labels, handle, index, wanted, units) or {}
    edited = edited_labels(handle, units)
    units = units or Neurons.of(handle)
    named = {(layer, neuron): units.name(layer, neuron) for layer, neuron in wanted}
    return {key: edited.get(name) or automatic.get(name, "") for key, name in named.items()
            if edited.get(name) or automatic.get(name)}
