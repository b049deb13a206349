"""A unit's dashboard as every page shows it (graph node panel, heatmaps, paths, interventions,
the Units page): label (editable), density, its activation on the prompt beside the corpus
range, top examples, examples per activation bin, histogram, logit effects.

Works on the dashboard's plain dict (``UnitDashboard.to_dict()``); callbacks load an example
as the prompt and save an edited label.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from .charts import unit_histogram
from .heatmap import coloured_tokens_html
from .tokens import escape_markdown


def unit_view(dashboard: dict, key: str, on_load: Callable[[str], None] | None = None,
              on_label: Callable[[str], None] | None = None) -> None:
    d = dashboard
    label = d["label"] or d["auto_label"]
    st.markdown(f"**{d['name']}** · {escape_markdown(label)}")
    if on_label is not None:
        _label_editor(d, key, on_label)
    corpus_max = d["max_act"]
    metrics = st.columns(3)
    metrics[0].metric("Corpus max", f"{corpus_max:.3g}")
    metrics[1].metric("Density (act > 0)", f"{100 * d['density']:.1f}%")
    prompt = d.get("prompt")
    if prompt:
        share = prompt["max"] / corpus_max if corpus_max > 0 else 0.0
        metrics[2].metric("Max on this prompt", f"{prompt['max']:.3g}", f"{100 * share:.0f}% of corpus max",
                          delta_color="off")
        st.markdown(coloured_tokens_html(prompt["tokens"], prompt["acts"], bound=corpus_max or None,
                                         mark=prompt["max_pos"]), unsafe_allow_html=True)
        st.caption("This prompt on the corpus scale (full colour = the corpus maximum); outlined: its maximum.")
    corpus = d["corpus"]
    st.caption(f"Corpus: {corpus['title']}, {corpus.get('tokens') or 0:,} tokens in {corpus['documents']:,} "
               "documents. Pick an example and Load it to make it the prompt.")
    tabs = st.tabs(["Top examples", "By activation level", "Histogram", "Logit effects"])
    with tabs[0]:
        _examples(d["top_examples"], corpus_max, f"{key}_top", on_load)
    with tabs[1]:
        _bins(d["bin_examples"], corpus_max, f"{key}_bins", on_load)
    with tabs[2]:
        marks = {"corpus max": corpus_max, **({"this prompt": prompt["max"]} if prompt else {})}
        st.plotly_chart(unit_histogram(d["histogram"], marks), key=f"{key}_hist", theme=None)
        hist = d["histogram"]
        st.caption(f"All {hist['total']:,} indexed tokens; {hist['about_zero']:,} about zero. {hist['scale']}.")
    with tabs[3]:
        promote, suppress = st.columns(2)
        promote.markdown("**Promotes** (direct path)")
        promote.dataframe([{"token": t, "logit effect": round(v, 4)} for t, v in d["top_logits"]], hide_index=True)
        suppress.markdown("**Suppresses**")
        suppress.dataframe([{"token": t, "logit effect": round(v, 4)} for t, v in d["bottom_logits"]], hide_index=True)
        st.caption("Logit change per unit of activation through the final norm's weight and the unembedding, "
                   "relative to the mean over the vocabulary.")


def _label_editor(d: dict, key: str, on_label: Callable[[str], None]) -> None:
    with st.popover("Edit label"):
        text = st.text_input("Label", value=d["label"], key=f"{key}_label_text", max_chars=200,
                             help=f"Automatic: {d['auto_label']}. Empty = back to the automatic label.")
        if st.button("Save label", key=f"{key}_label_save"):
            on_label(text.strip())
            st.rerun()


def _example_lines(examples: list[dict], bound: float, first: int = 1) -> str:
    lines = []
    for number, example in enumerate(examples, start=first):
        sink = {0} if example.get("sink") else set()
        lines.append(f"<div style='line-height:1.9;margin-bottom:4px'><b>#{number}</b> "
                     f"<span style='color:#555'>{example['max_act']:.3g}</span>&nbsp; "
                     + coloured_tokens_html(example["tokens"], example["acts"], bound=bound or None,
                                            mark=example["max_pos"], dim=sink, as_text=True) + "</div>")
    return "".join(lines)


def _load_picker(examples: list[dict], key: str, on_load: Callable[[str], None] | None) -> None:
    """One picker and one button (not a button per example: a page stays light)."""
    if not on_load or not examples:
        return
    row = st.columns([3, 1])
    number = row[0].selectbox("Example", list(range(1, len(examples) + 1)), key=f"{key}_pick",
                              format_func=lambda n: f"#{n}  ({examples[n - 1]['max_act']:.3g})",
                              label_visibility="collapsed")
    row[1].button("Load as prompt", key=f"{key}_load", on_click=on_load, args=(examples[number - 1]["text"],),
                  help="Make this document (up to the example window's end) the prompt.")


def _examples(examples: list[dict], bound: float, key: str, on_load: Callable[[str], None] | None) -> None:
    if not examples:
        st.info("No example: this unit never had a positive activation in the indexed corpus.")
        return
    _load_picker(examples, key, on_load)
    st.html(_example_lines(examples, bound))  # st.html: no markdown parsing of ~600 spans (much faster to draw)


def _bins(examples: list[dict], bound: float, key: str, on_load: Callable[[str], None] | None) -> None:
    if not examples:
        st.info("No example in any bin.")
        return
    ordered = sorted(examples, key=lambda e: -e["bin"])  # highest bin first; the picker numbers them this way
    _load_picker(ordered, key, on_load)
    parts, number = [], 1
    for b in sorted({e["bin"] for e in ordered}, reverse=True):
        members = [e for e in ordered if e["bin"] == b]
        low, high = members[0]["low"], members[0]["high"]
        share = f" ({100 * low / bound:.0f}–{100 * high / bound:.0f}% of the corpus max)" if bound > 0 else ""
        parts.append(f"<p style='margin:8px 0 2px 0'><b>{low:.3g} – {high:.3g}</b>{share}</p>"
                     + _example_lines(members, bound, first=number))
        number += len(members)
    st.html("".join(parts))
