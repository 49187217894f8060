"""kronfluence's side of a comparison on Tributary's model and rows: a causal-LM task, the tokenized rows as a
dataset, GPT-2's Conv1D modules as the nn.Linear kronfluence wraps, and its EK-FAC scores with its defaults.
tests/spectral/test_kronfluence.py shows the two libraries' scores equal with these; benchmarks/index_throughput.py
times them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn
from torch.utils.data import Dataset

from engine.data.batching import collate

IGNORE = -100


def causal_lm_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits


def summed_next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over the batch and over tokens whose (shifted) label is not -100 of the next-token cross-entropy."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    return functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def sampled_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The true Fisher's labels: next tokens drawn from the model at the counted positions."""
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float(), dim=-1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(labels.shape)
        shifted = torch.roll(drawn, 1, dims=1)  # logits at t predict the label at t + 1
        return torch.where(labels != IGNORE, shifted, labels)


def causal_lm_task(module_names: list[str], true_fisher: bool):
    """A kronfluence Task tracking `module_names`. With `true_fisher` False, kronfluence asking for sampled
    labels is an error, so an empirical-Fisher comparison cannot silently become a true-Fisher one."""
    from kronfluence.task import Task

    class CausalLMTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            logits = causal_lm_logits(model, batch)
            labels = batch["labels"]
            if sample:
                if not true_fisher:
                    raise NotImplementedError("this comparison uses the empirical Fisher (no sampled labels)")
                labels = sampled_labels(logits, labels)
            return summed_next_token_loss(logits, labels)

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return summed_next_token_loss(causal_lm_logits(model, batch), batch["labels"])

        def get_influence_tracked_modules(self) -> list[str]:
            return list(module_names)

        def get_attention_mask(self, batch) -> torch.Tensor:
            return batch["attention_mask"]

    return CausalLMTask()


class RowDataset(Dataset):
    """Tokenized rows as dicts of tensors, padded by engine's collate to one common width."""

    def __init__(self, tokenized, pad_id: int):
        batch = collate(list(tokenized), pad_id, "right")
        self.items = [
            {
                "input_ids": batch.input_ids[i],
                "attention_mask": batch.attention_mask[i],
                "position_ids": batch.position_ids[i],
                "labels": batch.labels[i],
            }
            for i in range(len(tokenized))
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def conv1d_to_linear(model: nn.Module, names: list[str]) -> None:
    """Replace tracked HF Conv1D modules (y = x W + b, W: d_in x d_out) by the equivalent nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        conv = getattr(parent, child)
        if not isinstance(conv, Conv1D):
            continue
        d_in, d_out = conv.weight.shape
        linear = nn.Linear(d_in, d_out, bias=conv.bias is not None, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        linear.requires_grad_(False)
        setattr(parent, child, linear)


def _clock_method(instance, name: str, stages: dict[str, float]) -> None:
    """Shadow `instance.name` by a wrapper that records its seconds in stages[name + "_s"]."""
    inner = getattr(instance, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            stages[f"{name}_s"] = time.perf_counter() - started

    setattr(instance, name, timed)


def kronfluence_scores(
    config, queries: str, batch: int, work: Path, stages: dict[str, float] | None = None
) -> tuple[np.ndarray, float]:
    """(queries × rows) EK-FAC influence scores with kronfluence's defaults (true Fisher, float32, heuristic
    damping) and the seconds of its factor fit and pairwise scoring (model loading and tokenising excluded);
    `stages`, where given, gets each of the two's seconds."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from engine.data.rows import field_names, read_rows
    from engine.gradients.context import prepare_index_job
    from engine.model.loading import load_model

    job = prepare_index_job(config)
    names = list(job.context.modules)
    query_rows = job.context.tokenize(read_rows(queries, field_names(config)), queries)
    train_set, query_set = RowDataset(job.tokenized, job.context.pad_id), RowDataset(query_rows, job.context.pad_id)
    del job
    model, _ = load_model(config.model, torch.device("cpu"))
    conv1d_to_linear(model, names)
    task = causal_lm_task(names, true_fisher=True)
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="bench",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(work),
        disable_model_save=True,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    if stages is not None:  # fit_all_factors calls these three in turn: each one's seconds
        for name in ("fit_covariance_matrices", "perform_eigendecomposition", "fit_lambda_matrices"):
            _clock_method(analyzer, name, stages)
    torch.manual_seed(0)
    started = time.perf_counter()
    analyzer.fit_all_factors(
        "ekfac",
        dataset=train_set,
        per_device_batch_size=batch,
        factor_args=FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )
    fitted = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "scores",
        "ekfac",
        query_dataset=query_set,
        train_dataset=train_set,
        per_device_query_batch_size=batch,
        per_device_train_batch_size=batch,
        score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )
    seconds = time.perf_counter() - started
    if stages is not None:
        stages.update(factors_s=fitted - started, scores_s=started + seconds - fitted)
    scores = analyzer.load_pairwise_scores("scores")
    if scores is None:
        raise RuntimeError("kronfluence saved no scores")
    return scores["all_modules"].to(torch.float64).numpy(), seconds
