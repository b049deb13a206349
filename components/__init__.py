"""Rendering of plain data (lists, dicts, numpy arrays) with plotly and streamlit; no torch."""
