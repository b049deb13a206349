"""The look of every figure. Figures are shown with ``theme=None``: Streamlit's own theme is
applied in the browser (a CPU profile of the heatmaps page in Chromium on 2 cores: Plotly's
code ran 0.81 s with it, 0.60-0.66 s without); this Plotly template gives the figures the
app's look on the server instead, on Plotly's bare defaults (plotly_white's per-trace
defaults made the circuit page slower to draw)."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

NAME = "circuitscope"
FONT = '"Source Sans", "Source Sans Pro", sans-serif'  # the app's own font (Streamlit's @font-face name)
TEXT = "#31333F"
GRID = "#e6eaf1"
HIGHLIGHT = "#d62728"  # the target token, negative values
BASE = "#1f77b4"  # other tokens, positive values
COLORWAY = ["#0068c9", "#ff2b2b", "#29b09d", "#ff8700", "#7defa1", "#83c9ff", "#6d3fc0", "#ffd16a", "#ffabab"]

TEMPLATE = go.layout.Template(layout={
    "font": {"family": FONT, "color": TEXT, "size": 13},
    "title": {"font": {"size": 16}},
    "colorway": COLORWAY,
    "paper_bgcolor": "white",
    "plot_bgcolor": "white",
    # automargin: the margins grow to fit the tick labels (Plotly's default is off; Streamlit's
    # theme had turned it on, and without it token and layer labels were clipped away). Growing
    # them costs a second layout pass; label_margins sets them beforehand so none is needed.
    "xaxis": {"gridcolor": GRID, "zerolinecolor": GRID, "linecolor": GRID, "automargin": True},
    "yaxis": {"gridcolor": GRID, "zerolinecolor": GRID, "linecolor": GRID, "automargin": True},
    "hoverlabel": {"font": {"family": FONT}},
})


def install() -> None:
    """Make the template the default for figures built from now on."""
    pio.templates[NAME] = TEMPLATE
    pio.templates.default = f"none+{NAME}"


# Sizes in px at the template's 13 px font (Source Sans, measured in Chromium), rounded up:
# too wide a margin leaves some white space, too narrow a one costs Plotly a second layout
# pass (labels are never clipped: automargin stays on).
NARROW_CHARS, NARROW_PX = set(" !'(),-./:;I[]fijlrt|·{}"), 4.0
WIDE_CHARS, WIDE_PX = set("%@MWmw…↵⏎"), 11.0
CHAR_PX = 7.5  # any other character (digits 6.5, capitals 6.2-8.6, other lower case 5.4-7.2)
LABEL_PAD_PX = 20  # between the plot and its tick labels, and beyond them
LABEL_GAP_PX = 8  # between side-by-side x labels
LINE_PX = 16  # one line of horizontal tick labels
TITLE_PX = 18  # an axis title
PLOT_PX = 600  # the plot width x labels are assumed to share (a page's half is ~500, all of it ~800)


def label_margins(fig: go.Figure, plot_px: float = PLOT_PX) -> go.Figure:
    """Widen the left and bottom margins (right and top for axes on that side) to fit the
    main axes' tick labels and titles, estimated from the figure itself. With the margins
    right beforehand, Plotly's automargin has nothing to grow and skips the second layout pass
    it otherwise runs on every draw: in Chromium on 2 cores, a circuit figure drew in ~80 ms
    instead of ~160 ms, a 31 x 14 grid in ~100 ms instead of ~240 ms. ``plot_px``: about how
    wide the plot will be (whether Plotly turns the x labels). Returns ``fig``."""
    margin = fig.layout.margin
    y_side = "r" if fig.layout.yaxis.side == "right" else "l"
    x_side = "t" if fig.layout.xaxis.side == "top" else "b"
    needed = {y_side: _axis_margin(fig, "y", plot_px), x_side: _axis_margin(fig, "x", plot_px)}
    fig.update_layout(margin={side: max(px, margin[side] or 0) for side, px in needed.items()})
    return fig


def text_px(text: str) -> float:
    """The width of ``text`` as a tick label, rounded up."""
    return sum(NARROW_PX if c in NARROW_CHARS else WIDE_PX if c in WIDE_CHARS else CHAR_PX for c in text)


def _axis_margin(fig: go.Figure, axis: str, plot_px: float) -> int:
    layout = fig.layout[f"{axis}axis"]
    labels = [] if layout.showticklabels is False or layout.visible is False else _tick_labels(fig, axis)
    widths = [text_px(label) for label in labels] or [0.0]
    title = TITLE_PX if layout.title.text else 0
    if axis == "y":
        return math.ceil(LABEL_PAD_PX + max(widths) + title)
    spacing = plot_px / max(len(labels), 1)
    if max(widths) + LABEL_GAP_PX <= spacing:  # side by side (Plotly turns them all if any two overlap)
        height = LINE_PX
    elif 2 * LINE_PX <= spacing:  # turned by 30 degrees
        height = max(widths) / 2 + LINE_PX
    else:  # by 90 degrees
        height = max(widths)
    return math.ceil(LABEL_PAD_PX + height + title) if labels else 0


def _tick_labels(fig: go.Figure, axis: str) -> list[str]:
    """The axis's tick texts; else its categories; else the round numbers Plotly would
    tick between the data's (or the range's) extremes."""
    layout = fig.layout[f"{axis}axis"]
    if layout.ticktext is not None:
        return [str(text) for text in layout.ticktext]
    categories: list[str] = []
    numbers: list[float] = []
    for trace in fig.data:
        values = getattr(trace, axis, None)
        if values is None or not len(values):
            continue
        if isinstance(values[0], str):
            categories += [str(value) for value in values]
            continue
        try:
            array = np.asarray(values, dtype=float)
        except (TypeError, ValueError):  # dates and other non-numbers: automargin alone sizes them
            continue
        finite = array[np.isfinite(array)]
        if finite.size:
            numbers += [float(finite.min()), float(finite.max())]
    if categories:
        return list(dict.fromkeys(categories))
    log = layout.type == "log"
    if layout.range is not None:
        numbers = [float(v) for v in layout.range if v is not None]
    elif log:
        numbers = [math.log10(v) for v in numbers if v > 0]
    if not numbers:
        return ["0.0"]
    low, high = min(numbers), max(numbers)
    if log:
        return [_number_text(10.0 ** power) for power in range(math.floor(low), math.ceil(high) + 1)]
    return _round_ticks(low, high)


def _round_ticks(low: float, high: float) -> list[str]:
    """About six ticks at 1, 2 or 5 times a power of ten, printed with the step's decimals."""
    raw = (high - low) / 6 or abs(high) or 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    decimals = max(0, -math.floor(math.log10(step)))
    ticks = np.arange(math.ceil(low / step) * step, high + step / 2, step)
    return [_number_text(round(float(t), decimals), decimals) for t in ticks]


def _number_text(value: float, decimals: int | None = None) -> str:
    """A tick number about as Plotly prints it: SI suffixes from 10,000 (3 significant digits)."""
    if abs(value) >= 1e4:
        power, suffix = next((p, s) for p, s in ((9, "G"), (6, "M"), (3, "k")) if abs(value) >= 10 ** p)
        text = f"{value / 10 ** power:.3g}{suffix}"
    else:
        text = f"{value:.{decimals}f}" if decimals is not None else f"{value:.3g}"
    return text.replace("-", "−")
