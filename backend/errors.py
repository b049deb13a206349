"""The one exception type for mistakes a user can fix (bad prompt, unknown model, ...)."""


class UserInputError(Exception):
    """A plain one-line message for the user; pages show it with st.error, the CLI exits 2."""
