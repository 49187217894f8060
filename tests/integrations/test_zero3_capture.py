"""Capture while training under DeepSpeed ZeRO-3 (2 gloo ranks on CPU) against one process running the same steps
without DeepSpeed: the same rows, factors (with SGD, and with AdamW preconditioning) and trained weights.

Independent computation: a plain torch model in one process, its two ranks' halves as two half-weighted
micro-batches (ZeRO-3 averages the ranks' gradients as DDP does), captured by the same step API; the weights
against DeepSpeed's own training of the same steps without capture.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn
from torch.multiprocessing.spawn import spawn

from engine.capture.training import ROW_KEY
from engine.config import JobConfig
from engine.errors import TributaryError
from engine.gradients.context import prepare_index_job
from engine.gradients.passes import gradient_pass
from engine.integrations import TrainingCapture, TrainingRows
from engine.integrations.store_writer import captured_rows
from engine.store.run_store import RunStore
from engine.training_run.configs import checkpoint_config
from tests.conftest import SENTENCES, write_jsonl
from tests.ports import unused_port
from tests.requirements import require
from tests.train_capture_helpers import capture_job_config, leave_rank, one_process_steps, resumed_run_checkpoints
from tests.zero3_training import without_shm_op, zero3_config

require("deepspeed")

STEPS = [[5, 1, 6, 0], [2, 7, 3, 4], [0, 4, 7, 1]]  # each rank takes its half of a step's 4 rows


def _float32_config(
    root: Path, model: Path, train: Path, store: str, adam: bool, fisher: bool | str = "empirical"
) -> JobConfig:
    """Two segments of the three steps, the model trained in float32 (DeepSpeed's ZeRO-3 dtype here); with Adam,
    Source preconditioned by its second moments."""
    run = {"segments": 2, "total_steps": len(STEPS), "optimizer": {"preconditioned": adam}}
    curvature = {"fisher": fisher, "seed": 3}
    return _float32(capture_job_config(root, model, train, f"{store}.zarr", training_run=run, curvature=curvature))


def _keep_segments(capture: TrainingCapture, out: Path) -> None:
    """As rank 0 (or the one process) writes each segment, keep what the store does not hold: its sampled-label
    rows (summed over the ranks) and covariance sums."""
    write = capture.writer.write_segment

    def keeping(segment, *args, **kwargs):
        covariance = {name: (c.a_sum, c.s_sum, c.tokens, c.examples) for name, c in segment.covariance.sums.items()}
        torch.save({"fisher": segment.lambda_grads(), "covariance": covariance}, out / f"s{segment.index}.pt")
        write(segment, *args, **kwargs)

    capture.writer.write_segment = keeping  # pyright: ignore[reportAttributeAccessIssue]


def _float32(config: JobConfig) -> JobConfig:
    return config.model_copy(update={"model": config.model.model_copy(update={"dtype": "float32"})})


def _optimizer(model: nn.Module, adam: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01) if adam else torch.optim.SGD(model.parameters(), lr=0.1)


def _zero3_rank(
    rank: int,
    world: int,
    port: int,
    config: JobConfig,
    capture: bool,
    adam: bool,
    model_dir: str,
    out: str,
    kept: str | None = None,
) -> None:
    """One rank: ZeRO-3 training of STEPS, with or without capture; rank 0 saves the trained weights to `out`
    (and, `kept`, each segment's sampled-label rows and covariance sums there)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.distributed as dist

    # bounded: a rank left waiting in a collective fails the test in minutes instead of holding the heavy group
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180))
    try:
        without_shm_op()
        import deepspeed
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.train()
        optimizer = _optimizer(model, adam)
        engine, zero_optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero3_config())
        trained = cast(nn.Module, cast(nn.Module, engine).module)
        rows = TrainingRows(config)
        capturing = TrainingCapture(config, engine, zero_optimizer, rows, keep_weights=True) if capture else None
        assert capturing is None or capturing.hooks.reforward == capturing.true_fisher  # no nested backward here
        if capturing is not None and kept is not None and rank == 0:
            _keep_segments(capturing, Path(kept))
        for indices in STEPS:
            batch = rows.collate([rows[i] for i in indices[rank * 2 : rank * 2 + 2]])
            with capturing.step() if capturing else contextlib.nullcontext():
                engine.backward(engine(**batch).loss)
            if capturing is not None and capturing.true_fisher:  # the re-forward's gathered weights released
                assert all(p.ds_status.name == "NOT_AVAILABLE" for p in trained.parameters())  # pyright: ignore[reportAttributeAccessIssue]
            engine.step()
        if capturing is not None:
            capturing.close()
        with deepspeed.zero.GatheredParameters(list(trained.parameters()), modifier_rank=None):
            if rank == 0:
                torch.save({name: p.detach().clone() for name, p in trained.named_parameters()}, out)
    finally:
        dist.destroy_process_group()
    leave_rank()


