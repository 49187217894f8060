"""transformers.Trainer under DeepSpeed ZeRO-3 (2 gloo ranks on CPU) with TributaryCallback against one process
without DeepSpeed training on both ranks' rows a step: the same rows, factors and trained weights; and resumed
from a Trainer checkpoint against the uninterrupted 2-rank run.

Independent computations: a one-process Trainer run (no DeepSpeed, no DDP) of 4 rows a step, the two ranks' 2
each, captured by the same callback, its trained weights against the ones DeepSpeed gathered from the
partitions; for resume, the same ZeRO-3 run without the interruption.

On CPU, transformers passes accelerate no backend under DeepSpeed and accelerate finds none for the device, so
each rank's Trainer takes itself for the only process and iterates over every row (TributaryCallback refuses
that in one line). The ranks here create accelerate's state with the gloo backend first, as a user must.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.multiprocessing.spawn import spawn
from transformers import TrainerCallback

from engine.config import JobConfig
from engine.errors import TributaryError
from engine.integrations import TrainingRows, TributaryCallback
from engine.integrations.store_writer import captured_rows
from engine.store.run_store import RunStore
from tests.conftest import SENTENCES, write_jsonl
from tests.ports import unused_port
from tests.requirements import require
from tests.train_capture_helpers import CrashAt, capture_job_config, leave_rank, resumed_run_checkpoints
from tests.zero3_training import without_shm_op, zero3_config

require("deepspeed")

TIMEOUT = 180  # seconds a rank waits in a collective before the test fails, instead of holding the heavy group


def _float32(config: JobConfig) -> JobConfig:
    return config.model_copy(update={"model": config.model.model_copy(update={"dtype": "float32"})})


def _arguments(out: Path, batch: int, deepspeed: dict | None, configured: bool = True, save: int = 0):
    """SGD with linear decay, 2 epochs of the 8 rows, seeded, a checkpoint every `save` steps (0: none); under
    DeepSpeed its micro-batch and clipping are the Trainer's ("auto"), with accelerate's state made before
    (`configured`) or by TrainingArguments."""
    from transformers import TrainingArguments

    placement: dict[str, Any] = (
        {"deepspeed": deepspeed, "accelerator_config": {"use_configured_state": configured}, "ddp_timeout": TIMEOUT}
        if deepspeed is not None
        else {"use_cpu": True}
    )
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        num_train_epochs=2,
        optim="sgd",
        learning_rate=0.05,
        lr_scheduler_type="linear",
        save_strategy="steps" if save else "no",
        save_steps=max(save, 1),
        report_to=[],
        remove_unused_columns=False,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
        **placement,
    )


def _train(
    config: JobConfig,
    model_dir: str,
    args,
    crash_at: int | None = None,
    resume: Path | None = None,
    capture: bool = True,
) -> tuple[dict[str, torch.Tensor], bool]:
    """A Trainer run with the callback (one segment an epoch; `capture` False: without it), stopped inside step
    `crash_at` or resumed from the checkpoint `resume`; the trained weights, whole, and whether ZeRO-3 had
    partitioned them."""
    from transformers import AutoModelForCausalLM, Trainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = TrainingRows(config)
    callbacks: list[TrainerCallback] = (
        [TributaryCallback(config, rows, epochs_per_segment=1, keep_weights=True)] if capture else []
    )
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=rows.collate, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    parameters = list(model.parameters())  # under ZeRO-3 DeepSpeed's engine wraps this same module
    if hasattr(parameters[0], "ds_id"):  # ZeRO-3: each rank holds a partition; gather them whole (collective)
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
            return {name: p.detach().clone() for name, p in model.named_parameters()}, True
    return {name: p.detach().clone() for name, p in model.named_parameters()}, False


def _configured_state() -> None:
    """accelerate's state with the gloo backend, made before TrainingArguments: transformers gives none under
    DeepSpeed, and without one accelerate counts a single process on CPU."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets around its own PartialState
    try:
        PartialState(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def _zero3_trainer_rank(
    rank: int,
    world: int,
    port: int,
    config: JobConfig,
    model_dir: str,
    out: str,
    configured: bool,
    capture: bool = True,
) -> None:
    """One rank of a 2-process Trainer run under ZeRO-3 (as torchrun starts it: the environment names the group).
    `configured` False: accelerate's state left to TrainingArguments; rank 0 keeps the callback's refusal.
    `capture` False: the same run without the callback."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        without_shm_op()
        if configured:
            _configured_state()
        deepspeed = dict(zero3_config("auto"), gradient_clipping="auto")
        args = _arguments(Path(out), 2, deepspeed, configured)
        try:
            weights, partitioned = _train(config, model_dir, args, capture=capture)
        except TributaryError as refusal:
            if configured:
                raise
            if rank == 0:
                (Path(out) / "refusal.txt").write_text(str(refusal))
        else:
            if rank == 0:
                torch.save({"weights": weights, "partitioned": partitioned}, Path(out) / "weights.pt")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    leave_rank()


@pytest.mark.heavy  # two spawned ZeRO-3 Trainer runs of 2 ranks (with and without capture) and a one-process run
@pytest.mark.requires_deepspeed
@pytest.mark.parametrize("fisher", ["empirical", True], ids=["empirical", "true-fisher"])
def test_trainer_under_zero3_with_two_ranks_equals_one_process(tiny_models, tmp_path, fisher):
    """2 rows a rank a step under ZeRO-3 against 4 rows a step in one process: the same shuffled rows a step
    (accelerate gives the ranks consecutive batches of the sampler's order), every row once a segment. The true
    Fisher: ZeRO-3's re-forward (run from the optimizer's pre-step hook, inside DeepSpeed's step, since the
    Trainer updates inside its backward call) against the one process's nested backward; and the weights
    bit-identical to the same ZeRO-3 Trainer run without the callback."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    curvature = {"fisher": fisher, "seed": 3}
    ranks = _float32(capture_job_config(tmp_path, tiny_models["llama"], train, "zero3.zarr", curvature=curvature))
    single = _float32(capture_job_config(tmp_path, tiny_models["llama"], train, "single.zarr", curvature=curvature))
    out = tmp_path / "zero3"
    spawn(
        _zero3_trainer_rank,
        args=(2, unused_port(), ranks, str(tiny_models["llama"]), str(out), True),
        nprocs=2,
        join=True,
    )
    alone, _ = _train(single, str(tiny_models["llama"]), _arguments(tmp_path / "single", 4, None))
    distributed, reference = RunStore.open(ranks.store.path), RunStore.open(single.store.path)
    assert distributed.manifest.complete and [s.steps for s in distributed.plan.segments] == [2, 2]
    assert [(s.steps, s.eta) for s in distributed.plan.segments] == [(s.steps, s.eta) for s in reference.plan.segments]
    for ours, theirs in zip(distributed.plan.checkpoints, reference.plan.checkpoints, strict=True):
        a, b = distributed.checkpoint(ours.name), reference.checkpoint(theirs.name)
        for name in ("step", "seen", "epoch"):
            np.testing.assert_array_equal(captured_rows(a)[name], captured_rows(b)[name])
        assert (captured_rows(a)["seen"] == 1).all()  # one epoch a segment: every row once, on one rank
        expected = b.read_rows(0, b.rows)
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(a.read_rows(0, a.rows), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
        for name, factors in b.read_factors().items():
            np.testing.assert_allclose(a.read_factors()[name].lam, factors.lam, rtol=0, atol=1e-5 * factors.lam.max())
    captured = torch.load(out / "weights.pt")
    assert captured["partitioned"]  # the Trainer did train under ZeRO-3
    for name, weight in alone.items():  # ZeRO-3 trained the same model as one process
        torch.testing.assert_close(captured["weights"][name], weight, rtol=1e-5, atol=1e-6)
    plain = tmp_path / "plain"
    arguments = (2, unused_port(), ranks, str(tiny_models["llama"]), str(plain), True, False)
    spawn(_zero3_trainer_rank, args=arguments, nprocs=2, join=True)
    for name, weight in torch.load(plain / "weights.pt")["weights"].items():  # capture left training bit-identical
        assert torch.equal(captured["weights"][name], weight), name


@pytest.mark.heavy  # two spawned ZeRO-3 Trainer ranks, refused at on_train_begin
@pytest.mark.requires_deepspeed
def test_trainer_under_zero3_on_cpu_without_accelerate_s_backend_is_refused(tiny_models, tmp_path):
    """Left to TrainingArguments, accelerate counts one process on CPU under DeepSpeed while torch.distributed runs
    two: each rank would train on every row. The callback refuses it in one line, before writing anything."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = _float32(capture_job_config(tmp_path, tiny_models["llama"], train, "zero3.zarr"))
    out = tmp_path / "zero3"
    spawn(
        _zero3_trainer_rank,
        args=(2, unused_port(), config, str(tiny_models["llama"]), str(out), False),
        nprocs=2,
        join=True,
    )
    refusal = (out / "refusal.txt").read_text()
    assert (
        refusal.startswith("the Trainer runs as 1 process(es) but torch.distributed has 2 ranks")
        and "\n" not in refusal
    )
    assert not Path(config.store.path).exists()


def test_callback_refuses_a_trainer_that_counts_other_processes_than_torch_distributed(tiny_models, tmp_path):
    """A Trainer that takes itself for one of 2 processes while torch.distributed runs none (or the reverse, the
    ZeRO-3 Trainer on CPU without a backend): one line, before any hook."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(tmp_path, tiny_models["llama"], train, "cb.zarr")
    callback = TributaryCallback(config)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float64)
    args = SimpleNamespace(remove_unused_columns=False, gradient_checkpointing=False, world_size=2)
    state = SimpleNamespace(global_step=0, max_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TributaryError, match=r"^the Trainer runs as 2 process\(es\) but torch.distributed has 1 ") as e:
        callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)
    assert "\n" not in str(e.value)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert not Path(config.store.path).exists()  # nothing written


