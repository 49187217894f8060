"""Independent reference computations for tests: brute-force autograd, one example at a time, and kronfluence's
EK-FAC (an independent library) on the same tokenized rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.capture.loss import per_example_loss
from engine.capture.modules import TrackedKind
from engine.config import JobConfig
from engine.data.batching import collate
from engine.data.rows import field_names, read_rows
from engine.gradients.context import IndexJob, prepare_index_job
from engine.model.loading import load_model


def autograd_per_example(
    model, modules: dict, tokenized_rows, pad_id: int, include_bias: bool = True, labels_override=None
) -> torch.Tensor:
    """(N, D) gradients in the store layout: per module the d_out x (d_in [+1 bias]) gradient, row-major.

    Each example runs alone (no padding) and `torch.autograd.grad` differentiates its summed loss
    with respect to the tracked modules' weights directly.
    """
    params = []
    for module in modules.values():
        params.append(module.weight)
        if include_bias and module.bias is not None:
            params.append(module.bias)
    for param in params:
        param.requires_grad_(True)
    rows = []
    try:
        for i, row in enumerate(tokenized_rows):
            batch = collate([row], pad_id)
            labels = batch.labels if labels_override is None else labels_override[i]
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            loss = per_example_loss(logits, labels).sum()
            grads = dict(zip([id(p) for p in params], torch.autograd.grad(loss, params)))
            pieces = []
            for module in modules.values():
                kind = TrackedKind.for_module(module)
                assert kind is not None, f"{type(module).__name__} is not a tracked kind"
                weight_grad = grads[id(module.weight)]
                weight_grad = weight_grad.t() if kind.weight_as_out_in(module) is not module.weight else weight_grad
                if include_bias and module.bias is not None:
                    weight_grad = torch.cat([weight_grad, grads[id(module.bias)][:, None]], dim=1)
                pieces.append(weight_grad.flatten())
            rows.append(torch.cat(pieces))
    finally:
        for param in params:
            param.requires_grad_(False)
    return torch.stack(rows)


def _reference_targets(model, names) -> list[tuple]:
    """Per tracked name: (weight parameter, expert index or None, weight stored (in, out), bias parameter or None),
    read from the model's own parameters: a fused experts module's `<experts>.gate_up.<e>` is slice e of its 3-D
    `gate_up_proj` (`up`, `down` likewise), never through Tributary's expert slices."""
    fused_names = {"gate_up": "gate_up_proj", "up": "up_proj", "down": "down_proj"}
    targets = []
    for name in names:
        parent, _, last = name.rpartition(".")
        owner, _, projection = parent.rpartition(".")
        if last.isdigit() and projection in fused_names:
            experts = model.get_submodule(owner)
            fused = getattr(experts, fused_names[projection])
            bias = getattr(experts, fused_names[projection] + "_bias", None)
            targets.append((fused, int(last), bool(getattr(experts, "is_transposed", False)), bias))
            continue
        module = model.get_submodule(name)
        transposed = type(module).__name__ == "Conv1D"
        targets.append((module.weight, None, transposed, getattr(module, "bias", None)))
    return targets


def autograd_per_example_of_parameters(model, names, tokenized_rows, pad_id: int, include_bias: bool = True):
    """(N, D) per-example gradients in the store layout for tracked `names`, by autograd of each example's summed
    loss with respect to the model's parameters (3-D expert parameters whole, then sliced per expert)."""
    targets = _reference_targets(model, names)
    params = {id(p): p for weight, _, _, bias in targets for p in (weight, bias) if p is not None}
    for param in params.values():
        param.requires_grad_(True)
    rows = []
    try:
        for row in tokenized_rows:
            batch = collate([row], pad_id)
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            loss = per_example_loss(logits, batch.labels).sum()
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
            pieces = []
            for weight, expert, transposed, bias in targets:
                weight_grad = grads[id(weight)]
                weight_grad = torch.zeros_like(weight) if weight_grad is None else weight_grad
                bias_grad = None
                if include_bias and bias is not None:
                    bias_grad = grads[id(bias)]
                    bias_grad = torch.zeros_like(bias) if bias_grad is None else bias_grad
                if expert is not None:
                    weight_grad = weight_grad[expert]
                    bias_grad = None if bias_grad is None else bias_grad[expert]
                weight_grad = weight_grad.t() if transposed else weight_grad
                if bias_grad is not None:
                    weight_grad = torch.cat([weight_grad, bias_grad[:, None]], dim=1)
                pieces.append(weight_grad.flatten())
            rows.append(torch.cat(pieces))
    finally:
        for param in params.values():
            param.requires_grad_(False)
    return torch.stack(rows)


