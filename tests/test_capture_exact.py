"""dim 0 (identity projection) per-example gradients equal brute-force autograd, example by example."""

from __future__ import annotations

import pytest
import torch

from engine.gradients.context import prepare_index_job
from engine.gradients.passes import gradient_pass
from tests.reference import autograd_per_example


def _relative_error(ours, reference) -> float:
    return float((ours - reference).norm() / reference.norm())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("data", ["text_train", "prompt_train"])
@pytest.mark.parametrize("use_lora", [False, True])
def test_dim0_matches_autograd_loop(kind, data, use_lora, tiny_models, lora_adapters, make_config, request):
    train = request.getfixturevalue(data)
    adapter = str(lora_adapters[kind]) if use_lora else None
    config = make_config(tiny_models[kind], train, model={"adapter": adapter})
    job = prepare_index_job(config)
    context = job.context
    if use_lora:
        assert context.modules and all("lora_" in name for name in context.modules)
    else:
        assert any(type(m).__name__ == ("Conv1D" if kind == "gpt2" else "Linear") for m in context.modules.values())
    ours = torch.from_numpy(gradient_pass(context, job.tokenized).grads)
    reference = autograd_per_example(context.model, context.modules, job.tokenized, context.pad_id)
    assert ours.shape == reference.shape
    assert _relative_error(ours, reference) < 1e-6
    # every example and module is non-trivial, so the comparison is not vacuous
    assert (reference.norm(dim=1) > 0).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_independent_of_batch_size_and_padding_side(kind, tiny_models, prompt_train, make_config):
    results = []
    for batch_size, side in [(1, "right"), (3, "right"), (4, "left"), (2, "left")]:
        config = make_config(tiny_models[kind], prompt_train, data={"batch_size": batch_size, "padding_side": side})
        job = prepare_index_job(config)
        results.append(torch.from_numpy(gradient_pass(job.context, job.tokenized).grads))
    for other in results[1:]:
        assert _relative_error(other, results[0]) < 1e-10


def test_prompt_tokens_carry_no_loss_but_pass_gradient(tiny_models, prompt_train, make_config):
    """The first module's gradient involves prompt activations (attention), yet only completion tokens count."""
    config = make_config(tiny_models["llama"], prompt_train)
    job = prepare_index_job(config)
    row = job.tokenized[0]
    prompt_length = sum(1 for label in row.labels if label == -100)
    assert prompt_length >= 2 and row.num_loss_tokens == len(row.input_ids) - prompt_length
    ours = torch.from_numpy(gradient_pass(job.context, job.tokenized[:1]).grads)
    reference = autograd_per_example(job.context.model, job.context.modules, job.tokenized[:1], job.context.pad_id)
    assert _relative_error(ours, reference) < 1e-6