def _one_process(config: JobConfig, adam: bool, model_dir: str, kept: Path | None = None) -> dict[str, torch.Tensor]:
    """The same steps in one process without DeepSpeed: each rank's half a half-weighted micro-batch."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    rows = TrainingRows(config)
    optimizer = _optimizer(model, adam)
    capture = TrainingCapture(config, model, optimizer, rows, keep_weights=True)
    if kept is not None:
        _keep_segments(capture, kept)
    one_process_steps(capture, model, rows, optimizer, STEPS)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _spawn(
    config: JobConfig, capture: bool, adam: bool, model_dir: Path, out: Path, kept: Path | None = None
) -> dict[str, torch.Tensor]:
    arguments = (2, unused_port(), config, capture, adam, str(model_dir), str(out), None if kept is None else str(kept))
    spawn(_zero3_rank, args=arguments, nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.heavy  # two spawned ZeRO-3 runs of 2 gloo ranks and a one-process run: 107 s at load 15-22, 26 s at load 2
@pytest.mark.requires_deepspeed
@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adamw-preconditioned"])
def test_zero3_capture_with_two_ranks_equals_one_process(tiny_models, tmp_path, adam):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    ranks, single = (
        _float32_config(tmp_path, tiny_models["llama"], train, store, adam) for store in ("zero3", "single")
    )
    captured = _spawn(ranks, True, adam, tiny_models["llama"], tmp_path / "captured.pt")
    alone = _one_process(single, adam, str(tiny_models["llama"]))
    distributed, expected_store = RunStore.open(ranks.store.path), RunStore.open(single.store.path)
    assert distributed.manifest.complete and distributed.plan.segments == expected_store.plan.segments
    for key in ("c0", "c1"):
        ours, theirs = distributed.checkpoint(key), expected_store.checkpoint(key)
        np.testing.assert_array_equal(captured_rows(ours)["step"], captured_rows(theirs)["step"])
        expected = theirs.read_rows(0, theirs.rows)
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(ours.read_rows(0, ours.rows), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
        for name, factors in theirs.read_factors().items():
            lam = ours.read_factors()[name].lam
            np.testing.assert_allclose(lam, factors.lam, rtol=0, atol=1e-5 * factors.lam.max())
    for name, weight in alone.items():  # ZeRO-3 trained the same model as one process
        torch.testing.assert_close(captured[name], weight, rtol=1e-5, atol=1e-6)
    plain = _spawn(ranks, False, adam, tiny_models["llama"], tmp_path / "plain.pt")
    for name, weight in plain.items():  # and capture left DeepSpeed's training bit-identical
        assert torch.equal(captured[name], weight), name


@pytest.mark.heavy  # two spawned ZeRO-3 runs of 2 gloo ranks and a one-process run
@pytest.mark.requires_deepspeed
def test_zero3_true_fisher_with_two_ranks_equals_the_nested_backward_of_one_process(tiny_models, tmp_path):
    """The true Fisher under ZeRO-3 takes each micro-batch's sampled-label gradients from a forward of its own at
    the step's end; one process without DeepSpeed takes them from the backward nested in the training one. The
    same labels are drawn (seed, row, positions), so rows, sampled-label rows, covariance sums and Λ agree, and
    the re-forward leaves DeepSpeed's training bit-identical (it touches no parameter gradient)."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    ranks, single = (
        _float32_config(tmp_path, tiny_models["llama"], train, store, adam=False, fisher=True)
        for store in ("zero3", "single")
    )
    zero3_kept, single_kept = tmp_path / "zero3-segments", tmp_path / "single-segments"
    zero3_kept.mkdir()
    single_kept.mkdir()
    captured = _spawn(ranks, True, False, tiny_models["llama"], tmp_path / "captured.pt", zero3_kept)
    alone = _one_process(single, False, str(tiny_models["llama"]), single_kept)
    distributed, expected_store = RunStore.open(ranks.store.path), RunStore.open(single.store.path)
    assert distributed.manifest.complete and distributed.plan.segments == expected_store.plan.segments
    for index, key in enumerate(("c0", "c1")):
        ours, theirs = distributed.checkpoint(key), expected_store.checkpoint(key)
        np.testing.assert_array_equal(captured_rows(ours)["step"], captured_rows(theirs)["step"])
        expected = theirs.read_rows(0, theirs.rows)
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(ours.read_rows(0, ours.rows), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
        mine, reference = (torch.load(kept / f"s{index}.pt", weights_only=False) for kept in (zero3_kept, single_kept))
        sampled = reference["fisher"]
        scale = np.abs(sampled).max()
        np.testing.assert_allclose(mine["fisher"], sampled, rtol=0, atol=1e-5 * scale)
        seen = captured_rows(theirs)["seen"] > 0
        assert not np.allclose(sampled[seen], expected[seen], rtol=0, atol=1e-3 * scale)  # labels were sampled
        for name, (a_sum, s_sum, tokens, examples) in reference["covariance"].items():
            a, s, our_tokens, our_examples = mine["covariance"][name]
            np.testing.assert_allclose(a, a_sum, rtol=0, atol=1e-5 * np.abs(a_sum).max())
            np.testing.assert_allclose(s, s_sum, rtol=0, atol=1e-5 * np.abs(s_sum).max())
            assert (our_tokens, our_examples) == (tokens, examples)
        for name, factors in theirs.read_factors().items():
            lam = ours.read_factors()[name].lam
            np.testing.assert_allclose(lam, factors.lam, rtol=0, atol=1e-5 * factors.lam.max())
    for name, weight in alone.items():  # ZeRO-3 trained the same model as one process
        torch.testing.assert_close(captured[name], weight, rtol=1e-5, atol=1e-6)
    plain = _spawn(ranks, False, False, tiny_models["llama"], tmp_path / "plain.pt")
    for name, weight in plain.items():  # and the re-forward left DeepSpeed's training bit-identical
        assert torch.equal(captured[name], weight), name


def _partitioned_llama(model_dir: Path, **config):
    """The tiny Llama in float64 marked as ZeRO-3 marks the parameters it partitions (ds_id), without DeepSpeed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, **config)
    next(model.parameters()).ds_id = 0  # pyright: ignore[reportAttributeAccessIssue]
    return model


def test_the_true_fisher_under_zero3_with_dropout_is_refused_before_any_hook(tiny_models, tmp_path):
    """The re-forward would draw other dropout masks than the training forward: one line, nothing hooked."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(tmp_path, tiny_models["llama"], train, "zero3.zarr", curvature={"fisher": True})
    model = _partitioned_llama(tiny_models["llama"], attention_dropout=0.1)
    refusal = r"^curvature\.fisher true under DeepSpeed ZeRO-3 runs each micro-batch's forward a second time, .*"
    with pytest.raises(TributaryError, match=refusal + r"config\.attention_dropout=0\.1") as refused:
        TrainingCapture(config, model, torch.optim.Adam(model.parameters(), lr=0.1))
    assert "\n" not in str(refused.value)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert not Path(config.store.path).exists()  # nothing written
    empirical = capture_job_config(tmp_path, tiny_models["llama"], train, "empirical.zarr")
    TrainingCapture(empirical, model, torch.optim.Adam(model.parameters(), lr=0.1)).hooks.remove()  # accepted


def test_the_true_fisher_under_zero3_without_deepspeed_s_engine_or_optimizer_is_refused(tiny_models, tmp_path):
    """The re-forward's gathered weights are released by DeepSpeed's offload manager, found on its engine or
    optimizer; a bare module with the client's torch optimizer gives neither: one line, nothing hooked."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(tmp_path, tiny_models["llama"], train, "bare.zarr", curvature={"fisher": True})
    model = _partitioned_llama(tiny_models["llama"])
    refusal = r"^curvature\.fisher true under DeepSpeed ZeRO-3 needs deepspeed\.initialize's engine or optimizer "
    with pytest.raises(TributaryError, match=refusal) as refused:
        TrainingCapture(config, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "\n" not in str(refused.value)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert not Path(config.store.path).exists()  # nothing written


def test_the_re_forward_gives_the_index_s_sampled_rows_and_touches_no_gradient(tiny_models, tmp_path, monkeypatch):
    """ZeRO-3's path taken in one process without DeepSpeed (the model taken for partitioned): after each step's
    backward the covariance sums and sampled-label rows equal `tributary index`'s true-Fisher pass at the weights
    the step started from, the rows stay the training gradient's, and every parameter's .grad is bit-identical
    to a plain backward's (the re-forward's backward reaches the modules' outputs only)."""
    from transformers import AutoModelForCausalLM

    import engine.integrations.capture as capture_module

    monkeypatch.setattr(capture_module, "is_partitioned", lambda model: True)
    released: list[int] = []  # DeepSpeed's release of the gathered weights, once a step after its re-forwards
    monkeypatch.setattr(capture_module, "zero3_release", lambda *holders: lambda: released.append(1))
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(tmp_path, tiny_models["llama"], train, "re.zarr", curvature={"fisher": True, "seed": 3})
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float64)
    model.train()
    rows = TrainingRows(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    capture = TrainingCapture(config, model, optimizer, rows, epochs_per_segment=1)
    assert capture.hooks.reforward
    for number, indices in enumerate([[5, 1, 6, 0], [2, 7, 3]]):
        before = tmp_path / f"before-{number}"
        model.save_pretrained(before)
        job = prepare_index_job(checkpoint_config(config, str(before), config.data.train, "unused"))
        expected = gradient_pass(job.context, [job.tokenized[i] for i in indices], fisher_rows=True)
        batch = rows.collate([rows[i] for i in indices])
        plain = {k: v for k, v in batch.items() if k != ROW_KEY}
        model(**plain).loss.backward()  # the reference gradients, hooks unarmed
        reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.zero_grad()
        with capture.step():
            model(**batch).loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.equal(p.grad, reference[name]), name
        for name, sums in expected.sums.covariance.items():
            ours = capture.segment.covariance.sums[name]
            np.testing.assert_allclose(ours.a_sum, sums.a_sum, rtol=0, atol=1e-9 * np.abs(sums.a_sum).max())
            np.testing.assert_allclose(ours.s_sum, sums.s_sum, rtol=0, atol=1e-6 * np.abs(sums.s_sum).max())
            assert (ours.tokens, ours.examples) == (sums.tokens, sums.examples)
        assert capture.segment.fisher_sums is not None and expected.fisher_grads is not None
        scale = np.abs(expected.fisher_grads).max()
        fisher_rows = capture.segment.fisher_sums[indices]
        np.testing.assert_allclose(fisher_rows, expected.fisher_grads, rtol=0, atol=1e-6 * scale)
        assert not np.allclose(fisher_rows, expected.grads, rtol=0, atol=1e-3 * scale)  # labels were sampled
        np.testing.assert_allclose(capture.segment.sums[indices], expected.grads, rtol=0, atol=1e-6 * scale)
        assert len(released) == number + 1
        optimizer.step()
        optimizer.zero_grad()
        capture.end_epoch()
    capture.close()
    assert RunStore.open(config.store.path).manifest.complete and len(released) == 2


def test_a_re_forward_that_differs_from_the_training_forward_is_refused(tiny_models, tmp_path, monkeypatch):
    """Dropout the up-front check does not see: the re-forward's losses differ from the training forward's, and
    the step is refused in one line instead of giving sampled-label gradients of another forward."""
    import engine.integrations.capture as capture_module
    import engine.integrations.partitioned as partitioned

    monkeypatch.setattr(capture_module, "is_partitioned", lambda model: True)
    monkeypatch.setattr(capture_module, "zero3_release", lambda *holders: lambda: None)
    monkeypatch.setattr(partitioned, "active_dropout", lambda model: None)
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(tmp_path, tiny_models["llama"], train, "drop.zarr", curvature={"fisher": True})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float64, attention_dropout=0.5)
    model.train()
    rows = TrainingRows(config)
    capture = TrainingCapture(config, model, torch.optim.SGD(model.parameters(), lr=0.1), rows)
    refusal = r"^the true Fisher's re-forward under ZeRO-3 gave other losses than the training forward "
    with pytest.raises(TributaryError, match=refusal) as refused:
        with capture.step():
            model(**rows.collate([rows[i] for i in [0, 1, 2, 3]])).loss.backward()
    assert "\n" not in str(refused.value)


