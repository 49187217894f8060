"""The one exception type users see: it names the input that was wrong and what to do about it."""

SHOWN_CHARS = 200  # of a user's value an error message repeats: a 900 kB method name is not echoed whole


class TributaryError(Exception):
    """A bad input or an unusable state, described for the person who has to fix it."""


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` as an error message quotes it (its repr), cut to `limit` characters with its full length said,
    as a record cuts an echoed query (engine.query.records)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[:limit]}… ({length})"


def shown_name(name: str, limit: int = SHOWN_CHARS) -> str:
    """A key or field path as a message names it (unquoted), cut like `shown`."""
    return name if len(name) <= limit else f"{name[:limit]}… ({len(name)} characters)"
