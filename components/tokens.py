"""Token displays: visible whitespace, chips with positions and ids, a table, next-token bars."""

from __future__ import annotations

import html
import re

from .theme import BASE, HIGHLIGHT


def visible(token: str) -> str:
    """Make leading/trailing spaces and newlines visible: ' Paris' -> '␣Paris'."""
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def token_chips_html(tokens: list[str], ids: list[int]) -> str:
    """Inline chips: the token text with its position and id underneath."""
    chips = []
    for pos, (token, token_id) in enumerate(zip(tokens, ids)):
        chips.append(
            "<span style='display:inline-block;margin:2px;padding:2px 6px;border:1px solid #ccc;"
            "border-radius:6px;font-family:monospace;text-align:center'>"
            f"{html.escape(visible(token))}<br><small style='color:#888'>{pos} · #{token_id}</small></span>"
        )
    return "".join(chips)


RESULT_CLASS = "cs-result"  # an HTML result figure (bench/ times its first paint like a chart's)


def probability_bars_html(predictions: list[dict], highlight_id: int | None = None) -> str:
    """Next-token probabilities as a table of bars, most likely first, each bar's length
    relative to the top probability; ``highlight_id``'s row in red. Plain HTML, so it is drawn
    with the page instead of after Plotly's 4.7 MB script (1.5-2 s on a fresh page load)."""
    top = max((p["prob"] for p in predictions), default=0.0) or 1.0
    rows = []
    for rank, p in enumerate(predictions, 1):
        colour = HIGHLIGHT if p["id"] == highlight_id else BASE
        rows.append(
            f"<tr><td style='color:#888;text-align:right'>{rank}</td>"
            f"<td style='font-family:monospace;white-space:pre'>{html.escape(visible(p['token']))} "
            f"<small style='color:#888'>#{p['id']}</small></td>"
            f"<td style='width:55%'><div style='background:{colour};height:0.9em;width:{100 * p['prob'] / top:.1f}%'>"
            f"</div></td><td style='text-align:right;font-variant-numeric:tabular-nums'>{p['prob']:.3f}</td></tr>")
    return (f"<table class='{RESULT_CLASS}' style='width:100%;border-collapse:collapse'>"
            "<tr><th>#</th><th>token (id)</th><th></th><th>p</th></tr>" + "".join(rows) + "</table>")


def token_rows(tokens: list[str], ids: list[int]) -> list[dict]:
    """Rows for a table: position, token (visible whitespace) and id."""
    return [{"position": p, "token": visible(t), "id": i} for p, (t, i) in enumerate(zip(tokens, ids))]


def escape_markdown(text: str) -> str:
    """Text shown literally inside st.markdown (prompts may contain *, _, #, [, ...)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$])", r"\\\1", text).replace("\n", "  \n")