def _zero3_resume_rank(
    rank: int, world: int, port: int, whole: JobConfig, resumed: JobConfig, model_dir: str, out: str
) -> None:
    """One rank: an uninterrupted 3-step ZeRO-3 run (AdamW) into `whole`; then the same run into `resumed`, saved
    after step 2 (DeepSpeed's checkpoint of the partitioned weights and optimizer, and the capture state) and
    stopped inside step 3 (a crash), and resumed from that checkpoint. Rank 0 keeps both runs' trained weights."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180))
    saved = Path(resumed.store.path + ".deepspeed")
    try:
        without_shm_op()
        import deepspeed
        from transformers import AutoModelForCausalLM

        def start(config: JobConfig, resume_step: int | None = None):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            model.train()
            engine, optimizer, *_ = deepspeed.initialize(
                model=model, optimizer=_optimizer(model, adam=True), config=zero3_config()
            )
            if resume_step is not None:  # the partitioned weights and the optimizer's partitions of that step
                engine.load_checkpoint(str(saved), tag=f"step-{resume_step}")
            rows = TrainingRows(config)
            capture = TrainingCapture(config, engine, optimizer, rows, keep_weights=True, resume_step=resume_step)
            return engine, rows, capture

        def steps(engine, rows, capture, indices: list[list[int]]) -> None:
            for step in indices:
                with capture.step():
                    engine.backward(engine(**rows.collate([rows[i] for i in step[rank * 2 : rank * 2 + 2]])).loss)
                engine.step()

        def trained(engine) -> dict[str, torch.Tensor]:
            module = cast(nn.Module, engine.module)
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {name: p.detach().clone() for name, p in module.named_parameters()}

        engine, rows, capture = start(whole)
        steps(engine, rows, capture, STEPS)
        capture.close()
        uninterrupted = trained(engine)

        engine, rows, capture = start(resumed)
        steps(engine, rows, capture, STEPS[:2])
        capture.save_state(2)  # what TributaryCallback does at a Trainer save
        engine.save_checkpoint(str(saved), tag="step-2")  # collective: each rank saves its partitions
        with capture.step():  # the crash: step 3's backward ran, its update and the store's end never came
            engine.backward(engine(**rows.collate([rows[i] for i in STEPS[2][rank * 2 : rank * 2 + 2]])).loss)
        capture.hooks.remove()
        dist.barrier()
        if rank == 0:
            assert not RunStore.open(resumed.store.path).manifest.complete

        engine, rows, capture = start(resumed, resume_step=2)
        steps(engine, rows, capture, STEPS[2:])
        capture.close()
        weights = trained(engine)
        if rank == 0:
            torch.save({"uninterrupted": uninterrupted, "resumed": weights}, out)
    finally:
        dist.destroy_process_group()
    leave_rank()


@pytest.mark.heavy  # one spawn of 2 gloo ranks running 3 + 2 + 1 ZeRO-3 steps
@pytest.mark.requires_deepspeed
def test_resumed_zero3_run_continues_the_store_of_an_uninterrupted_one(tiny_models, tmp_path):
    """Each rank keeps its own capture state (its micro-batches' rows of the segment in progress) beside
    DeepSpeed's checkpoint of its partitions; resumed with both, the 2-rank store has every row once a segment
    and equals the uninterrupted 2-rank run's, Adam's gathered second moments included."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    run = {"boundaries": [1], "total_steps": len(STEPS), "optimizer": {"preconditioned": True}}
    whole, resumed = (
        _float32(capture_job_config(tmp_path, tiny_models["llama"], train, store, training_run=run))
        for store in ("whole.zarr", "resumed.zarr")
    )
    out = tmp_path / "weights.pt"
    spawn(
        _zero3_resume_rank,
        args=(2, unused_port(), whole, resumed, str(tiny_models["llama"]), str(out)),
        nprocs=2,
        join=True,
    )
    ours, theirs, pairs = resumed_run_checkpoints(resumed, whole, STEPS)
    for index in range(len(pairs)):
        for name, p in theirs.read_segment_preconditioner(index).items():  # Adam's P from the restored partitions
            np.testing.assert_allclose(ours.read_segment_preconditioner(index)[name], p, rtol=1e-10)
        for name, factors in theirs.read_segment_factors(index).items():
            np.testing.assert_allclose(ours.read_segment_factors(index)[name].lam, factors.lam, rtol=1e-10)
    weights = torch.load(out)
    for name, weight in weights["uninterrupted"].items():  # the resumed training is the uninterrupted one
        assert torch.equal(weights["resumed"][name], weight), name
