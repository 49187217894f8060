"""Chat rows `{"messages": [...]}` through the tokenizer's chat template: only assistant tokens carry loss.

The loss mask is checked against an independent construction (token ids written by hand from the
word-level vocabulary: `<|im_start|> role words... <|im_end|>` per message, labels on the assistant's
words and its `<|im_end|>`), and dim-0 float64 per-example gradients against autograd with those
hand-built labels. Bad chat input is an error naming file:line, with nothing written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from engine.data.labels import IGNORE
from engine.data.rows import FieldNames, read_rows
from engine.data.tokenize import tokenize_rows
from engine.errors import TributaryError
from engine.gradients.context import prepare_index_job
from engine.gradients.passes import gradient_pass
from engine.model.loading import load_tokenizer
from engine.store import GradientStore
from engine.testing.tiny import save_tiny
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import job_config, vocabulary_texts, write_jsonl
from tests.reference import autograd_per_example

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_ROLE_HEADER = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
_GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
TEMPLATES = {
    # ChatML-like: <|im_start|>role\ncontent<|im_end|>\n
    "chatml": _ROLE_HEADER + "{{ m['content'] }}<|im_end|>\n{% endfor %}" + _GENERATION_PROMPT,
    # a template that trims the content (as Llama 3's and Gemma's do)
    "chatml_trim": _ROLE_HEADER + "{{ m['content'] | trim }}<|im_end|>\n{% endfor %}" + _GENERATION_PROMPT,
    # assistant text marked with {% generation %}: the tokenizer's own assistant mask is used
    "generation": _ROLE_HEADER + "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}" + _GENERATION_PROMPT,
}

CHATS = [
    [
        {"role": "system", "content": "you are a zoo guide"},
        {"role": "user", "content": "what does the fox eat"},
        {"role": "assistant", "content": "the fox eats berries in the forest"},
    ],
    [
        {"role": "user", "content": "what does the owl eat"},
        {"role": "assistant", "content": " the owl eats mice at night "},
        {"role": "user", "content": "and the seal"},
        {"role": "assistant", "content": "a seal eats fish in the cold sea"},
    ],
    [{"role": "user", "content": "the otter"}, {"role": "assistant", "content": "eats clams in the harbor"}],
]


def chat_vocabulary() -> list[str]:
    return vocabulary_texts() + ["system user assistant you are a zoo guide what does eat and"]


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2 and Llama whose word-level tokenizers know ChatML's tokens and carry a chat template."""
    root = tmp_path_factory.mktemp("chat_models")
    return {
        kind: save_tiny(
            root / kind,
            kind,
            chat_vocabulary(),
            extra_special=(IM_START, IM_END),
            chat_template=TEMPLATES["chatml"],
            hidden=8,
            layers=2,
            heads=2,
            seed=3,
        )
        for kind in ("gpt2", "llama")
    }


