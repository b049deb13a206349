"""A figure as one standalone HTML file: plotly.js inlined (opens offline), with the
analysis title, its settings and notes, all HTML-escaped."""

from __future__ import annotations

import datetime
import html

import plotly.graph_objects as go


def figure_html(fig: go.Figure, title: str, settings: dict, notes: str = "") -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in settings.items())
    body = fig.to_html(include_plotlyjs=True, full_html=False, config={"displaylogo": False})
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    notes_html = f"<p class='notes'>{html.escape(notes)}</p>" if notes.strip() else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5rem}} table{{border-collapse:collapse;font-size:0.85rem}}
th,td{{border:1px solid #ddd;padding:2px 8px;text-align:left}} .notes{{white-space:pre-wrap}}</style></head>
<body><h1>{html.escape(title)}</h1>{notes_html}{body}
<h2>Settings</h2><table>{rows}</table><p><small>Exported by Circuitscope, {stamp}.</small></p></body></html>
"""
