"""Routed experts attributed per expert: experts fused into 3-D parameters (transformers 5) are split into one
linear map per expert and projection, each fed only the tokens routed to it; routers are tracked as modules."""

from __future__ import annotations

import json

import pytest
import torch

from engine.capture.experts import ExpertSlice
from engine.config import parse_config
from engine.data.rows import field_names, read_rows
from engine.errors import TributaryError
from engine.gradients.context import context_for_model, prepare_index_job
from engine.gradients.passes import gradient_pass
from engine.testing.families import build_family_model, save_family
from engine.testing.tiny import build_tokenizer
from tests.conftest import SENTENCES, job_config, vocabulary_texts
from tests.reference import autograd_per_example_of_parameters


def _relative_error(ours, reference) -> float:
    return float((ours - reference).norm() / reference.norm())


def _eager_reference_model(path, dtype=torch.float64):
    """The saved model as transformers computes it (its own eager experts loop, the 3-D parameters whole)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")


@pytest.mark.parametrize("family", ["mixtral", pytest.param("gpt_oss", marks=pytest.mark.heavy)])
def test_per_expert_rows_at_dim0_match_an_autograd_loop(family, tmp_path, text_train):
    """float64 (transformers' grouped_mm refuses it; the routed loop does not): every expert's slice, every
    router and every attention projection equals autograd over the model's own parameters, example by example."""
    path = save_family(tmp_path / family, family, vocabulary_texts())
    config = parse_config(job_config(tmp_path, path, text_train, model={"tokenizer": str(path / "tokenizer")}))
    job = prepare_index_job(config)
    names = list(job.context.modules)
    assert sum(isinstance(m, ExpertSlice) for m in job.context.modules.values()) == 2 * 2 * 4  # layers, sides, experts
    assert sum(name.endswith(("mlp.gate", "mlp.router")) for name in names) == 2
    ours = torch.from_numpy(gradient_pass(job.context, job.tokenized).grads)
    reference = autograd_per_example_of_parameters(
        _eager_reference_model(path), names, job.tokenized, job.context.pad_id
    )
    assert ours.dtype == torch.float64 and ours.shape == reference.shape
    assert _relative_error(ours, reference) < 1e-10


def _top1_mixtral_context(tmp_path, forced: dict[int, int] | None):
    """A top-1 Mixtral whose layer-0 router sends every token to expert 0, except `forced` (position -> expert)."""
    tokenizer = build_tokenizer(vocabulary_texts(), add_bos=False)
    model = build_family_model("mixtral", len(tokenizer), dtype=torch.float64, num_experts_per_tok=1)
    router = model.model.layers[0].mlp.gate
    original = router.forward

    def routed(hidden_states):
        logits, scores, indices = original(hidden_states)
        choice = torch.zeros_like(indices)
        for position, expert in (forced or {}).items():
            choice[position] = expert
        return logits, scores, choice

    router.forward = routed
    train = tmp_path / "one.jsonl"
    train.write_text(json.dumps({"text": SENTENCES[0]}) + "\n")
    config = parse_config(job_config(tmp_path, tmp_path, train))
    context = context_for_model(config, model, tokenizer, torch.device("cpu"))
    rows = context.tokenize(read_rows(str(train), field_names(config), what="data.train"), str(train))
    return context, rows, model


def _expert_gradient(context, grads: torch.Tensor, name: str) -> torch.Tensor:
    """One module's (d_out, d_in [+1]) block of a stored row."""
    offset = 0
    for module in context.spec.modules:
        width = module.d_in * module.d_out
        if module.name == name:
            return grads[offset : offset + width].view(module.d_out, module.d_in)
        offset += width
    raise KeyError(name)


def test_a_token_routed_elsewhere_moves_its_gradient_to_that_expert(tmp_path):
    experts = "model.layers.0.mlp.experts"
    context, rows, model = _top1_mixtral_context(tmp_path, None)
    all_to_0 = torch.from_numpy(gradient_pass(context, rows).grads)[0]
    assert _expert_gradient(context, all_to_0, f"{experts}.gate_up.0").norm() > 0
    for expert in (1, 2, 3):  # no token went there: exactly no gradient
        assert _expert_gradient(context, all_to_0, f"{experts}.gate_up.{expert}").abs().max() == 0
        assert _expert_gradient(context, all_to_0, f"{experts}.down.{expert}").abs().max() == 0

    moved = 2  # the third token goes to expert 2 instead
    context, rows, model = _top1_mixtral_context(tmp_path, {moved: 2})
    one_moved = torch.from_numpy(gradient_pass(context, rows).grads)[0]
    to_2 = _expert_gradient(context, one_moved, f"{experts}.gate_up.2")
    # one token's gradient is δ aᵀ: rank one, where expert 0 still has the other tokens' (rank > 1)
    assert torch.linalg.matrix_rank(to_2).item() == 1
    assert torch.linalg.matrix_rank(_expert_gradient(context, one_moved, f"{experts}.gate_up.0")).item() > 1
    for expert in (1, 3):
        assert _expert_gradient(context, one_moved, f"{experts}.gate_up.{expert}").abs().max() == 0
    # and it is what autograd gives for the same routing, over the model's own 3-D parameters
    reference = autograd_per_example_of_parameters(model, list(context.modules), rows, context.pad_id)[0]
    assert _relative_error(one_moved, reference) < 1e-10


def test_fused_experts_that_cannot_be_split_are_refused(tmp_path):
    """3-D expert weights without the down projection the routed loop needs: one line, not a wrong gradient."""
    tokenizer = build_tokenizer(vocabulary_texts(), add_bos=False)
    model = build_family_model("mixtral", len(tokenizer))
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.data)
    experts.up_proj_3d = torch.nn.Parameter(experts.gate_up_proj.data)
    del experts.gate_up_proj
    config = parse_config(job_config(tmp_path, tmp_path, tmp_path / "unused.jsonl"))
    with pytest.raises(TributaryError, match="cannot split per expert"):
        context_for_model(config, model, tokenizer, torch.device("cpu"))


