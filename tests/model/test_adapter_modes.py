"""model.adapter_mode: attribute the adapter, the merged model, or the base model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.capture.modules import select_modules
from engine.gradients.context import prepare_index_job
from engine.gradients.passes import gradient_pass
from tests.reference import autograd_per_example


def _merged_by_hand(base_path, adapter_path):
    """The base model with W ← W + (α/r)·B A written into each adapted weight, from the saved tensors."""
    import json

    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float64)
    settings = json.loads((adapter_path / "adapter_config.json").read_text())
    scaling = settings["lora_alpha"] / settings["r"]
    tensors = load_file(str(adapter_path / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    for key, a in tensors.items():
        if "lora_A" not in key:
            continue
        b = tensors[key.replace("lora_A", "lora_B")].double()
        name = key.replace("base_model.model.", "").replace(".lora_A.weight", "")
        delta = scaling * (b @ a.double())  # (d_out, d_in)
        module = modules[name]
        weight = module.weight
        with torch.no_grad():
            weight += delta.t() if type(module).__name__ == "Conv1D" else delta
    model.requires_grad_(False)
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merged_mode_equals_hand_merged_weights(kind, tiny_models, lora_adapters, make_config, text_train):
    config = make_config(
        tiny_models[kind], text_train, model={"adapter": str(lora_adapters[kind]), "adapter_mode": "merged"}
    )
    job = prepare_index_job(config)
    assert not any("lora" in name for name in job.context.modules)
    ours = torch.from_numpy(gradient_pass(job.context, job.tokenized).grads)
    reference_model = _merged_by_hand(tiny_models[kind], lora_adapters[kind])
    modules = select_modules(reference_model, None)
    assert list(modules) == list(job.context.modules)
    reference = autograd_per_example(reference_model, modules, job.tokenized, job.context.pad_id)
    assert float((ours - reference).norm() / reference.norm()) < 1e-6


def test_base_mode_equals_no_adapter(tiny_models, lora_adapters, make_config, text_train):
    base = prepare_index_job(make_config(tiny_models["llama"], text_train))
    mode = prepare_index_job(
        make_config(
            tiny_models["llama"], text_train, model={"adapter": str(lora_adapters["llama"]), "adapter_mode": "base"}
        )
    )
    assert list(mode.context.modules) == list(base.context.modules)
    assert torch.equal(
        torch.from_numpy(gradient_pass(mode.context, mode.tokenized).grads),
        torch.from_numpy(gradient_pass(base.context, base.tokenized).grads),
    )
    adapter = prepare_index_job(
        make_config(tiny_models["llama"], text_train, model={"adapter": str(lora_adapters["llama"])})
    )
    assert all("lora_" in name for name in adapter.context.modules)
