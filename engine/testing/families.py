"""Tiny random causal LMs of each common family, built offline from its transformers config.

Widths 32-64 and two layers: small enough for exactness tests (per-example gradients against an autograd
loop) and the coverage benchmark. A family whose config class the installed transformers lacks is absent
from `available_families()`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

HIDDEN = 32
LAYERS = 2

_COMMON: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
_DECODER: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
_MOE: dict[str, Any] = {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}
_QWEN_MOE: dict[str, Any] = {
    **_DECODER,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "decoder_sparse_step": 1,
}

# family -> (config class, model class, config arguments, mixture of experts)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], bool]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER, False),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER, False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER, False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 8}, False),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_DECODER, "head_dim": 8}, False),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_DECODER, "head_dim": 8}, False),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _DECODER, False),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {**_DECODER, "num_key_value_heads": 4, "hidden_dropout": 0.0, "attention_dropout": 0.0},
        False,
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": HIDDEN,
            "ffn_dim": 64,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "word_embed_proj_dim": HIDDEN,
            "max_position_embeddings": 128,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
        False,
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
        },
        False,
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_positions": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
        False,
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", _MOE, True),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {**_QWEN_MOE, "shared_expert_intermediate_size": 32},
        True,
    ),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_QWEN_MOE, "head_dim": 8}, True),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2}, True),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {**_MOE, "head_dim": 8, "layer_types": ["full_attention", "full_attention"]},
        True,
    ),
}


def available_families() -> list[str]:
    """The families whose config and model classes the installed transformers has."""
    transformers = importlib.import_module("transformers")
    return [name for name, (config, model, _, _) in FAMILIES.items() if hasattr(transformers, config)]


def is_moe(family: str) -> bool:
    return FAMILIES[family][3]


def build_family_model(
    family: str, vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
):
    """A tiny random model of `family`, seeded, in eval mode; `overrides` change its config arguments."""
    transformers = importlib.import_module("transformers")
    config_name, model_name, arguments, _ = FAMILIES[family]
    config = getattr(transformers, config_name)(vocab_size=vocab_size, **_COMMON, **{**arguments, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype)
    model.eval()
    return model


def save_family(directory, family: str, texts: list[str], seed: int = 0, **overrides: Any):
    """A tiny `family` model saved to `directory` and a word-level tokenizer on `texts` to `directory`/tokenizer
    (give it as model.tokenizer): beside the model's config.json, AutoTokenizer would load it as the family's own
    tokenizer class, which rebuilds it (Qwen2's, for one, as byte-level BPE)."""
    from pathlib import Path

    from engine.testing.tiny import build_tokenizer

    directory = Path(directory)
    tokenizer = build_tokenizer(texts, add_bos=False)
    model = build_family_model(family, vocab_size=len(tokenizer), seed=seed, **overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory
