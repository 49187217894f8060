"""Tiny GPT-2 / Llama models and word-level tokenizers built offline from a config.

Used by the demo, the tests and the benchmarks: nothing is downloaded from a model hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]


def build_tokenizer(texts: list[str], add_bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    if add_bos:
        bos = tokenizer.token_to_id("<bos>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def build_model(kind: str, vocab_size: int, hidden: int = 16, layers: int = 2, heads: int = 2,
                seed: int = 0, max_positions: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=max_positions, tie_word_embeddings=False,
                             pad_token_id=0, bos_token_id=2, eos_token_id=3)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; use 'gpt2' or 'llama'")
    return model


def save_tiny(directory: str | Path, kind: str, texts: list[str], **model_args) -> Path:
    """Build a tokenizer on `texts` and a matching tiny model, and save both to `directory`."""
    directory = Path(directory)
    tokenizer = build_tokenizer(texts, add_bos=(kind == "llama"))
    model = build_model(kind, vocab_size=len(tokenizer), **model_args)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
