"""Circuitscope backend: all computation, no streamlit. Usable from Python and the CLI."""

from backend.errors import UserInputError

__all__ = ["UserInputError"]
