"""User-facing errors: the CLI prints their message on one line, never a traceback."""


class MuseumError(Exception):
    """A problem with the user's input (file, row, field) and what to do about it."""
