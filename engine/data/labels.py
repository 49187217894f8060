"""The label of a token that carries no loss (prompt, padding, non-assistant chat turns)."""

IGNORE = -100
