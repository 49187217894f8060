"""peft adapters: one made for another base model is refused (or, when that cannot be decided, used with
a logged warning), its target modules must exist, and scores through a peft model equal scores through
an equivalent hand-built model whose LoRA branches are plain nn.Linear layers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from engine.capture.capture import GradientCapture
from engine.capture.modules import select_modules
from engine.config import MethodConfig, ModelConfig
from engine.curvature.factors import final_factors, initial_factors
from engine.data.rows import Row, read_rows
from engine.errors import TributaryError
from engine.gradients.context import ModelContext, load_model_context
from engine.gradients.passes import gradient_pass, lambda_pass
from engine.model.loading import check_adapter_base, load_model
from engine.spectral.core import score_block, transform_queries
from engine.spectral.methods import method_from_config
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import PROMPTS, job_config
from tests.reference import autograd_per_example

LOG = "engine.model.loading"


def copy_adapter(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(changes)
    for key, value in changes.items():
        if value is None:
            config.pop(key)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


# ---- which base model ----------------------------------------------------------------------------


def test_adapter_for_another_base_model_is_refused_naming_both(tiny_models, lora_adapters):
    adapter = str(lora_adapters["llama"])
    with pytest.raises(TributaryError) as error:
        load_model(ModelConfig(path=str(tiny_models["gpt2"]), adapter=adapter))
    message = str(error.value)
    assert adapter in message and str(tiny_models["gpt2"]) in message and str(tiny_models["llama"]) in message
    assert "model_type" in message


def test_cli_refuses_a_foreign_adapter_before_writing(tiny_models, lora_adapters, text_train, tmp_path):
    raw = job_config(tmp_path, tiny_models["gpt2"], text_train, model={"adapter": str(lora_adapters["llama"])})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = invoke("index", config, "--no-progress")
    assert_clean_failure(result, "was made for base model", str(tiny_models["gpt2"]))
    assert not Path(raw["store"]["path"]).exists()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_matching_adapter_loads_without_warning(kind, tiny_models, lora_adapters, caplog):
    with caplog.at_level(logging.WARNING, logger=LOG):
        model, _ = load_model(ModelConfig(path=str(tiny_models[kind]), adapter=str(lora_adapters[kind])))
    assert not [r for r in caplog.records if r.name == LOG]
    assert any(name.endswith("lora_A.default") for name, _ in model.named_modules())


def test_adapter_whose_targets_the_model_lacks_is_refused(tiny_models, lora_adapters, tmp_path):
    # claims the gpt2 base, but targets llama's q_proj / v_proj / up_proj
    adapter = copy_adapter(
        lora_adapters["llama"], tmp_path / "mislabelled", base_model_name_or_path=str(tiny_models["gpt2"])
    )
    with pytest.raises(TributaryError, match=r"targets modules \[.*'q_proj'.*\] that model.path .*gpt2 does not have"):
        load_model(ModelConfig(path=str(tiny_models["gpt2"]), adapter=str(adapter)))


def test_shape_mismatch_from_peft_is_reraised_clearly(lora_adapters, tmp_path, caplog):
    from engine.testing.tiny import save_tiny
    from tests.conftest import vocabulary_texts

    wider = save_tiny(tmp_path / "llama-wide", "llama", vocabulary_texts(), hidden=16, layers=2, heads=2)
    adapter = copy_adapter(lora_adapters["llama"], tmp_path / "unnamed", base_model_name_or_path=None)
    with caplog.at_level(logging.WARNING, logger=LOG), pytest.raises(TributaryError) as error:
        load_model(ModelConfig(path=str(wider), adapter=str(adapter)))
    assert f"model.adapter {adapter} cannot be attached to model.path {wider}" in str(error.value)
    assert any("records no base_model_name_or_path" in r.getMessage() for r in caplog.records)


def _model_dir(root: Path, name: str, **config) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(dict({"model_type": "llama", "hidden_size": 8}, **config)))
    return path


def test_base_model_naming_rule(tmp_path, caplog):
    """Same / different / undecidable, as check_adapter_base documents."""

    def verdict(base, model_path) -> str:
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger=LOG):
                check_adapter_base("A", base, str(model_path))
        except TributaryError as error:
            assert str(model_path) in str(error) and str(base) in str(error)
            return "different"
        return "warning" if any(r.name == LOG for r in caplog.records) else "same"

    local = _model_dir(tmp_path, "SmolLM2-135M")
    recorded = _model_dir(tmp_path, "my-copy", _name_or_path="HuggingFaceTB/SmolLM2-360M")
    cached = _model_dir(tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots", "0123abc")
    plain = _model_dir(tmp_path, "plain")
    copy = _model_dir(tmp_path, "copy-of-plain")
    other_arch = _model_dir(tmp_path, "other", model_type="gpt2")
    assert verdict(str(local), local) == "same"
    assert verdict(str(local) + "/", local) == "same"
    assert verdict("HuggingFaceTB/SmolLM2-135M", local) == "same"  # hub id vs local copy with that name
    assert verdict("huggingfacetb/smollm2-360m", recorded) == "same"  # _name_or_path in config.json
    assert verdict("HuggingFaceTB/SmolLM2-135M", recorded) == "different"
    assert verdict("HuggingFaceTB/SmolLM2-135M", cached) == "same"  # HF cache path
    assert verdict("HuggingFaceTB/SmolLM2-1.7B", cached) == "different"
    assert verdict(str(other_arch), plain) == "different"  # local base with another architecture
    assert verdict(str(plain), other_arch) == "different"
    assert verdict(str(copy), plain) == "warning"  # same architecture, another name
    assert verdict("HuggingFaceTB/SmolLM2-135M", plain) == "warning"  # nothing to compare with
    assert verdict("/home/someone/models/llama-7b", plain) == "warning"  # a path from another machine
    assert verdict(None, plain) == "warning"


# ---- peft model == hand-built model with explicit LoRA linears -----------------------------------


class ExplicitLoRA(nn.Module):
    """base(x) + B(A(x)) * scaling, with A and B plain nn.Linear layers."""

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(lora_a.shape[1], lora_a.shape[0], bias=False, dtype=lora_a.dtype)
        self.lora_B = nn.Linear(lora_b.shape[1], lora_b.shape[0], bias=False, dtype=lora_b.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_a)
            self.lora_B.weight.copy_(lora_b)
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def hand_built(peft_model, path: Path) -> tuple[nn.Module, dict[str, str]]:
    """The base model with every peft LoRA layer replaced by ExplicitLoRA; and peft name → hand-built name."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    names = {}
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        plain_name = name.removeprefix("base_model.model.")
        parent_name, _, child = plain_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
        assert isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear), name
        replacement = ExplicitLoRA(
            getattr(parent, child),
            lora_a.weight.detach().clone(),
            lora_b.weight.detach().clone(),
            layer.scaling["default"],
        )
        setattr(parent, child, replacement)
        for side in ("lora_A", "lora_B"):
            names[f"{name}.{side}.default"] = f"{plain_name}.{side}"
    model.requires_grad_(False)
    model.eval()
    return model, names


