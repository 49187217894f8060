"""Tiny GPT-2 / Llama models and word-level tokenizers built offline from a config.

Used by the demo, the tests and the benchmarks: nothing is downloaded from a model hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]


def build_tokenizer(texts: list[str], add_bos: bool, extra_special: tuple[str, ...] = ()):
    """A word-level tokenizer on `texts`. `extra_special` (e.g. ChatML's `<|im_start|>`, `<|im_end|>`) are
    added as special tokens after the four defaults, so ids 0-3 stay pad, unk, bos, eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = SPECIAL + [token for token in extra_special if token not in SPECIAL]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special))
    if add_bos:
        bos = tokenizer.token_to_id("<bos>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def build_model(
    kind: str,
    vocab_size: int,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    max_positions: int = 128,
    attention: str | None = None,
):
    """A tiny GPT-2 or Llama from config, seeded; `attention` sets the attention implementation (e.g. "eager")
    instead of transformers' default."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        if attention is not None:
            config._attn_implementation = attention
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        if attention is not None:
            config._attn_implementation = attention
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; use 'gpt2' or 'llama'")
    return model


def save_tiny(
    directory: str | Path,
    kind: str,
    texts: list[str],
    extra_special: tuple[str, ...] = (),
    chat_template: str | None = None,
    **model_args,
) -> Path:
    """Build a tokenizer on `texts` and a matching tiny model, and save both to `directory`.

    `extra_special` adds special tokens to the vocabulary and `chat_template` (a Jinja string) is saved
    with the tokenizer, for chat rows; by default neither is set.
    """
    directory = Path(directory)
    tokenizer = build_tokenizer(texts, add_bos=(kind == "llama"), extra_special=tuple(extra_special))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model = build_model(kind, vocab_size=len(tokenizer), **model_args)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
