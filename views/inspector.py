"""Prompt inspector: tokens, next-token distribution, target probability/rank, continuation,
and what the document-start token changes."""

import streamlit as st

from backend.analyses.inspect_prompt import inspect_prompt
from backend.runtime.prompts import with_bos
from components.tokens import escape_markdown, probability_bars_html, token_chips_html, token_rows, visible
from views.common import current, show_user_errors

st.title("Prompt inspector")
selection, handle = current()
n_continue = st.number_input("Greedy continuation length (tokens)", 0, 200, 20, step=5)

# First what one forward gives (tokens, the distribution), then the slower parts: the greedy
# continuation and the comparison without the document-start token fill in below.
result = show_user_errors(inspect_prompt, handle, selection.text, selection.target or None, 0)
if result is not None:
    st.markdown(token_chips_html(result.tokens, result.token_ids), unsafe_allow_html=True)
    target = result.target
    cols = st.columns(4)
    cols[0].metric("Tokens", len(result.tokens))
    cols[1].metric("Target", visible(target["token"]))
    cols[2].metric("p(target)", f"{target['prob']:.3f}")
    cols[3].metric("Rank of target", target["rank"])
    comparison = st.empty()
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Next-token distribution (top 20)")
        st.markdown(probability_bars_html(result.top_predictions, target["id"]), unsafe_allow_html=True)
    with right:
        st.subheader("Greedy continuation")
        st.caption(escape_markdown(selection.prompt) + " …")
        continuation = st.empty()
        st.subheader("Tokens")
        st.dataframe(token_rows(result.tokens, result.token_ids), hide_index=True)
    if n_continue:
        with continuation, st.spinner("Generating…"):
            longer = show_user_errors(inspect_prompt, handle, selection.text, selection.target or None,
                                      int(n_continue))
        if longer is not None:
            continuation.code(longer.continuation, language=None, wrap_lines=True)
    without = with_bos(handle, selection.prompt, "off")
    if without != selection.text:
        plain = show_user_errors(inspect_prompt, handle, without, target["token"], 0)
        if plain is not None:
            same = plain.top_predictions[0]["id"] == result.top_predictions[0]["id"]
            comparison.caption(f"Without the document-start token {result.tokens[0]!r}: p({visible(target['token'])})"
                               f" = {plain.target['prob']:.3f} (rank {plain.target['rank']}); top prediction "
                               f"{visible(plain.top_predictions[0]['token'])}"
                               + (" — the same." if same else " — it changed."))
