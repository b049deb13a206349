"""Replacement models: transcoders read from circuit-tracer's formats or fitted here."""