# ---- kronfluence's EK-FAC -------------------------------------------------------------------------------------

KRONFLUENCE_QUERIES = [
    {"id": "q0", "text": "the fox eats clams in the snow"},
    {"id": "q1", "prompt": "the owl eats", "completion": " fish at night"},
    {"id": "q2", "text": "a wolf eats honey in the cold forest"},
]


def mixed_train(path: Path) -> Path:
    """Text rows and prompt/completion rows in one file, so padding and prompt masking are both exercised."""
    from tests.conftest import PROMPTS, SENTENCES, write_jsonl  # here: benchmarks import this module without pytest

    rows = [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)]
    rows += [{"id": f"p{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)]
    return write_jsonl(path, rows)


@dataclass
class KronfluenceEkfac:
    """kronfluence's EK-FAC (empirical Fisher, every dtype float64) fitted on the rows `tributary index` tokenizes
    for a config, on its own copy of the model: each tracked HF Conv1D becomes the equivalent nn.Linear, since
    kronfluence wraps only nn.Linear. tests/spectral/test_kronfluence.py explains why its scores equal Tributary's
    EK-FAC scores with a constant factor of 1. Needs kronfluence (the caller skips without it)."""

    job: IndexJob
    config: JobConfig
    analyzer: Any  # kronfluence.analyzer.Analyzer

    @classmethod
    def fit(cls, config: JobConfig, output_dir: Path) -> KronfluenceEkfac:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.utils.dataset import DataLoaderKwargs

        from benchmarks.kronfluence_side import RowDataset, causal_lm_task, conv1d_to_linear

        job = prepare_index_job(config)
        names = list(job.context.modules)
        model, _ = load_model(config.model, torch.device("cpu"))
        conv1d_to_linear(model, names)
        task = causal_lm_task(names, true_fisher=False)
        analyzer = Analyzer(
            analysis_name="tributary",
            model=prepare_model(model, task),
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=str(output_dir),
            disable_model_save=True,
        )
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        f64 = torch.float64
        analyzer.fit_all_factors(
            "ekfac",
            dataset=RowDataset(job.tokenized, job.context.pad_id),
            per_device_batch_size=5,
            factor_args=FactorArguments(
                strategy="ekfac",
                use_empirical_fisher=True,
                activation_covariance_dtype=f64,
                gradient_covariance_dtype=f64,
                eigendecomposition_dtype=f64,
                per_sample_gradient_dtype=f64,
                lambda_dtype=f64,
            ),
            overwrite_output_dir=True,
        )
        return cls(job, config, analyzer)

    @property
    def module_names(self) -> list[str]:
        return list(self.job.context.modules)

    def lambdas(self) -> dict[str, np.ndarray]:
        """Λ per module: kronfluence's summed squares over the examples it processed."""
        lambdas = self.analyzer.load_lambda_matrices("ekfac")
        assert lambdas is not None, "kronfluence saved no lambda matrices"
        return {
            name: (lambdas["lambda_matrix"][name] / lambdas["num_lambda_processed"][name]).numpy()
            for name in self.module_names
        }

    def pairwise_scores(self, queries: Path | str, damping: float | None, name: str = "pairwise") -> np.ndarray:
        """(queries, training rows) float64 scores summed over modules; damping None is kronfluence's heuristic."""
        from kronfluence.arguments import ScoreArguments

        from benchmarks.kronfluence_side import RowDataset

        pad_id = self.job.context.pad_id
        query_rows = self.job.context.tokenize(read_rows(queries, field_names(self.config)), str(queries))
        f64 = torch.float64
        self.analyzer.compute_pairwise_scores(
            name,
            "ekfac",
            query_dataset=RowDataset(query_rows, pad_id),
            train_dataset=RowDataset(self.job.tokenized, pad_id),
            per_device_query_batch_size=2,
            per_device_train_batch_size=4,
            score_args=ScoreArguments(
                damping_factor=damping, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64
            ),
            overwrite_output_dir=True,
        )
        scores = self.analyzer.load_pairwise_scores(name)
        assert scores is not None, f"kronfluence saved no scores for {name}"
        return scores["all_modules"].to(f64).numpy()
