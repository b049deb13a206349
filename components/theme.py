"""The look of every figure. Figures are shown with ``theme=None``: Streamlit's own theme is
applied in the browser (a CPU profile of the heatmaps page in Chromium on 2 cores: Plotly's
code ran 0.81 s with it, 0.60-0.66 s without); this Plotly template gives the figures the
app's look on the server instead, on Plotly's bare defaults (plotly_white's per-trace
defaults made the circuit page slower to draw)."""

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
    # automargin: the margins grow to fit the tick labels (Plotly's default is off; Streamlit's
    # theme had turned it on, and without it token and layer labels were clipped away)
    "xaxis": {"gridcolor": GRID, "zerolinecolor": GRID, "linecolor": GRID, "automargin": True},
    "yaxis": {"gridcolor": GRID, "zerolinecolor": GRID, "linecolor": GRID, "automargin": True},
    "hoverlabel": {"font": {"family": FONT}},
})


def install() -> None:
    """Make the template the default for figures built from now on."""
    pio.templates[NAME] = TEMPLATE
    pio.templates.default = f"none+{NAME}"
