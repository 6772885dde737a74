"""User-facing errors: one line that says what to change, never a deep traceback."""


class GenlabError(Exception):
    """An error caused by the user's input (config, data, paths); the CLI prints it as one line."""