def _next_accelerator() -> None:
    """Let the next Trainer in this process make its own Accelerator with a DeepSpeed plugin (accelerate refuses a
    second one while the first's state lives; the process state, with its gloo backend, is kept)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # pyright: ignore[reportPrivateUsage]


def _zero3_trainer_resume_rank(
    rank: int, world: int, port: int, whole: JobConfig, resumed: JobConfig, model_dir: str, out: str
) -> None:
    """One rank: an uninterrupted ZeRO-3 Trainer run into `whole`; then the same run into `resumed`, saving a
    checkpoint at step 3 (inside the second segment) and stopped inside step 4, resumed from checkpoint-3 (the
    Trainer loads DeepSpeed's checkpoint of each rank's partitions; the callback each rank's capture state).
    Rank 0 keeps both runs' trained weights."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        without_shm_op()
        _configured_state()
        deepspeed = dict(zero3_config("auto"), gradient_clipping="auto")
        uninterrupted, _ = _train(whole, model_dir, _arguments(Path(out) / "whole", 2, deepspeed))
        saving = _arguments(Path(out) / "resumed", 2, deepspeed, save=3)
        _next_accelerator()
        try:
            _train(resumed, model_dir, saving, crash_at=4)
        except RuntimeError as crash:
            if str(crash) != "crash in step 4":
                raise
        if rank == 0:
            assert not RunStore.open(resumed.store.path).manifest.complete
        _next_accelerator()
        weights, _ = _train(resumed, model_dir, saving, resume=Path(out) / "resumed" / "checkpoint-3")
        if rank == 0:
            torch.save({"uninterrupted": uninterrupted, "resumed": weights}, Path(out) / "weights.pt")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    leave_rank()


@pytest.mark.heavy  # one spawn of 2 ZeRO-3 Trainer ranks running 4 + 4 + 1 steps
@pytest.mark.requires_deepspeed
def test_trainer_under_zero3_resumed_from_a_checkpoint_gives_the_uninterrupted_store(tiny_models, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    whole, resumed = (
        _float32(capture_job_config(tmp_path, tiny_models["llama"], train, store))
        for store in ("whole.zarr", "resumed.zarr")
    )
    out = tmp_path / "runs"
    spawn(
        _zero3_trainer_resume_rank,
        args=(2, unused_port(), whole, resumed, str(tiny_models["llama"]), str(out)),
        nprocs=2,
        join=True,
    )
    _, _, pairs = resumed_run_checkpoints(resumed, whole)
    for a, _ in pairs:
        assert (captured_rows(a)["seen"] == 1).all()  # one epoch a segment: every row once
    weights = torch.load(out / "weights.pt")
    for name, weight in weights["uninterrupted"].items():  # the resumed training is the uninterrupted one
        assert torch.equal(weights["resumed"][name], weight), name
