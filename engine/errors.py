"""The one exception type users see: it names the input that was wrong and what to do about it."""


class TributaryError(Exception):
    """A bad input or an unusable state, described for the person who has to fix it."""
