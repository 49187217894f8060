"""Models Tributary cannot attribute as given: one clear line naming the input and the fix, and nothing
written (no store). A checkpoint that needs its own Python code (config.json auto_map, or a model_type this
transformers does not know) is refused unless model.trust_remote_code is true, and its code never runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engine.testing.families import save_family
from engine.testing.tiny import save_tiny
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import job_config, vocabulary_texts, write_jsonl


def _index_fails(tmp_path: Path, raw: dict, *expected: str):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = invoke("index", config, "--no-progress")
    assert_clean_failure(result, *expected)
    assert result.output.count("error:") == 1
    assert not Path(raw["store"]["path"]).exists(), "a refused index must not create the store"
    return result


CUSTOM_CODE = """
from pathlib import Path
Path(__file__).with_name("code_ran").write_text("the checkpoint's own code ran")
"""


def _remote_code_checkpoint(source: Path, directory: Path, auto_map: bool) -> Path:
    """A copy of a tiny Llama whose config.json asks for the checkpoint's own code (a model_type transformers does
    not know, with or without an auto_map naming modules shipped beside it that leave a mark if imported)."""
    shutil.copytree(source, directory)
    raw = json.loads((directory / "config.json").read_text())
    raw["model_type"] = "tributary_custom"
    if auto_map:
        raw["auto_map"] = {
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        }
        for module in ("configuration_custom.py", "modeling_custom.py"):
            (directory / module).write_text(CUSTOM_CODE)
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


@pytest.mark.parametrize("auto_map", [True, False], ids=["auto_map", "unknown_model_type"])
def test_a_checkpoint_needing_remote_code_is_refused_and_its_code_never_runs(
    auto_map, tiny_models, text_train, tmp_path
):
    path = _remote_code_checkpoint(tiny_models["llama"], tmp_path / "custom", auto_map)
    raw = job_config(tmp_path, path, text_train)
    assert "trust_remote_code" not in raw["model"]  # the default
    needs = ["model_type 'tributary_custom' is not a family transformers"]
    needs += ["auto_map names custom code (configuration_custom.CustomConfig"] if auto_map else []
    _index_fails(tmp_path, raw, f"model.path {path} needs remote code", *needs, "model.trust_remote_code")
    assert not (path / "code_ran").exists()


def test_an_auto_map_beside_a_known_family_loads_that_family_without_running_the_code(tiny_models, tmp_path):
    """transformers uses its own implementation of a model_type it knows, whatever auto_map says: not refused."""
    from engine.config import ModelConfig
    from engine.model.loading import load_model, refuse_remote_code

    path = _remote_code_checkpoint(tiny_models["llama"], tmp_path / "custom", auto_map=True)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(raw, model_type="llama")))
    refuse_remote_code(str(path), trust_remote_code=False)
    model, _ = load_model(ModelConfig(path=str(path)), torch.device("cpu"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not (path / "code_ran").exists()


def test_the_model_loader_refuses_remote_code_too(tiny_models, tmp_path):
    """Entry points that load the model without the index's input check (query, serve, training capture)."""
    from engine.config import ModelConfig
    from engine.errors import TributaryError
    from engine.model.loading import load_model

    path = _remote_code_checkpoint(tiny_models["llama"], tmp_path / "custom", auto_map=True)
    with pytest.raises(TributaryError, match="needs remote code"):
        load_model(ModelConfig(path=str(path)), torch.device("cpu"))
    assert not (path / "code_ran").exists()


def test_a_model_with_nothing_trackable_is_refused(text_train, tmp_path):
    """A GPT-2 with no blocks: embeddings, a final norm and the tied head, and no linear map to track."""
    path = save_tiny(tmp_path / "no-blocks", "gpt2", vocabulary_texts(), hidden=8, layers=0, heads=2, seed=1)
    _index_fails(tmp_path, job_config(tmp_path, path, text_train), "the model has no supported module")


def test_experts_that_cannot_be_split_are_refused_before_the_store_exists(text_train, tmp_path, monkeypatch):
    """A mixture-of-experts family whose 3-D expert weights lack the projection the per-expert loop needs:
    the refusal comes from the worker's description of the model, before the store is created."""
    from engine.gradients import context

    path = save_family(tmp_path / "mixtral", "mixtral", vocabulary_texts())
    load_model = context.load_model

    def unsplittable(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        for experts in (m for name, m in model.named_modules() if name.endswith("mlp.experts")):
            experts.up_proj_3d = torch.nn.Parameter(experts.get_parameter("gate_up_proj").data)
            del experts.gate_up_proj
        return model, tokenizer

    monkeypatch.setattr(context, "load_model", unsplittable)
    raw = job_config(tmp_path, path, text_train, model={"tokenizer": str(path / "tokenizer")})
    _index_fails(tmp_path, raw, "cannot split per expert", "model.modules")


TRUSTED_CONFIG = """
from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "tributary_custom"
"""

TRUSTED_MODEL = """
from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


def test_trusted_remote_code_is_indexed_like_the_family_it_wraps(tiny_models, text_train, tmp_path):
    """model.trust_remote_code: true on a checkpoint whose own code subclasses Llama: every step that reads the
    model (the plan's structure included) runs that code, and the rows and a query's scores equal the plain
    Llama's."""
    from engine.config import parse_config
    from engine.local_or_ray import run_index, run_query
    from engine.store import GradientStore

    path = _remote_code_checkpoint(tiny_models["llama"], tmp_path / "custom", auto_map=True)
    (path / "configuration_custom.py").write_text(TRUSTED_CONFIG)
    (path / "modeling_custom.py").write_text(TRUSTED_MODEL)
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"prompt": "the fox eats", "completion": " berries"}])
    stores, scores = {}, {}
    for name, model, trust in (("plain", tiny_models["llama"], False), ("custom", path, True)):
        raw = job_config(tmp_path / name, model, text_train)
        raw["model"]["trust_remote_code"] = trust
        stores[name] = run_index(parse_config(raw), show_progress=False)
        scores[name] = run_query(parse_config(raw), str(queries), 3).total
    custom = GradientStore.open(str(stores["custom"].path))
    plain = GradientStore.open(str(stores["plain"].path))
    assert custom.manifest.complete
    np.testing.assert_array_equal(custom.read_rows(0, 8), plain.read_rows(0, 8))
    assert scores["plain"] is not None and scores["plain"].shape == (1, 8)
    np.testing.assert_array_equal(scores["custom"], scores["plain"])
