"""Token displays: visible whitespace, chips with positions and ids, a table."""

from __future__ import annotations

import html
import re


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


def token_rows(tokens: list[str], ids: list[int]) -> list[dict]:
    """Rows for a table: position, token (visible whitespace) and id."""
    return [{"position": p, "token": visible(t), "id": i} for p, (t, i) in enumerate(zip(tokens, ids))]


def escape_markdown(text: str) -> str:
    """Text shown literally inside st.markdown (prompts may contain *, _, #, [, ...)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$])", r"\\\1", text).replace("\n", "  \n")
