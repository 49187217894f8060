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


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_next_token_loss_and_its_closed_form_gradient_match_autograd_of_the_sliced_cross_entropy(dtype):
    """NextTokenLoss against the textbook formulation: logits sliced to T-1 positions, labels shifted, summed
    cross-entropy, differentiated by autograd; with prompt (ignored) and padding positions."""
    from engine.capture.loss import NextTokenLoss, per_example_loss
    from engine.data.labels import IGNORE

    generator = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(3, 7, 11, generator=generator, dtype=torch.float64)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, :3] = IGNORE  # a prompt
    labels[1, 5:] = IGNORE  # padding
    scored = logits[:, :-1].double()
    reference_loss = (
        torch.nn.functional.cross_entropy(
            scored.reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="none"
        )
        .view(3, 6)
        .sum(dim=1)
    )
    (reference_gradient,) = torch.autograd.grad(reference_loss.sum(), logits)
    ours = NextTokenLoss(logits)
    exact = dtype == torch.float64
    tolerance = 1e-12 if exact else 1e-5
    loss_kinds = (ours.losses(labels), per_example_loss(logits, labels))
    for losses in loss_kinds:
        torch.testing.assert_close(losses.double(), reference_loss, rtol=tolerance, atol=tolerance)
    gradient = ours.logit_gradient(labels)
    assert gradient.dtype == dtype
    rounding = tolerance if exact else 1e-2  # autograd's bfloat16 gradient is rounded too
    torch.testing.assert_close(gradient.double(), reference_gradient.double(), rtol=rounding, atol=rounding)
    assert (gradient[:, -1] == 0).all() and (gradient[0, :2] == 0).all() and (gradient[1, 4:] == 0).all()
