"""Chat rows: `{"messages": [{"role": ..., "content": ...}, ...]}` through the tokenizer's chat template.

Which tokens carry loss (the label rule)
----------------------------------------
Only the assistant turns are trained on. For every assistant message, the tokens of its **content**
count, and so does the template's **end-of-turn token** when the template writes one right after the
content (only whitespace in between): `<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>` ... — the
model learns to stop, as it does in chat fine-tuning. Whitespace tokens between the content and that
end-of-turn token count too (they are part of what the model generates before stopping). Everything
else carries label -100: the system and user turns, the role headers (`<|im_start|>assistant\\n`),
and whatever the template writes after the end-of-turn token (a trailing newline).

How the assistant tokens are found
----------------------------------
* If the template marks assistant text with `{% generation %} ... {% endgeneration %}` (what
  `return_assistant_tokens_mask` uses), exactly the tokens overlapping the marked text count: the
  template's author chose the span, and the end-of-turn rule above does not apply.
* Otherwise the conversation is rendered incrementally: for assistant message i, `messages[:i]` with the
  generation prompt (P), `messages[:i+1]` (F) and the whole conversation must each be a text prefix of
  the next. The content is located in F after P, where the template puts a placeholder content
  (verbatim, or stripped, as templates that `trim` render it). The whole conversation is tokenised
  once with character offsets and a token counts when its character span overlaps the content (so a
  BPE token like " the" that also holds the template's space before the content counts whole); then
  the end-of-turn rule above is applied. A template that rewrites earlier turns when later ones are
  added (the prefixes fail) or rewrites the content is refused with an error suggesting
  `{% generation %}` markers.

The conversation is tokenised as `apply_chat_template` does (`add_special_tokens=False`: a template
writes its own BOS), so the token ids equal `tokenizer.apply_chat_template(messages)`.
"""

from __future__ import annotations

import re

from engine.data.labels import IGNORE
from engine.errors import TributaryError

ROLES = ("system", "user", "assistant")
Messages = tuple[tuple[str, str], ...]  # (role, content) pairs

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def parse_messages(value: object, where: str, field: str) -> Messages:
    """Validate a row's message list; every problem is a TributaryError naming `where` and the message."""
    if not isinstance(value, list):
        raise TributaryError(
            f"{where}: field '{field}' must be a list of messages "
            '{"role": "system|user|assistant", "content": "..."}'
            f", got {type(value).__name__}"
        )
    if not value:
        raise TributaryError(
            f"{where}: field '{field}' is an empty list; give the conversation's messages or remove the row"
        )
    messages = []
    for k, message in enumerate(value):
        name = f"{field}[{k}]"
        if not isinstance(message, dict):
            raise TributaryError(
                f"{where}: {name} must be an object with 'role' and 'content', got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise TributaryError(
                    f"{where}: {name} has no '{key}' (keys: {sorted(message)}); every message needs 'role' "
                    "(system, user or assistant) and 'content'"
                )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise TributaryError(
                f"{where}: {name} has unknown role {role!r}; use system, user or assistant "
                "(rename the role or drop the message)"
            )
        if not isinstance(content, str):
            raise TributaryError(f"{where}: {name} ({role}) 'content' must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise TributaryError(
                f"{where}: {name} is an assistant turn with empty content; nothing of it would carry loss — "
                "give it text or remove the turn"
            )
        messages.append((role, content))
    if not any(role == "assistant" for role, _ in messages):
        raise TributaryError(
            f"{where}: conversation in '{field}' has no assistant turn, so no token would carry loss; "
            "add an assistant message or use a text row"
        )
    return tuple(messages)


def display(messages: Messages) -> str:
    return "\n".join(f"{role}: {content}" for role, content in messages)


def _as_dicts(messages: Messages) -> list[dict]:
    return [{"role": role, "content": content} for role, content in messages]


def _template_errors() -> tuple[type[BaseException], ...]:
    from jinja2 import TemplateError

    return (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError)


