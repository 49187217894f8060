"""A small LoRA fine-tune on CPU: peft adapters on the attention projections, plain AdamW.

Rows are prompt/completion dicts (as `shakespeare.passages` makes them) and are tokenised exactly as
`tributary index` tokenises them (engine.data.tokenize: prompt with the tokenizer's special tokens,
completion without), so the loss being trained is the loss being attributed: next-token cross-entropy
over completion tokens only, here averaged over the batch's counted tokens. Batches are drawn from a
seeded permutation, epoch after epoch; with `dropout=0` and a fixed thread count the run is repeatable.

The adapter is written with `save_pretrained` (adapter_config.json + adapter_model.safetensors) to a
`.part` directory that is renamed into place, with `training.json` (settings, losses, timings) beside it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from engine.errors import TributaryError

TARGET_MODULES = ("q_proj", "v_proj")
# The top 8 of SmolLM2-135M's 30 layers: backward (in training and in `tributary index`) stops there,
# ~30% faster per step than adapting every layer and a quarter of the adapter gradients to index.
DEMO_LAYERS = tuple(range(-8, 0))


def _records(rows: Sequence[dict]):
    from engine.data.rows import Row

    records = []
    for index, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise TributaryError(f"train_lora: row {index} ({row.get('id', index)}) needs 'prompt' and 'completion'")
        records.append(
            Row(
                index=index,
                id=str(row.get("id", index)),
                line=index + 1,
                prompt=row["prompt"],
                completion=row["completion"],
            )
        )
    return records


def _tokenized(rows: Sequence[dict], tokenizer, max_length: int):
    from engine.data.tokenize import tokenize_rows

    return tokenize_rows(_records(rows), tokenizer, max_length, "LoRA training rows")


def train_lora(
    model_dir: str | os.PathLike,
    rows: Sequence[dict],
    out_dir: str | os.PathLike,
    steps: int = 80,
    rank: int = 8,
    seed: int = 0,
    *,
    alpha: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 8,
    max_length: int = 128,
    target_modules: Sequence[str] = TARGET_MODULES,
    layers: Sequence[int] | None = DEMO_LAYERS,
    threads: int | None = None,
    progress: bool = True,
    log=None,
) -> Path:
    """Train a LoRA adapter for the causal LM in `model_dir` on `rows`; returns `out_dir`.

    `rank` r with `alpha` (default 2r) on `target_modules` of the decoder `layers` (None: every layer;
    negative numbers count from the top, e.g. range(-8, 0) for the last 8: backward, here and in
    `tributary index`, then stops at the lowest adapted layer), no dropout; AdamW(`lr`, no
    weight decay) with a linear warm-up over the first 10% of `steps` then constant. `threads` sets torch's
    intra-op threads for the run (None: leave as is). `log(step, loss)` is called after every step.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.capture.loss import per_example_loss
    from engine.data.batching import collate
    from engine.model.loading import quiet_peft_deprecations
    from engine.progress import progress_bar

    if steps < 1 or batch_size < 1 or not rows:
        raise TributaryError(
            f"train_lora: needs rows, steps >= 1 and batch_size >= 1 (got {len(rows)} rows, "
            f"steps={steps}, batch_size={batch_size})"
        )
    _records(rows)  # bad rows are refused before the model loads
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        depth = model.config.num_hidden_layers
        chosen_layers = None if layers is None else sorted({layer % depth for layer in layers})
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha or 2 * rank,
            lora_dropout=0.0,
            bias="none",
            target_modules=list(target_modules),
            layers_to_transform=chosen_layers,
            task_type="CAUSAL_LM",
        )
        with quiet_peft_deprecations():
            model = get_peft_model(model, config)
        model.train()
        tokenized = _tokenized(rows, tokenizer, max_length)
        loaded = time.perf_counter()
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        warmup = max(1, steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        generator = random.Random(seed)
        order: list[int] = []
        losses: list[float] = []
        step_seconds: list[float] = []
        with progress_bar(progress) as bars:
            task = bars.add_task("LoRA training", total=steps * batch_size)
            for step in range(steps):
                tick = time.perf_counter()
                while len(order) < batch_size:
                    epoch = list(range(len(tokenized)))
                    generator.shuffle(epoch)
                    order.extend(epoch)
                chosen, order = order[:batch_size], order[batch_size:]
                batch = collate([tokenized[i] for i in chosen], tokenizer.pad_token_id)
                logits = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
                ).logits
                counted = (batch.labels[:, 1:] != -100).sum()
                loss = per_example_loss(logits, batch.labels).sum() / counted
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                step_seconds.append(time.perf_counter() - tick)
                if log is not None:
                    log(step, losses[-1])
                bars.update(task, description=f"LoRA training (loss {losses[-1]:.2f})")
                bars.advance(task, batch_size)
        trained = time.perf_counter()
        model.eval()
        out = Path(out_dir)
        part = out.with_name(out.name + f".part-{os.getpid()}")
        if part.exists():
            shutil.rmtree(part)
        model.save_pretrained(str(part))
        (part / "training.json").write_text(
            json.dumps(
                {
                    "rows": len(rows),
                    "steps": steps,
                    "batch_size": batch_size,
                    "rank": rank,
                    "alpha": alpha or 2 * rank,
                    "lr": lr,
                    "max_length": max_length,
                    "target_modules": list(target_modules),
                    "layers": chosen_layers,
                    "seed": seed,
                    "threads": torch.get_num_threads(),
                    "trainable_parameters": sum(p.numel() for p in trainable),
                    "losses": [round(value, 4) for value in losses],
                    "seconds": {
                        "load": round(loaded - started, 2),
                        "train": round(trained - loaded, 2),
                        "per_step": round((trained - loaded) / steps, 3),
                        "steps": [round(value, 3) for value in step_seconds],
                    },
                },
                indent=1,
            )
        )
        if out.exists():
            shutil.rmtree(out)
        os.rename(part, out)
        return out
    finally:
        if threads is not None:
            torch.set_num_threads(previous_threads)
