"""`--generate`: complete prompt-only queries with the model (greedy, or sampled with a seed), then
attribute exactly the generated tokens — the token ids are kept, never re-tokenised from text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import GenerationSettings
from engine.data.labels import IGNORE
from engine.data.lines import json_records
from engine.data.tokenize import TokenizedRow
from engine.errors import TributaryError


@dataclass(frozen=True)
class PromptRow:
    index: int
    id: str
    line: int
    prompt: str


@dataclass(frozen=True)
class Generated:
    prompt: PromptRow
    prompt_text: str  # as the model saw it (chat template applied when used)
    completion: str
    row: TokenizedRow


def read_prompts(path: str, prompt_field: str, id_field: str) -> list[PromptRow]:
    """Rows of a queries file for --generate: each needs a non-empty prompt; a completion is ignored."""
    rows: list[PromptRow] = []
    for line_number, record in json_records(Path(path), "queries file"):
        record = record if isinstance(record, dict) else {}
        prompt = record.get(prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise TributaryError(f"{path}:{line_number}: --generate needs a non-empty '{prompt_field}' in every row")
        rows.append(PromptRow(len(rows), str(record.get(id_field, len(rows))), line_number, prompt))
    if not rows:
        raise TributaryError(f"queries file {path} has no rows")
    return rows


def _prompt_ids(tokenizer, prompt: PromptRow, chat: bool, source: str) -> tuple[str, list[int]]:
    if not chat:
        return prompt.prompt, list(tokenizer(prompt.prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise TributaryError(
            f"{source}:{prompt.line}: --chat needs a chat template, and model.path's tokenizer has none; "
            "pass --no-chat to generate from the raw prompt, or use a chat (instruct) model"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.prompt}], tokenize=False, add_generation_prompt=True
    )
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[PromptRow], settings: GenerationSettings, max_length: int, source: str
) -> list[Generated]:
    chat = bool(getattr(tokenizer, "chat_template", None)) if settings.chat is None else settings.chat
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        text, ids = _prompt_ids(tokenizer, prompt, chat, source)
        if len(ids) >= max_length:
            raise TributaryError(
                f"{source}:{prompt.line}: prompt is {len(ids)} tokens, not shorter than data.max_length={max_length}; "
                "shorten it or raise data.max_length"
            )
        budget = min(settings.max_new_tokens, max_length - len(ids))
        torch.manual_seed(settings.seed + prompt.index)  # reproducible per query, whatever the batch
        input_ids = torch.tensor([ids], device=device)
        options = {"do_sample": settings.sample, "max_new_tokens": budget, "pad_token_id": pad_id}
        if settings.sample:
            options.update(temperature=settings.temperature, top_p=settings.top_p)
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options)
        completion_ids = output[0, len(ids) :].tolist()
        if not completion_ids:
            raise TributaryError(f"{source}:{prompt.line}: the model generated no token for this prompt")
        completion = tokenizer.decode(completion_ids, skip_special_tokens=True)
        row = TokenizedRow(
            index=prompt.index, input_ids=ids + completion_ids, labels=[IGNORE] * len(ids) + completion_ids
        )
        out.append(Generated(prompt, text, completion, row))
    return out


def token_pieces(tokenizer, row: TokenizedRow) -> list[str]:
    """The decoded text of each counted (completion) token, for per-token views."""
    return [tokenizer.decode([row.input_ids[t]]) for t in range(1, len(row.labels)) if row.labels[t] != IGNORE]
