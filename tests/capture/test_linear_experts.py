"""Routed experts as nn.Linear modules (one module per expert and projection, each called on the rows routed to
it: engine.capture.linear_experts), attributed per expert like transformers 5's fused experts: rows equal an
autograd loop, a token's gradient goes to the experts it was routed to, and coverage counts every expert."""

from __future__ import annotations

import json

import pytest
import torch

from engine.capture.capture import GradientCapture
from engine.capture.linear_experts import match_rows
from engine.capture.modules import select_modules, tracked_shapes
from engine.config import parse_config
from engine.data.rows import field_names, read_rows
from engine.errors import TributaryError
from engine.gradients.context import context_for_model
from engine.gradients.passes import gradient_pass
from engine.projection import build_projection
from engine.testing.families import build_family_model
from engine.testing.linear_moe import LinearExpertsBlock, with_linear_experts
from engine.testing.tiny import build_tokenizer
from tests.conftest import SENTENCES, job_config, vocabulary_texts
from tests.reference import autograd_per_example_of_parameters

EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{projection}"
# rows 0 and 1 share a prefix, so the experts see bit-identical rows from two examples in one batch
TEXTS = [SENTENCES[0], SENTENCES[0] + " " + SENTENCES[1], SENTENCES[2], SENTENCES[3]]


def _relative_error(ours, reference) -> float:
    return float((ours - reference).norm() / reference.norm())


def _context(tmp_path, model, tokenizer, texts, batch_size=4):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    raw = job_config(tmp_path, tmp_path, train)
    raw["data"]["batch_size"] = batch_size
    config = parse_config(raw)
    context = context_for_model(config, model, tokenizer, torch.device("cpu"))
    rows = context.tokenize(read_rows(str(train), field_names(config), what="data.train"), str(train))
    return context, rows


def _linear_mixtral(**overrides):
    tokenizer = build_tokenizer(vocabulary_texts(), add_bos=False)
    model = build_family_model("mixtral", len(tokenizer), dtype=torch.float64, **overrides)
    return with_linear_experts(model), tokenizer


def test_linear_expert_rows_at_dim0_match_an_autograd_loop(tmp_path):
    """float64, one batch of three rows (the first two share a prefix, so the experts are given bit-identical rows
    of two examples): every expert Linear, router and attention projection of those two equals autograd over
    single rows."""
    model, tokenizer = _linear_mixtral()
    assert isinstance(model.get_submodule("model.layers.0.mlp"), LinearExpertsBlock)
    context, rows = _context(tmp_path, model, tokenizer, TEXTS[:3])
    names = list(context.modules)
    assert sum(".experts." in name for name in names) == 2 * 4 * 3  # layers, experts, projections
    ours = torch.from_numpy(gradient_pass(context, rows).grads)
    reference = autograd_per_example_of_parameters(model, names, rows[:2], context.pad_id)
    assert _relative_error(ours[:2], reference) < 1e-10


@pytest.mark.heavy  # two gradient passes of a tiny Mixtral: ~15 s on a loaded machine
def test_linear_expert_rows_equal_the_fused_forms_slices(tmp_path):
    """The same weights as nn.Linear experts and as transformers 5's fused 3-D experts (an independent capture
    path: per-expert slices fed by the routed loop): every row's expert blocks agree."""
    model, tokenizer = _linear_mixtral()
    context, rows = _context(tmp_path, model, tokenizer, TEXTS)
    ours = torch.from_numpy(gradient_pass(context, rows).grads)
    fused_model = build_family_model("mixtral", len(tokenizer), dtype=torch.float64)
    fused, _ = _context(tmp_path, fused_model, tokenizer, TEXTS)
    theirs = torch.from_numpy(gradient_pass(fused, rows).grads)
    for layer in range(2):
        for expert in range(4):
            gate, up, down = (
                _block(context, ours, EXPERT.format(layer=layer, expert=expert, projection=p))
                for p in ("w1", "w3", "w2")
            )
            slices = f"model.layers.{layer}.mlp.experts.{{}}.{expert}"
            torch.testing.assert_close(torch.cat([gate, up], dim=1), _block(fused, theirs, slices.format("gate_up")))
            torch.testing.assert_close(down, _block(fused, theirs, slices.format("down")))


