"""The look of every figure. Figures are shown with ``theme=None``: Streamlit's own theme is
applied in the browser and cost it ~0.5 s per heatmap on 2 cores (Chromium, measured on the
heatmaps page); this Plotly template gives the figures the app's look on the server instead."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

NAME = "circuitscope"
FONT = '"Source Sans Pro", "Source Sans 3", sans-serif'  # the app's own font
TEXT = "#31333F"
GRID = "#e6eaf1"
COLORWAY = ["#0068c9", "#ff2b2b", "#29b09d", "#ff8700", "#7defa1", "#83c9ff", "#6d3fc0", "#ffd16a", "#ffabab"]

TEMPLATE = go.layout.Template(layout={
    "font": {"family": FONT, "color": TEXT, "size": 13},
    "title": {"font": {"size": 16}},
    "colorway": COLORWAY,
    "paper_bgcolor": "white",
    "plot_bgcolor": "white",
    "xaxis": {"gridcolor": GRID, "zerolinecolor": GRID, "linecolor": GRID},
    "yaxis": {"gridcolor": GRID, "zerolinecolor": GRID, "linecolor": GRID},
    "hoverlabel": {"font": {"family": FONT}},
})


def install() -> None:
    """Make the template the default for figures built from now on (plotly_white underneath)."""
    pio.templates[NAME] = TEMPLATE
    pio.templates.default = f"plotly_white+{NAME}"