@pytest.fixture
def chat_train(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", [{"id": f"c{i}", "messages": m} for i, m in enumerate(CHATS)])


def hand_built(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The independent construction: ids from the vocabulary, word by word; labels on assistant words + <|im_end|>."""
    vocab = tokenizer.get_vocab()
    ids, labels = [vocab["<bos>"]], [IGNORE]
    for message in messages:
        header = [vocab[IM_START], vocab[message["role"]]]
        body = [vocab[word] for word in message["content"].split()] + [vocab[IM_END]]
        ids += header + body
        labels += [IGNORE] * len(header) + (body if message["role"] == "assistant" else [IGNORE] * len(body))
    return ids, labels


# ---- the mask ------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_mask_matches_independent_construction(template, chat_models, chat_train):
    tokenizer = load_tokenizer(str(chat_models["llama"]))
    tokenizer.chat_template = TEMPLATES[template]
    rows = read_rows(chat_train)
    assert [row.messages is not None for row in rows] == [True] * len(CHATS)
    tokenized = tokenize_rows(rows, tokenizer, max_length=64, source=str(chat_train))
    for row, messages in zip(tokenized, CHATS):
        ids, labels = hand_built(tokenizer, messages)
        assert row.input_ids == ids
        assert row.labels == labels
        # the ids are exactly what the tokenizer's chat template gives
        assert row.input_ids == list(
            # transformers types the result without return_dict's narrowing to a BatchEncoding
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]  # pyright: ignore[reportCallIssue, reportArgumentType]
        )
        assert row.num_loss_tokens == sum(len(m["content"].split()) + 1 for m in messages if m["role"] == "assistant")


def test_end_of_turn_is_counted_only_right_after_the_content(chat_models):
    """A template that writes a newline token and then <|im_end|>: whitespace between content and the end
    token is allowed (it is part of what the model generates); a non-whitespace word in between is not."""
    from engine.data.chat import tokenize_chat

    tokenizer = load_tokenizer(str(chat_models["gpt2"]))
    vocab = tokenizer.get_vocab()
    messages = (("user", "the otter"), ("assistant", "eats clams"))
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} sea <|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    ids, labels = tokenize_chat(messages, tokenizer, "x:1")
    counted = [tokenizer.convert_ids_to_tokens(i) for i, label in zip(ids, labels) if label != IGNORE]
    assert counted == ["eats", "clams"]  # "sea" separates the content from <|im_end|>
    tokenizer.chat_template = tokenizer.chat_template.replace(" sea ", "\n\n")
    ids, labels = tokenize_chat(messages, tokenizer, "x:1")
    assert [i for i, label in zip(ids, labels) if label != IGNORE] == [vocab["eats"], vocab["clams"], vocab[IM_END]]


def test_messages_field_is_configurable(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversation": CHATS[2]}])
    rows = read_rows(path, FieldNames(messages="conversation"))
    assert rows[0].messages == (("user", "the otter"), ("assistant", "eats clams in the harbor"))
    assert "assistant: eats clams" in rows[0].display
    with pytest.raises(TributaryError, match="neither 'text'.*'messages'"):
        read_rows(path)


def test_ultrachat_style_row_with_a_prompt_field_is_a_chat_row(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "the otter", "prompt_id": "x", "messages": CHATS[2]}])
    assert read_rows(path)[0].messages is not None


# ---- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dim0_chat_gradients_match_autograd_on_assistant_tokens(kind, chat_models, chat_train, make_config):
    config = make_config(chat_models[kind], chat_train, data={"batch_size": 2, "max_length": 64})
    job = prepare_index_job(config)
    context = job.context
    assert next(context.model.parameters()).dtype == torch.float64
    ours = torch.from_numpy(gradient_pass(context, job.tokenized).grads)
    labels = [torch.tensor([hand_built(context.tokenizer, messages)[1]]) for messages in CHATS]
    reference = autograd_per_example(
        context.model, context.modules, job.tokenized, context.pad_id, labels_override=labels
    )
    assert ours.shape == reference.shape
    assert float((ours - reference).norm() / reference.norm()) < 1e-10
    assert (reference.norm(dim=1) > 0).all()
    # not vacuous: the loss over every token gives other gradients
    everything = [torch.tensor([row.input_ids]) for row in job.tokenized]
    all_tokens = autograd_per_example(
        context.model, context.modules, job.tokenized, context.pad_id, labels_override=everything
    )
    assert float((all_tokens - reference).norm() / reference.norm()) > 1e-2


def test_cli_index_accepts_chat_jsonl(chat_models, chat_train, tmp_path):
    raw = job_config(tmp_path, chat_models["gpt2"], chat_train, data={"max_length": 64})
    result = invoke("index", write_config(tmp_path / "job.yaml", raw), "--no-progress")
    assert result.exit_code == 0, result.output
    store = GradientStore.open(raw["store"]["path"])
    assert store.manifest.complete and store.rows == len(CHATS)
    assert store.ids() == ["c0", "c1", "c2"]


# ---- bad input -----------------------------------------------------------------------------------


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


GOOD = {"messages": CHATS[2]}
BAD_CHATS = {
    # name: (the bad row on line 2, words the message must contain)
    "no assistant": (
        {"messages": [{"role": "user", "content": "the otter"}]},
        ["no assistant turn", "add an assistant message"],
    ),
    "empty assistant": (
        {"messages": [{"role": "user", "content": "the otter"}, {"role": "assistant", "content": "  "}]},
        ["messages[1] is an assistant turn with empty content", "give it text"],
    ),
    "no role": (
        {"messages": [{"content": "the otter"}, {"role": "assistant", "content": "eats"}]},
        ["messages[0] has no 'role'", "system, user or assistant"],
    ),
    "no content": (
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "eats"}]},
        ["messages[0] has no 'content'"],
    ),
    "unknown role": (
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "eats"}]},
        ["unknown role 'tool'", "use system, user or assistant"],
    ),
    "not a list": ({"messages": "hello"}, ["field 'messages' must be a list"]),
    "empty list": ({"messages": []}, ["field 'messages' is an empty list"]),
    "content not a string": (
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "eats"}]},
        ["messages[0] (user) 'content' must be a string"],
    ),
}


def _index_fails(tmp_path: Path, model: Path, rows: list[dict], *expected: str, **sections):
    train = write_jsonl(tmp_path / "bad.jsonl", rows)
    raw = job_config(tmp_path, model, train, **sections)
    result = invoke("index", write_config(tmp_path / "job.yaml", raw), "--no-progress")
    assert_clean_failure(result, f"{train}:{len(rows)}", *expected)
    assert not Path(raw["store"]["path"]).exists(), "a failing index must not create the store"


@pytest.mark.parametrize("name", sorted(BAD_CHATS))
def test_bad_chat_rows_are_refused_naming_file_and_line(name, chat_models, tmp_path):
    row, expected = BAD_CHATS[name]
    _index_fails(tmp_path, chat_models["gpt2"], [GOOD, row], *expected)


def test_chat_row_needs_a_chat_template(tiny_models, tmp_path):
    _index_fails(
        tmp_path,
        tiny_models["gpt2"],
        [{"text": "the owl eats mice"}, GOOD],
        "model.path's tokenizer has no chat template",
        "use prompt/completion rows or a chat model",
    )


def test_chat_row_the_template_rejects(chat_models, tmp_path):
    strict = TEMPLATES["chatml"].replace(
        "{% for m in messages %}",
        "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('system message must come first') }}{% endif %}",
    )
    model = tmp_path / "strict"
    save_tiny(
        model,
        "gpt2",
        chat_vocabulary(),
        extra_special=(IM_START, IM_END),
        chat_template=strict,
        hidden=8,
        layers=1,
        heads=2,
    )
    row = {
        "messages": [
            {"role": "user", "content": "the otter"},
            {"role": "system", "content": "a guide"},
            {"role": "assistant", "content": "eats"},
        ]
    }
    _index_fails(tmp_path, model, [GOOD, row], "rejected this conversation", "system message must come first")


def test_overlong_chat_row_without_an_assistant_token_left_is_an_error(chat_models, tmp_path):
    long_user = {"role": "user", "content": " ".join(["the owl eats mice at night"] * 3)}
    row = {"messages": [long_user, {"role": "assistant", "content": "eats clams"}]}
    _index_fails(
        tmp_path,
        chat_models["gpt2"],
        [GOOD, row],
        "no assistant token remains within data.max_length=16",
        "raise data.max_length",
        data={"max_length": 16},
    )


def test_overlong_chat_rows_are_truncated_and_counted(chat_models, tmp_path, caplog):
    long_reply = {"role": "assistant", "content": " ".join(["the owl eats mice at night"] * 4)}
    rows = [GOOD, {"messages": [{"role": "user", "content": "the otter"}, long_reply]}]
    train = write_jsonl(tmp_path / "long.jsonl", rows)
    tokenizer = load_tokenizer(str(chat_models["gpt2"]))
    with caplog.at_level(logging.WARNING, logger="engine.data.tokenize"):
        tokenized = tokenize_rows(read_rows(train), tokenizer, max_length=16, source=str(train))
    assert len(tokenized[1].input_ids) == 16 and tokenized[1].num_loss_tokens == 16 - 8
    assert any("1 of 2 rows were longer than max_length=16" in r.getMessage() for r in caplog.records)


def test_template_that_rewrites_content_is_refused(chat_models):
    from engine.data.chat import tokenize_chat

    tokenizer = load_tokenizer(str(chat_models["gpt2"]))
    tokenizer.chat_template = TEMPLATES["chatml"].replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    with pytest.raises(TributaryError, match=r"x.jsonl:3: cannot tell which tokens.*\{% generation %\}"):
        tokenize_chat((("user", "a"), ("assistant", "the otter")), tokenizer, "x.jsonl:3")


def test_byte_level_bpe_tokens_of_assistant_content_and_end_of_turn(chat_models):
    """With a byte-level BPE (whitespace inside tokens, newline tokens), the counted tokens decode to each
    assistant content plus its end-of-turn text (and nothing but whitespace before), for ChatML and for a
    Llama-2-like template with a space token between the content and `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.data.chat import tokenize_chat

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [m["content"] for chat in CHATS for m in chat] + ["system user assistant [INST] [/INST]"]
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<s>", "</s>", IM_START, IM_END],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    llama2 = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}"
    )
    for template, end in ((TEMPLATES["chatml"], IM_END), (llama2, " </s>")):
        tokenizer.chat_template = template
        for chat in CHATS[1:]:
            messages = tuple((m["role"], m["content"]) for m in chat)
            ids, labels = tokenize_chat(messages, tokenizer, "x:1")
            assert tokenizer.decode(ids) == tokenizer.apply_chat_template(chat, tokenize=False)
            runs, current = [], []
            for token, label in zip(ids, labels):
                if label != IGNORE:
                    current.append(token)
                elif current:
                    runs.append(current)
                    current = []
            runs += [current] if current else []
            expected = [
                m["content"] if end == IM_END else m["content"].strip() for m in chat if m["role"] == "assistant"
            ]
            assert len(runs) == len(expected)
            for run, content in zip(runs, expected):
                decoded = tokenizer.decode(run)
                assert isinstance(decoded, str)  # one sequence decodes to one string
                # a token that straddles the template's space before the content (" the") counts whole
                assert decoded.endswith(content + end) and not decoded[: -len(content + end)].strip(), decoded


def test_content_equal_to_a_header_word_without_generation_prompt(chat_models):
    """A template that ignores add_generation_prompt writes the assistant header inside the turn; a content
    that repeats the role word is still told apart from the header (the placeholder rendering)."""
    from engine.data.chat import tokenize_chat

    tokenizer = load_tokenizer(str(chat_models["llama"]))
    tokenizer.chat_template = TEMPLATES["chatml"].replace(_GENERATION_PROMPT, "")
    chat = [{"role": "user", "content": "user"}, {"role": "assistant", "content": "assistant"}]
    ids, labels = tokenize_chat(tuple((m["role"], m["content"]) for m in chat), tokenizer, "x:1")
    assert (ids, labels) == hand_built(tokenizer, chat)