def _block(context, grads: torch.Tensor, name: str) -> torch.Tensor:
    """One module's (N, d_out, d_in) block of the stored rows."""
    offset = 0
    for module in context.spec.modules:
        width = module.d_in * module.d_out
        if module.name == name:
            return grads[:, offset : offset + width].view(-1, module.d_out, module.d_in)
        offset += width
    raise KeyError(name)


def _force_top1(model, forced: dict[int, int]):
    """Layer 0's router sends every token to expert 0, except `forced` (flat position -> expert)."""
    router = model.get_submodule("model.layers.0.mlp.gate")
    original = router.forward

    def routed(hidden_states):
        logits, scores, indices = original(hidden_states)
        choice = torch.zeros_like(indices)
        for position, expert in forced.items():
            choice[position] = expert
        return logits, scores, choice

    router.forward = routed


def test_a_token_routed_elsewhere_moves_its_gradient_to_that_linear_expert(tmp_path):
    name = EXPERT.format(layer=0, expert="{}", projection="w1")
    model, tokenizer = _linear_mixtral(num_experts_per_tok=1)
    _force_top1(model, {})
    context, rows = _context(tmp_path, model, tokenizer, TEXTS[:1])
    all_to_0 = torch.from_numpy(gradient_pass(context, rows).grads)
    assert _block(context, all_to_0, name.format(0)).norm() > 0
    for expert in (1, 2, 3):  # no token went there: exactly no gradient
        assert _block(context, all_to_0, name.format(expert)).abs().max() == 0

    model, tokenizer = _linear_mixtral(num_experts_per_tok=1)
    _force_top1(model, {2: 2})  # the third token goes to expert 2 instead
    context, rows = _context(tmp_path, model, tokenizer, TEXTS[:1])
    one_moved = torch.from_numpy(gradient_pass(context, rows).grads)
    # one token's gradient is δ aᵀ: rank one, where expert 0 still has the other tokens' (rank > 1)
    assert torch.linalg.matrix_rank(_block(context, one_moved, name.format(2))[0]).item() == 1
    assert torch.linalg.matrix_rank(_block(context, one_moved, name.format(0))[0]).item() > 1
    for expert in (1, 3):
        assert _block(context, one_moved, name.format(expert)).abs().max() == 0
    reference = autograd_per_example_of_parameters(model, list(context.modules), rows, context.pad_id)
    assert _relative_error(one_moved, reference) < 1e-10


def test_coverage_counts_every_linear_expert(tmp_path):
    model, tokenizer = _linear_mixtral()
    context, _ = _context(tmp_path, model, tokenizer, TEXTS[:1])
    coverage = context.coverage
    assert coverage is not None
    experts = coverage.kinds["experts"]
    expert_parameters = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert (experts.modules, experts.tracked_modules) == (2 * 4 * 3, 2 * 4 * 3)
    assert experts.parameters == experts.tracked_parameters == expert_parameters
    assert coverage.kinds["router"].tracked_modules == 2
    assert not any(reason.startswith("experts") for reason in coverage.skipped)


def test_rows_are_matched_to_their_tokens_with_repeated_rows_in_order():
    source = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [5.0, 6.0], [1.0, 2.0]])
    tokens = torch.tensor([4, 1, 0, 2])  # the copies of row [1, 2] are taken in position order: 0, 2, then 4
    matched = match_rows(source[tokens], source)
    assert matched is not None and matched.tolist() == [0, 1, 2, 4]
    assert match_rows(source[tokens] * 2, source) is None  # not rows of the source: refused, never guessed
    assert match_rows(source[[0, 0, 0, 0]], source) is None  # more copies than the source holds


