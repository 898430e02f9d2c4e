"""The one exception type a user sees: main.py prints its message on one line and exits non-zero."""


class LayerpressError(Exception):
    """Bad input or an impossible setting, explained in one line that says what to do."""
