"""The one exception type for mistakes a user can fix (bad prompt, unknown model, ...), and
the plain message for running out of memory."""


class UserInputError(Exception):
    """A plain one-line message for the user; pages show it with st.error, the CLI exits 2."""


OUT_OF_MEMORY = ("Out of memory while computing this analysis: try a shorter prompt, fewer nodes (K) or fewer "
                 "steps. Nothing was saved or changed; the model is ready for the next request.")


def is_out_of_memory(exc: BaseException) -> bool:
    """Host (MemoryError) or accelerator (torch.OutOfMemoryError, 'out of memory' RuntimeError)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
