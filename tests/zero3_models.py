"""Tiny models wide enough for ZeRO-3 to partition every weight over two ranks, and a LoRA adapter on one."""

from __future__ import annotations

from pathlib import Path

from engine.testing.tiny import save_tiny
from tests.conftest import SENTENCES, vocabulary_texts

# 13 rows: in shards of 3 the last step gives rank 0 one row (rank 1 pads to its batch count) and rank 1 no shard
TRAIN = SENTENCES + [
    "the owl eats mice at night",
    "a bear eats honey in the valley",
    "the fox eats berries",
    "a crow eats seeds",
    "the wolf eats deer in the cold snow",
]


def llama32_in(directory: Path) -> Path:
    """A tiny Llama wide enough (hidden 32) that every weight partitions over two ranks."""
    return save_tiny(directory / "llama", "llama", vocabulary_texts(), hidden=32, layers=2, heads=2, seed=1)


def lora32_in(base_path: Path, directory: Path) -> Path:
    """A LoRA adapter (r 2 on q_proj and v_proj, lora_B drawn non-zero) on the model at `base_path`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    adapted = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    path = directory / "lora"
    adapted.save_pretrained(str(path))
    return path
