"""The coverage report: what a run tracks by module kind, counted against the model's own parameters; a run
below model.min_coverage is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from engine.capture.coverage import check_coverage, model_coverage
from engine.capture.modules import select_modules, tracked_shapes
from engine.config import parse_config
from engine.errors import TributaryError
from engine.gradients.context import load_model_context
from engine.testing.families import build_family_model
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import job_config


def _coverage(model: nn.Module, patterns=None, include_bias=True):
    modules = select_modules(model, patterns)
    width = sum(d_in * d_out for _, d_in, d_out in tracked_shapes(modules, include_bias))
    return modules, model_coverage(model, modules, include_bias, width, "float32")


def test_llama_coverage_counts_match_its_parameters():
    model = build_family_model("llama", vocab_size=40)
    modules, coverage = _coverage(model)
    by_name = dict(model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    embeddings = by_name["model.embed_tokens.weight"].numel() + by_name["lm_head.weight"].numel()
    norms = sum(p.numel() for name, p in by_name.items() if "norm" in name)
    linears = [m for m in model.modules() if type(m) is nn.Linear and m is not model.lm_head]
    tracked = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in linears)
    report = coverage.to_dict()
    assert report["parameters"] == total
    assert report["attributable_parameters"] == total - embeddings
    assert report["tracked_parameters"] == tracked == total - embeddings - norms
    assert report["coverage"] == pytest.approx(tracked / (total - embeddings), abs=1e-6)
    assert report["kinds"]["attention"] == {
        "modules": 8,
        "tracked_modules": 8,
        "parameters": sum(p.numel() for n, p in by_name.items() if "self_attn" in n),
        "tracked_parameters": sum(p.numel() for n, p in by_name.items() if "self_attn" in n),
    }
    assert report["kinds"]["mlp"]["tracked_modules"] == 6
    assert report["kinds"]["norms"] == {
        "modules": 5,
        "tracked_modules": 0,
        "parameters": norms,
        "tracked_parameters": 0,
    }
    assert report["bytes_per_row"] == 4 * sum(d_in * d_out for _, d_in, d_out in tracked_shapes(modules, True))
    assert any(line.startswith("norms, ") for line in report["skipped"])


def test_tied_embeddings_are_counted_once():
    model = build_family_model("gpt2", vocab_size=40)
    _, coverage = _coverage(model)
    assert coverage.parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_coverage_counts_every_expert_and_router(family):
    model = build_family_model(family, vocab_size=40)
    modules, coverage = _coverage(model)
    config = model.config
    experts = config.num_local_experts * config.num_hidden_layers
    report = coverage.to_dict()
    # a gate/up and a down slice per expert and layer, all tracked; one router per layer
    assert report["kinds"]["experts"]["modules"] == report["kinds"]["experts"]["tracked_modules"] == 2 * experts
    assert report["kinds"]["router"]["tracked_modules"] == config.num_hidden_layers
    fused = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert report["kinds"]["experts"]["parameters"] == report["kinds"]["experts"]["tracked_parameters"] == fused
    # experts are most of the parameters: without them coverage would fall below the default minimum
    without = {name: m for name, m in modules.items() if ".experts." not in name}
    thin = model_coverage(model, without, True, 1, "float32")
    assert thin.share < 0.5 < coverage.share
    with pytest.raises(TributaryError, match="experts modules not chosen by model.modules"):
        check_coverage(thin, 0.5, chosen_by_hand=True)


class _Scale(nn.Module):
    """A module type Tributary has no kind for, holding a parameter."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width, width))

    def forward(self, x):
        return x @ self.scale


def test_an_unknown_module_type_is_listed_not_dropped():
    model = nn.Sequential(nn.Linear(4, 4), _Scale(4))
    modules, coverage = _coverage(model)
    assert list(modules) == ["0"]
    assert coverage.tracked == 20 and coverage.attributable == 36
    assert any(reason.startswith("_Scale, 16 parameters") for reason in coverage.skipped)
    with pytest.raises(TributaryError, match=r"55\.6%.*_Scale, 16 parameters"):
        check_coverage(coverage, 0.9, chosen_by_hand=False)


def test_default_minimum_applies_to_automatic_selection_only():
    model = nn.Sequential(nn.Linear(2, 2), _Scale(4))
    _, coverage = _coverage(model)
    assert coverage.share < 0.5
    with pytest.raises(TributaryError, match="below model.min_coverage 0.5"):
        check_coverage(coverage, None, chosen_by_hand=False)
    check_coverage(coverage, None, chosen_by_hand=True)  # a hand-made selection is the user's to make


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_index_reports_coverage_in_output_manifest_and_info(tmp_path, tiny_models, text_train):
    raw = job_config(tmp_path, tiny_models["llama"], text_train)
    result = invoke("index", _write(tmp_path / "job.yaml", raw), "--no-progress")
    assert result.exit_code == 0, result.output
    context = load_model_context(parse_config(raw))
    assert context.coverage is not None
    expected = context.coverage.to_dict()
    assert "tracking" in result.output and "modules tracked by kind: attention 8/8, mlp 6/6" in result.output
    assert "bytes per row" in result.output
    info = invoke("info", raw["store"]["path"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["coverage"] == expected
    # the reported row size is the store's
    assert expected["bytes_per_row"] == 8 * json.loads(info.stdout)["width"]


def test_index_below_min_coverage_is_refused_and_writes_nothing(tmp_path, tiny_models, text_train):
    raw = job_config(tmp_path, tiny_models["llama"], text_train, model={"min_coverage": 1.0})
    result = invoke("index", _write(tmp_path / "job.yaml", raw), "--no-progress")
    assert_clean_failure(result, "below model.min_coverage 1", "norms, ", "lower model.min_coverage")
    assert not Path(raw["store"]["path"]).exists()


def test_index_with_hand_chosen_modules_below_an_explicit_minimum_is_refused(tmp_path, tiny_models, text_train):
    raw = job_config(tmp_path, tiny_models["llama"], text_train, model={"modules": ["*q_proj"], "min_coverage": 0.5})
    result = invoke("index", _write(tmp_path / "job.yaml", raw), "--no-progress")
    assert_clean_failure(result, "below model.min_coverage 0.5", "attention modules not chosen by model.modules")
    assert not Path(raw["store"]["path"]).exists()