class _TwoLinearExperts(torch.nn.Module):
    """Two nn.Linear experts, each fed only its routed tokens (argmax of a linear router); `scale` changes the
    hidden states before dispatching them (their rows are then not rows of the block's input)."""

    def __init__(self, width: int, scale: float = 1.0):
        super().__init__()
        self.router = torch.nn.Linear(width, 2)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2))
        self.scale = scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        choice = self.router(flat).argmax(dim=-1)
        dispatched = flat * self.scale if self.scale != 1.0 else flat
        out = torch.zeros_like(flat)
        for expert, layer in enumerate(self.experts):
            tokens = torch.where(choice == expert)[0]
            out = out.index_add(0, tokens, layer(dispatched[tokens]))
        return out.view_as(hidden)


def _capture(model):
    modules = select_modules(model, None)
    spec = build_projection(0, 0, "rademacher", tracked_shapes(modules, True))
    return GradientCapture(model, modules, spec, True, torch.float64, torch.device("cpu"))


def test_a_plain_linear_experts_block_matches_per_example_autograd():
    torch.manual_seed(0)
    model = _TwoLinearExperts(4).double()
    capture = _capture(model)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 4, dtype=torch.float64)
    with capture.hooks():
        state = capture.run(lambda: model(hidden), torch.ones(2, 3))
        loss = ((state.logits - target) ** 2).sum(dim=(1, 2))
        grads = capture.example_gradients(state, capture.output_gradients(state, loss, retain_graph=False))
    assert state.routed_tokens["experts.0"] + state.routed_tokens["experts.1"] == 6
    for example in range(2):
        example_loss = ((model(hidden[example : example + 1]) - target[example]) ** 2).sum()
        for name in ("experts.0", "experts.1"):
            layer = model.get_submodule(name)
            assert isinstance(layer, torch.nn.Linear)
            weight, bias = torch.autograd.grad(
                example_loss, [layer.weight, layer.bias], retain_graph=True, allow_unused=True, materialize_grads=True
            )
            expected = torch.cat([weight, bias[:, None]], dim=1)
            torch.testing.assert_close(grads[name][example], expected, rtol=1e-10, atol=1e-12)


def test_experts_given_rows_that_are_not_the_blocks_input_are_refused():
    model = _TwoLinearExperts(4, scale=2.0).double()
    capture = _capture(model)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    with capture.hooks(), pytest.raises(TributaryError, match=r"expert experts\.\d was given rows that are not rows"):
        capture.run(lambda: model(hidden), torch.ones(2, 3))


class _ScalingBlock(LinearExpertsBlock):
    """Dispatches 2x its hidden states (and halves the result): its experts' rows are not rows of its input."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states * 2) / 2


def test_an_index_of_experts_that_cannot_be_placed_is_refused_before_the_store_exists(tmp_path, monkeypatch):
    """The refusal comes from a one-batch check of the routed forward while the worker describes the model,
    not during pass 1: one line, and no store (the earlier refusal of nn.Linear experts left a partial one)."""
    from engine.gradients import context
    from engine.testing.families import save_family
    from tests.cli_helpers import assert_clean_failure, invoke
    from tests.conftest import write_jsonl

    path = save_family(tmp_path / "mixtral", "mixtral", vocabulary_texts())
    load_model = context.load_model

    def scaling(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        for layer in with_linear_experts(model).get_submodule("model.layers").children():
            block = layer.get_submodule("mlp")
            block.__class__ = _ScalingBlock
        return model, tokenizer

    monkeypatch.setattr(context, "load_model", scaling)
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)])
    raw = job_config(tmp_path, path, train, model={"tokenizer": str(path / "tokenizer")})
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(raw))
    result = invoke("index", config, "--no-progress")
    assert_clean_failure(result, "was given rows that are not rows of its block model.layers.0.mlp's input")
    assert result.output.count("error:") == 1
    assert not (tmp_path / "store.zarr").exists()