class _UnnamedLinearExperts(torch.nn.Module):
    """Two nn.Linear experts fed only their routed tokens, held as plain attributes (no `experts` container that
    engine.capture.linear_experts recognises): their rows cannot be assigned to examples."""

    def __init__(self, width: int):
        super().__init__()
        self.router = torch.nn.Linear(width, 2)
        self.left = torch.nn.Linear(width, width)
        self.right = torch.nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        choice = self.router(flat).argmax(dim=-1)
        out = torch.zeros_like(flat)
        for expert, layer in enumerate((self.left, self.right)):
            tokens = torch.where(choice == expert)[0]
            out = out.index_add(0, tokens, layer(flat[tokens]))
        return out.view_as(hidden)


def test_linear_experts_outside_an_experts_block_are_refused_not_misattributed():
    """(Experts in an `experts` ModuleList are attributed: tests/capture/test_linear_experts.py.)"""
    from engine.capture.capture import GradientCapture
    from engine.capture.modules import select_modules, tracked_shapes
    from engine.projection import build_projection

    torch.manual_seed(0)
    model = _UnnamedLinearExperts(4)
    modules = select_modules(model, None)
    spec = build_projection(0, 0, "rademacher", tracked_shapes(modules, True))
    capture = GradientCapture(model, modules, spec, True, torch.float64, torch.device("cpu"))
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    with (
        capture.hooks(),
        pytest.raises(TributaryError, match=r"module (left|right) was called on \d rows for 6 tokens"),
    ):
        capture.run(lambda: model(hidden), torch.ones(2, 3))


class _WeightOnly(torch.nn.Module):
    """A Linear whose weight the model uses directly, never calling it (as peft's LoRA on 3-D parameters does)."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(4, 4)
        self.merged = torch.nn.Linear(4, 4)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.used(hidden) @ self.merged.weight


def test_a_tracked_module_that_never_runs_is_refused_not_given_zeros():
    from engine.capture.capture import GradientCapture
    from engine.capture.modules import select_modules, tracked_shapes
    from engine.projection import build_projection

    model = _WeightOnly()
    modules = select_modules(model, None)
    spec = build_projection(0, 0, "rademacher", tracked_shapes(modules, True))
    capture = GradientCapture(model, modules, spec, True, torch.float64, torch.device("cpu"))
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    with capture.hooks(), pytest.raises(TributaryError, match="module merged .* did not run in the forward pass"):
        capture.run(lambda: model(hidden), torch.ones(2, 3))