def _render(tokenizer, messages: Messages, where: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            _as_dicts(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except _template_errors() as error:  # jinja errors, raise_exception() in templates
        raise TributaryError(
            f"{where}: the chat template of model.path's tokenizer rejected this conversation "
            f"({type(error).__name__}: {error}); fix the row (e.g. the order of roles)"
        ) from None


def _template_refused(where: str, message_index: int, why: str) -> TributaryError:
    return TributaryError(
        f"{where}: cannot tell which tokens belong to the assistant message at index {message_index}: {why}; add "
        "{% generation %} ... {% endgeneration %} markers around assistant text in the chat template, "
        "or use prompt/completion rows"
    )


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids


def tokenize_chat(messages: Messages, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels are -100 except on assistant tokens (see module doc)."""
    if not has_chat_template(tokenizer):
        raise TributaryError(
            f"{where}: chat row, but model.path's tokenizer has no chat template; use prompt/completion rows "
            "or a chat model"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise TributaryError(
            f"{where}: chat rows need a fast (Rust) tokenizer for model.path, to map the "
            "assistant text to tokens; use a model with a tokenizer.json"
        )
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if _GENERATION_BLOCK.search(template):
        return _tokenize_with_generation_mask(messages, tokenizer, where)

    full = _render(tokenizer, messages, where)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = [tuple(span) for span in encoded["offset_mapping"]]
    special = _special_ids(tokenizer)
    labels = [IGNORE] * len(ids)
    for i, (role, _content) in enumerate(messages):
        if role != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, generation_prompt=True) if i else ""
        turn = _render(tokenizer, messages[: i + 1], where)
        if not turn.startswith(before) or not full.startswith(turn):
            raise _template_refused(
                where,
                i,
                "the template does not render the conversation turn by turn "
                "(a later turn changes the text of earlier ones)",
            )
        start, end = _locate_content(tokenizer, messages, i, turn, len(before), where)
        counted = [t for t, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not counted:
            raise TributaryError(f"{where}: the assistant message at index {i} has no tokens; give it text")
        last = counted[-1]
        # the end-of-turn token: the first special token after the content, within this turn and
        # separated from the content by whitespace only
        for t in range(last + 1, len(ids)):
            a, b = offsets[t]
            if a >= len(turn) or full[end:a].strip():
                break
            if ids[t] in special and b > a:
                last = t
                break
        for t in range(counted[0], last + 1):
            labels[t] = ids[t]
    return ids, labels


_SENTINEL = "TributaryAssistantContent7f3a9c"


def _locate_content(tokenizer, messages: Messages, i: int, turn: str, after: int, where: str) -> tuple[int, int]:
    """Character span of assistant message i's content in `turn` (the rendering of messages[:i+1]).

    Where the content starts is found by rendering the turn with a placeholder in its place (so a
    content that also occurs in the role header or the end-of-turn text is not mistaken); the content
    must then follow there verbatim or stripped (templates that `trim`). A template that renders the
    placeholder elsewhere falls back to the first occurrence after messages[:i] with the generation prompt.
    """
    content = messages[i][1]
    variants = (content, content.strip())
    probe = _render(tokenizer, messages[:i] + (("assistant", _SENTINEL),), where)
    if probe.count(_SENTINEL) == 1:
        position = probe.index(_SENTINEL)
        for variant in variants:
            if position >= after and turn.startswith(variant, position):
                return position, position + len(variant)
    for variant in variants:
        start = turn.find(variant, after)
        if start >= 0:
            return start, start + len(variant)
    raise _template_refused(where, i, "the template does not write the message's content verbatim")


def _tokenize_with_generation_mask(messages: Messages, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Tokens whose characters overlap a `{% generation %}` block count (transformers renders the blocks'
    character spans; the mapping to tokens is done here with offsets, so a block that starts or ends on
    whitespace no token covers is still mapped exactly)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, spans = render_jinja_template(
            conversations=[_as_dicts(messages)],
            chat_template=tokenizer.get_chat_template(),
            return_assistant_tokens_mask=True,
            add_generation_prompt=False,
            **tokenizer.special_tokens_map,
        )
    except _template_errors() as error:
        raise TributaryError(
            f"{where}: the chat template of model.path's tokenizer rejected this conversation "
            f"({type(error).__name__}: {error}); fix the row (e.g. the order of roles)"
        ) from None
    encoded = tokenizer(rendered[0], add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE] * len(ids)
    for t, (a, b) in enumerate(encoded["offset_mapping"]):
        if b > a and any(a < end and b > start for start, end in spans[0]):
            labels[t] = ids[t]
    if all(label == IGNORE for label in labels):
        first = next(i for i, (role, _) in enumerate(messages) if role == "assistant")
        raise _template_refused(where, first, "the template's {% generation %} blocks mark no token")
    return ids, labels
