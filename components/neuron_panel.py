"""One neuron, as every page shows it: activation over the prompt, promoted and suppressed tokens."""

from __future__ import annotations

import streamlit as st

from .charts import activation_bars, token_score_table
from .heatmap import coloured_tokens_html


def neuron_panel(tokens: list[str], activations, promotes: list[dict], suppresses: list[dict], key: str,
                 as_text: bool = False) -> None:
    """``as_text``: colour the prompt's tokens instead of drawing a bar chart."""
    if as_text:
        st.markdown(coloured_tokens_html(tokens, activations), unsafe_allow_html=True)
    else:
        st.plotly_chart(activation_bars(tokens, activations, "Activation over the prompt"), key=key, theme=None)
    promote, suppress = st.columns(2)
    promote.markdown("**Promotes**")
    promote.dataframe(token_score_table(promotes), hide_index=True)
    suppress.markdown("**Suppresses**")
    suppress.dataframe(token_score_table(suppresses), hide_index=True)
