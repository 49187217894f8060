"""Tiny GPT-2 checkpoints as an HF Trainer leaves them (a checkpoint-STEP directory with its trainer_state.json),
trained by plain SGD at known rates, and the per-example gradients at a checkpoint by brute-force autograd."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine.config import parse_config
from engine.gradients.context import prepare_index_job
from engine.training_run.configs import checkpoint_config
from tests.conftest import SENTENCES
from tests.reference import autograd_per_example

QUERIES = [
    {"id": "q0", "text": "the fox eats seeds in the snow"},
    {"id": "q1", "text": SENTENCES[3]},
]  # queries of the run tests
RATES = [0.05, 0.04, 0.03, 0.02, 0.01, 0.005]  # the learning rate of steps 1..6, as a linear-decay schedule logs it


def train_checkpoints(base: Path, out: Path, saves=(2, 4, 6), log_every: int = 1) -> list[Path]:
    """SGD on the tiny GPT-2 (mean token loss over SENTENCES, batch = all), a checkpoint-STEP directory at each
    step in `saves`, each with the trainer_state.json an HF Trainer writes (log_history with learning_rate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    paths, history = [], []
    for step in range(1, max(saves) + 1):
        loss = model(**batch, labels=labels).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters()])
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= RATES[step - 1] * g
        if step % log_every == 0:
            history.append({"step": step, "learning_rate": RATES[step - 1], "loss": float(loss.detach())})
        if step in saves:
            path = out / f"checkpoint-{step}"
            model.save_pretrained(path)
            (path / "trainer_state.json").write_text(
                json.dumps({"global_step": step, "max_steps": max(saves), "log_history": history})
            )
            paths.append(path)
    return paths


def checkpoint_context(raw: dict, weights: Path, rows_file: Path):
    config = checkpoint_config(parse_config(raw), str(weights), str(rows_file), "unused")
    return prepare_index_job(config)


def reference_rows(raw, weights, rows_file) -> np.ndarray:
    job = checkpoint_context(raw, weights, rows_file)
    context = job.context
    return autograd_per_example(context.model, context.modules, job.tokenized, context.pad_id).numpy()
