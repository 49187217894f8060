"""`tributary demo --retrain`: the recipe's LoRA fine-tune run through `transformers.Trainer` with
TributaryCallback, which writes the demo's store from the training backward itself, so no index pass runs.

The fine-tune follows RECIPE["train"] (LoRA rank 8 on the attention projections of the top 8 layers, AdamW at
lr 2e-3 without weight decay, 10% linear warm-up then constant, 8 rows a step, seed 0) for `steps` optimizer
steps. The store is a training-run store of two segments: the last one is the last epoch (each row once, at
the weights just before the step that used it), so the demo's influence function and Grad-Dot read the last
epoch's rows and factors; the final adapter is saved beside the store (<store>.weights/), where the query
loads it from.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from engine.config import JobConfig
from engine.errors import TributaryError


def segment_boundaries(steps: int, rows: int, batch_size: int) -> list[int]:
    """Cut after the second-to-last epoch, so the last segment is the last epoch (none for a one-epoch run)."""
    per_epoch = math.ceil(rows / batch_size)
    return [steps - per_epoch] if steps > per_epoch else []


def capture_config(config: JobConfig, steps: int, rows: int) -> JobConfig:
    """The demo's config for training with capture: no adapter yet (the Trainer trains a new one), a training run
    cut by `segment_boundaries`, no Ray cluster (nothing is indexed)."""
    from engine.demo_assets.adapter import RECIPE

    boundaries = segment_boundaries(steps, rows, RECIPE["train"]["batch_size"])
    return config.derive(
        source="the demo's config (--retrain: the store is captured while training)",
        model={"adapter": None},
        training_run={"boundaries": boundaries or None, "total_steps": steps},
        cluster=None,
    )


def recipe_lora(model_dir: str | Path):
    """The model with the recipe's LoRA adapter freshly initialised (seeded: the same adapter every time)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.demo_assets.adapter import RECIPE
    from engine.model.loading import quiet_peft_deprecations

    recipe = RECIPE["train"]
    torch.manual_seed(recipe["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    depth = model.config.num_hidden_layers
    lora = LoraConfig(
        r=recipe["rank"],
        lora_alpha=2 * recipe["rank"],
        lora_dropout=0.0,
        bias="none",
        target_modules=list(recipe["target_modules"]),
        layers_to_transform=sorted({layer % depth for layer in recipe["layers"]}),
        task_type="CAUSAL_LM",
    )
    with quiet_peft_deprecations():
        return get_peft_model(model, lora)


def train_with_capture(model_dir: str | Path, config: JobConfig, steps: int, out_dir: Path) -> dict:
    """Fine-tune a LoRA adapter on config.data.train by the recipe for `steps` steps, capturing the store at
    config.store.path; returns the training's figures (also written to out_dir/training.json)."""
    from transformers import Trainer, TrainingArguments

    from engine.demo_assets.adapter import RECIPE
    from engine.integrations import TrainingRows, TributaryCallback

    if steps < 1:
        raise TributaryError(f"the demo's retraining needs at least one step, not {steps}")
    recipe = RECIPE["train"]
    started = time.perf_counter()
    model = recipe_lora(model_dir)
    rows = TrainingRows(config)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=recipe["batch_size"],
        max_steps=steps,
        optim="adamw_torch",
        learning_rate=recipe["lr"],
        weight_decay=0.0,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # the batches carry their row indices to the callback
        use_cpu=True,
        seed=recipe["seed"],
        disable_tqdm=True,
        logging_strategy="no",
    )
    loaded = time.perf_counter()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=rows.collate,
        callbacks=[TributaryCallback(config, rows)],
    )
    output = trainer.train()
    trained = time.perf_counter()
    figures = {
        "steps": steps,
        "rows": len(rows),
        "boundaries": config.training_run.boundaries if config.training_run else None,
        "train_loss": round(float(output.training_loss), 4),
        "seconds": {"load": round(loaded - started, 2), "train_and_capture": round(trained - loaded, 2)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "training.json").write_text(json.dumps(figures, indent=1) + "\n")
    return figures