def _scores(context, train_rows, query_rows):
    train = gradient_pass(context, train_rows)
    factors = initial_factors("ekfac", train.sums.covariance, {m.name: (m.k_in, m.k_out) for m in context.spec.modules})
    factors = final_factors("ekfac", factors, lambda_pass(context, train_rows, factors).lambdas)
    queries = gradient_pass(context, query_rows, with_covariance=False).grads
    out = {}
    for name in ("grad_dot", "if"):
        method = method_from_config(MethodConfig(name=name))
        out[name] = score_block(transform_queries(queries, context.spec, method, factors), train.grads, method)
    return train.grads, out, factors


@pytest.mark.parametrize("kind,dim", [("llama", 0), ("gpt2", 0), ("llama", 4)])
def test_peft_scores_equal_hand_built_lora_scores(kind, dim, tiny_models, lora_adapters, text_train, make_config):
    config = make_config(
        tiny_models[kind], text_train, model={"adapter": str(lora_adapters[kind])}, projection={"dim": dim}
    )
    peft_context = load_model_context(config)
    hand_model, names = hand_built(peft_context.model, tiny_models[kind])
    # Tributary's own module selection on the hand-built model finds exactly the explicit LoRA linears
    assert list(select_modules(hand_model, None)) == [names[n] for n in peft_context.modules]
    hand_modules = {name: hand_model.get_submodule(names[name]) for name in peft_context.modules}
    assert all(type(m) is nn.Linear for m in hand_modules.values())
    capture = GradientCapture(hand_model, hand_modules, peft_context.spec, True, torch.float64, torch.device("cpu"))
    hand_context = ModelContext(
        config,
        hand_model,
        peft_context.tokenizer,
        hand_modules,
        peft_context.spec,
        capture,
        torch.device("cpu"),
        peft_context.pad_id,
    )

    rows = hand_context.tokenize(read_rows(text_train), "train")
    queries = hand_context.tokenize(
        [Row(index=i, id=f"q{i}", line=i + 1, prompt=p, completion=" " + c) for i, (p, c) in enumerate(PROMPTS)],
        "queries",
    )
    peft_grads, peft_scores, _ = _scores(peft_context, rows, queries)
    hand_grads, hand_scores, factors = _scores(hand_context, rows, queries)

    assert np.abs(peft_grads).max() > 0 and all(np.abs(f.lam).max() > 0 for f in factors.values())
    np.testing.assert_allclose(peft_grads, hand_grads, rtol=0, atol=1e-8 * np.abs(hand_grads).max())
    for name in ("grad_dot", "if"):
        scale = np.abs(hand_scores[name]).max()
        assert scale > 0
        np.testing.assert_allclose(peft_scores[name], hand_scores[name], rtol=0, atol=1e-8 * scale)
    if dim == 0:  # and both equal autograd on the hand-built model's plain linears
        reference = autograd_per_example(
            hand_model, {names[n]: m for n, m in hand_modules.items()}, rows, peft_context.pad_id
        ).numpy()
        np.testing.assert_allclose(hand_grads, reference, rtol=0, atol=1e-8 * np.abs(reference).max())
