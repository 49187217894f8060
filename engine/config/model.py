"""model: which weights, tokenizer and adapter, and which of their modules are tracked."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.config.section import Section as _Section


class ModelConfig(_Section):
    path: str = Field(description="HF model directory (or a hub id already in the local cache)")
    tokenizer: str | None = Field(default=None, description="tokenizer directory; default model.path")
    adapter: str | None = Field(default=None, description="peft adapter directory; gradients of adapter weights only")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    modules: list[str] | None = Field(
        default=None,
        description="fnmatch patterns of tracked module names; default: every supported module "
        "except lm_head and embeddings",
    )
    include_bias: bool = Field(default=True, description="treat a bias as a constant-1 input column (as kronfluence)")
    adapter_mode: Literal["adapter", "merged", "base"] = Field(
        default="adapter",
        description="with an adapter: attribute its weights (adapter), the merged model's weights "
        "(merged: adapter folded into the base), or the base model alone (base: adapter checked, not applied)",
    )
    min_coverage: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="refuse a run tracking less than this share of the non-embedding parameters (of the adapter's "
        "in adapter mode); default 0.5, or 0 where model.modules chooses the modules by hand",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="run the Python code a checkpoint ships (config.json auto_map); false: such a checkpoint is "
        "refused before anything is written",
    )
