"""The one exception type a user sees: main.py prints its message on one line and exits non-zero."""


class LayerpressError(Exception):
    """Bad input or an impossible setting, explained in one line that says what to do."""


class RankFollows(LayerpressError):
    """Under torchrun, a rank stopping on an error another rank (rank 0) already reports: it exits without a line."""
