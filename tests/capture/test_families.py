"""The architecture matrix: a tiny random model of each common causal LM family, built from its transformers
config, is attributed exactly (per-example gradients at dim 0 equal an autograd loop over single rows, float32),
its LoRA adapter is attributed in adapter mode, and its bf16 rows agree with its float32 rows.

The default group keeps one dense family (llama) and one mixture of experts (mixtral); the rest are heavy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.falcon.modeling_falcon import FalconLinear
from transformers.pytorch_utils import Conv1D

from engine.capture.modules import TrackedKind
from engine.config import parse_config
from engine.gradients.context import prepare_index_job
from engine.gradients.passes import gradient_pass
from engine.testing.families import available_families, is_moe, save_family
from tests.conftest import job_config, vocabulary_texts
from tests.reference import autograd_per_example, autograd_per_example_of_parameters

DEFAULT_GROUP = ("llama", "mixtral")
FAMILIES = [
    family if family in DEFAULT_GROUP else pytest.param(family, marks=pytest.mark.heavy)
    for family in available_families()
]


def _relative_error(ours, reference) -> float:
    return float((ours - reference).norm() / reference.norm())


def _config(tmp_path, path, train, dtype="float32", **model):
    raw = job_config(tmp_path, path, train, model={"tokenizer": str(path / "tokenizer"), "dtype": dtype, **model})
    raw["store"]["dtype"] = "float32"
    return parse_config(raw)


def _reference_model(path, family):
    from transformers import AutoModelForCausalLM

    # transformers' own eager experts loop: its grouped_mm is no reference for Tributary's routed loop
    extra = {"experts_implementation": "eager"} if is_moe(family) else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)


@pytest.fixture
def family_dir(request, tmp_path):
    return save_family(tmp_path / request.param, request.param, vocabulary_texts())


def _is_projection(name: str, module: torch.nn.Module) -> bool:
    kind = TrackedKind.for_module(module)
    return kind is not None and kind.module_type in (torch.nn.Linear, FalconLinear, Conv1D) and "lm_head" not in name


def _save_lora(path, family, root):
    from peft import LoraConfig, get_peft_model

    base = _reference_model(path, family)
    torch.manual_seed(2)
    # the attention and MLP projections: the tracked linear modules (not routers, not fused experts), named in
    # full: peft 0.22 also wraps a fused experts module whose 3-D parameter shares a projection's short name
    # (qwen2_moe's experts.down_proj beside shared_expert.down_proj)
    targets = sorted(name for name, module in base.named_modules() if _is_projection(name, module))
    lora = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0))
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)  # non-zero, so both adapter gradients are non-trivial
    lora.save_pretrained(root)
    return root


@pytest.mark.parametrize("family_dir", FAMILIES, indirect=True)
def test_family_is_attributed_exactly_with_its_adapter_and_in_bf16(family_dir, tmp_path, text_train):
    family = family_dir.name
    config = _config(tmp_path, family_dir, text_train)
    job = prepare_index_job(config)
    names = list(job.context.modules)
    ours = torch.from_numpy(gradient_pass(job.context, job.tokenized).grads)
    reference_model = _reference_model(family_dir, family)
    reference = autograd_per_example_of_parameters(reference_model, names, job.tokenized, job.context.pad_id)
    assert ours.shape == reference.shape
    assert _relative_error(ours, reference) < 1e-5
    assert (reference.norm(dim=1) > 0).all()
    assert job.context.coverage is not None and job.context.coverage.share > 0.9

    # LoRA on every linear projection (attention and MLP), attributed in adapter mode
    adapter = _save_lora(family_dir, family, tmp_path / "adapter")
    adapted = prepare_index_job(_config(tmp_path, family_dir, text_train, adapter=str(adapter)))
    lora_modules = adapted.context.modules
    assert lora_modules and all("lora_" in name for name in lora_modules)
    assert any("attn" in name or "attention" in name for name in lora_modules)
    lora_rows = torch.from_numpy(gradient_pass(adapted.context, adapted.tokenized).grads)
    lora_reference = autograd_per_example(
        adapted.context.model, lora_modules, adapted.tokenized, adapted.context.pad_id
    )
    assert _relative_error(lora_rows, lora_reference) < 1e-5

    # bf16 weights: rows agree with float32's
    bf16 = prepare_index_job(_config(tmp_path, family_dir, text_train, dtype="bfloat16"))
    bf16_rows = gradient_pass(bf16.context, bf16.tokenized).grads
    pearson = np.corrcoef(bf16_rows.astype(np.float64).ravel(), ours.numpy().astype(np.float64).ravel())[0, 1]
    assert pearson >= 0.999, pearson
