"""Pre-tokenized rows: `input_ids`, with optional `labels` (-100 = no loss) and `attention_mask`, used as given.

Pretraining and packed fine-tuning data arrive as token ids; decoding and re-encoding them changes some rows
(a BPE does not round-trip every id sequence), so they are never sent through the tokenizer. `labels` follow
the transformers convention: aligned with `input_ids`, the shift to next-token targets happens in the loss.
An `attention_mask` may mark padding at either end of the row, which is dropped; a hole inside it is refused.
"""

from __future__ import annotations

from engine.data.labels import IGNORE
from engine.errors import TributaryError

INPUT_IDS = "input_ids"
LABELS = "labels"
ATTENTION_MASK = "attention_mask"


def _int_list(value: object, field: str, where: str) -> list[int]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TributaryError(f"{where}: field '{field}' must be a list of integers")
    return list(value)


def token_ids_of(record: dict, where: str) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(input_ids, labels or None) of a pre-tokenized record, padding at its ends removed."""
    ids = _int_list(record[INPUT_IDS], INPUT_IDS, where)
    labels = _int_list(record[LABELS], LABELS, where) if record.get(LABELS) is not None else None
    mask = _int_list(record[ATTENTION_MASK], ATTENTION_MASK, where) if record.get(ATTENTION_MASK) is not None else None
    for field, values in ((LABELS, labels), (ATTENTION_MASK, mask)):
        if values is not None and len(values) != len(ids):
            raise TributaryError(f"{where}: field '{field}' has {len(values)} entries for {len(ids)} input_ids")
    if any(i < 0 for i in ids):
        raise TributaryError(f"{where}: field '{INPUT_IDS}' holds a negative token id")
    if labels is not None and any(label < 0 and label != IGNORE for label in labels):
        raise TributaryError(f"{where}: field '{LABELS}' holds a negative label other than {IGNORE} (no loss)")
    if mask is not None:
        if any(m not in (0, 1) for m in mask):
            raise TributaryError(f"{where}: field '{ATTENTION_MASK}' must hold only 0 and 1")
        kept = [p for p, m in enumerate(mask) if m == 1]
        if not kept or kept[-1] - kept[0] + 1 != len(kept):
            raise TributaryError(
                f"{where}: field '{ATTENTION_MASK}' has zeros between ones; only padding at the ends of a row is "
                "supported (split packed sequences into rows)"
            )
        ids = ids[kept[0] : kept[-1] + 1]
        labels = None if labels is None else labels[kept[0] : kept[-1] + 1]
    return tuple(ids), None if labels is None else tuple(labels)


def checked_token_row(
    input_ids: tuple[int, ...], labels: tuple[int, ...] | None, vocab_size: int, max_length: int, where: str
) -> tuple[list[int], list[int], bool]:
    """(ids, labels, truncated) of a pre-tokenized row checked against the model's vocabulary and cut to
    max_length; labels default to the ids (every token after the first counts)."""
    too_large = [i for i in input_ids if i >= vocab_size]
    if too_large:
        raise TributaryError(
            f"{where}: token id {max(too_large)} is not below the model's vocabulary size {vocab_size}; the ids "
            "were made with another tokenizer"
        )
    if labels is not None:
        outside = [label for label in labels if label >= vocab_size]
        if outside:
            raise TributaryError(f"{where}: label {max(outside)} is not below the model's vocabulary size {vocab_size}")
    ids = list(input_ids)
    targets = list(labels) if labels is not None else list(ids)
    if len(ids) < 2:
        raise TributaryError(
            f"{where}: input_ids has {len(ids)} token(s); at least 2 are needed for one next-token loss"
        )
    return ids[:max_length], targets[:max_length], len(ids) > max_length
