"""Token ids with a loss mask: prompt tokens get label -100, completion (or all text) tokens count;
chat rows go through the tokenizer's chat template and only assistant tokens count (engine/data/chat.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.data.chat import tokenize_chat
from engine.data.labels import IGNORE
from engine.data.rows import Row
from engine.data.token_ids import checked_token_row
from engine.errors import TributaryError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedRow:
    index: int
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token carries no loss

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


PAST_THE_CUT = 16  # tokens kept past max_length when a long text is tokenised by its prefix
CHARS_PER_TOKEN_GUESS = 8


def _encode(tokenizer, text: str, special: bool, needed: int | None = None) -> list[int]:
    """The token ids of `text`, or, when `needed` is given and the text is long, more than `needed` leading
    ids of it: only the first max_length tokens are kept, and tokenising a 10 MB row whole took over a GB.

    The prefix tokenised grows until its ids run PAST_THE_CUT tokens beyond `needed`, so the tokens the cut
    can change (those at its end) are never among the ones kept."""
    if needed is not None:
        chars = (needed + PAST_THE_CUT) * CHARS_PER_TOKEN_GUESS
        while chars < len(text):
            ids = list(tokenizer(text[:chars], add_special_tokens=special)["input_ids"])
            if len(ids) > needed + PAST_THE_CUT:
                return ids[: needed + PAST_THE_CUT]
            chars *= 2
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_row(
    row: Row, tokenizer, max_length: int, source: str, vocab_size: int | None = None
) -> tuple[TokenizedRow, bool]:
    """Tokenise one row; returns the row and whether it was truncated to `max_length`.

    Prompt and completion are tokenised separately (prompt with the tokenizer's special tokens,
    completion without) so the boundary between them is exact. A chat row is rendered with the
    tokenizer's chat template; only its assistant tokens carry loss (engine/data/chat.py has the rule).
    A pre-tokenized row is used as given, its ids checked against `vocab_size` (default: the tokenizer's).
    """
    where = row.location(source)
    if row.input_ids is not None:
        ids, labels, truncated = checked_token_row(
            row.input_ids, row.labels, vocab_size or len(tokenizer), max_length, where
        )
        tokenized = TokenizedRow(index=row.index, input_ids=ids, labels=labels)
        if tokenized.num_loss_tokens == 0:
            raise TributaryError(f"{where}: no label after the first token carries loss (all are -100)")
        return tokenized, truncated
    if row.messages is not None:
        ids, labels = tokenize_chat(row.messages, tokenizer, where)
        truncated = len(ids) > max_length
        tokenized = TokenizedRow(index=row.index, input_ids=ids[:max_length], labels=labels[:max_length])
        if tokenized.num_loss_tokens == 0:
            raise TributaryError(
                f"{where}: the conversation is {len(ids)} tokens and no assistant token remains within "
                f"data.max_length={max_length}; shorten the turns before the first assistant reply or raise "
                "data.max_length"
            )
        return tokenized, truncated
    if row.text is not None:
        ids = _encode(tokenizer, row.text, special=True, needed=max_length)
        if len(ids) < 2:
            raise TributaryError(
                f"{where}: text has {len(ids)} token(s); at least 2 are needed for one next-token loss"
            )
        labels = list(ids)
    else:
        prompt_ids = _encode(tokenizer, row.prompt or "", special=True, needed=max_length)
        completion_ids = _encode(tokenizer, row.completion or "", special=False, needed=max_length)
        if not completion_ids:
            raise TributaryError(f"{where}: completion has no tokens; give it text")
        if len(prompt_ids) >= max_length:
            raise TributaryError(
                f"{where}: prompt is {'at least ' * (len(prompt_ids) >= max_length + PAST_THE_CUT)}"
                f"{len(prompt_ids)} tokens, not shorter than data.max_length={max_length}, "
                "so no completion token would remain; shorten the prompt or raise data.max_length"
            )
        ids = prompt_ids + completion_ids
        labels = [IGNORE] * len(prompt_ids) + completion_ids
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    tokenized = TokenizedRow(index=row.index, input_ids=ids, labels=labels)
    if tokenized.num_loss_tokens == 0:
        raise TributaryError(
            f"{where}: no token carries loss (the first token is never predicted); add a prompt or more text"
        )
    return tokenized, truncated


def tokenize_rows(
    rows: list[Row],
    tokenizer,
    max_length: int,
    source: str,
    log_truncation: bool = True,
    vocab_size: int | None = None,
) -> list[TokenizedRow]:
    """`vocab_size`: the model's, that pre-tokenized rows' ids are checked against (default: the tokenizer's)."""
    out = []
    truncated = 0
    for row in rows:
        tokenized, was_truncated = tokenize_row(row, tokenizer, max_length, source, vocab_size)
        out.append(tokenized)
        truncated += was_truncated
    if truncated and log_truncation:
        log.warning(
            "%s: %d of %d rows were longer than max_length=%d and were truncated",
            source,
            truncated,
            len(rows),
            max_length,
        )
    return out
