"""Capture during training, for any loop: per-example projected gradients from the training backward itself,
written as a training-run store (engine.integrations.store_writer).

    capture = TrainingCapture(config, model, optimizer)   # model: the HF / peft model, or its DDP wrapper
    for epoch in range(epochs):
        for batch in loader:                  # batches from TrainingRows.collate carry their row indices
            with capture.step():              # one optimizer step: every micro-batch's forward and backward
                model(**batch).loss.backward()
            optimizer.step(); scheduler.step(); optimizer.zero_grad()   # after the block
        capture.end_epoch()
    capture.close()

The learning rate of a step is the optimizer's when the step begins (the one its update will use). A segment
cut after a step is written when the next step begins (or at end_epoch / close), after that step's update.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from engine.capture.training import TrainingHooks
from engine.config import JobConfig
from engine.curvature.factors import NEEDS_LAMBDA_PASS
from engine.errors import TributaryError
from engine.gradients.context import context_for_model
from engine.integrations.adam import live_preconditioner
from engine.integrations.partitioned import (
    check_partitioned_capture,
    gathered,
    is_partitioned,
    takes_true_fisher,
    zero3_release,
)
from engine.integrations.rows import TrainingRows
from engine.integrations.segments import (
    SegmentRows,
    cut_points,
    reduce_over_ranks,
    restore_segment,
    segment_arrays,
    tensor_rows,
)
from engine.integrations.store_writer import OtherRankWriter, RunWriter, resume_root, state_path
from engine.model.fingerprint import tokenizer_fingerprint
from engine.model.loading import DTYPES
from engine.model.placement import input_device

WEIGHT_METHODS = ("tracin", "trak")  # methods that take query gradients at every checkpoint, not only the final


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _inner(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper or a DeepSpeed engine (its module names are the saved
    model's)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) or is_deepspeed_engine(model):
        return cast(nn.Module, model.module)
    return model


def is_deepspeed_engine(model: nn.Module) -> bool:
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__)


def unwrapped(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (the Trainer's), DeepSpeed's ZeRO optimizer
    (the client's; under ZeRO-3 its groups hold the rank's flat partitions), both nested, or a similar wrapper."""
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TributaryError(
            f"capture needs the training's torch optimizer (or a wrapper holding it as .optimizer), not "
            f"{type(optimizer).__name__}"
        )
    return optimizer


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple[str, float]:
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return "adam", 0.0
    group = optimizer.param_groups[0]
    return "sgd", float(group.get("momentum", 0.0) or 0.0)


def check_capture_config(config: JobConfig) -> None:
    """Refuse, in one line each, what capture does not do (yet)."""
    run = config.training_run
    if run is not None:
        if run.optimizer.preconditioned and config.curvature.strategy not in NEEDS_LAMBDA_PASS:
            raise TributaryError(
                "training_run.optimizer.preconditioned needs curvature.strategy ekfac or diagonal (Λ of "
                f"P^1/2 H P^1/2 comes from the eigenvalue correction), not {config.curvature.strategy}"
            )
        if isinstance(run.segments, list) or run.averaged or run.checkpoints or run.trainer_dir:
            raise TributaryError(
                "capture cuts segments at steps: give training_run.boundaries or segments (a number) with "
                "total_steps; checkpoints, trainer_dir, listed segments and averaged are for `tributary index`"
            )
    if config.projection.kind not in ("rademacher", "gaussian"):
        raise TributaryError(
            f"capture needs a random projection (projection.kind rademacher or gaussian), not {config.projection.kind}:"
            " a fitted projection is fitted on a model that training is still changing"
        )


class TrainingCapture:
    """Per-step capture into the store at config.store.path; see the module docstring."""

    def __init__(
        self,
        config: JobConfig,
        model: nn.Module,
        optimizer: Any,  # a torch optimizer, or accelerate's or DeepSpeed's wrapper of one
        rows: TrainingRows | None = None,
        total_steps: int | None = None,
        epochs_per_segment: int | None = None,
        keep_weights: bool | None = None,
        resume_step: int | None = None,
    ):
        """`keep_weights`: save the weights at every segment boundary (None: where config.method needs them,
        tracin and trak); the final model's are always saved. `resume_step`: continue the store of an interrupted
        run from the state `save_state(resume_step)` kept (the model and optimizer restored to that step)."""
        check_capture_config(config)
        self.config = config
        wrapper, model = model, _inner(model)
        partitioned = is_partitioned(model)
        if partitioned:  # before any hook is installed
            check_partitioned_capture(config, model)
        self.model = model
        self.optimizer = unwrapped(optimizer)
        self.rows = rows or TrainingRows(config)
        dtype = next(p for p in model.parameters() if p.requires_grad).dtype
        if dtype != DTYPES[config.model.dtype]:
            raise TributaryError(
                f"the model trains in {dtype} but model.dtype is {config.model.dtype}; set model.dtype to the "
                "training dtype (queries load the saved weights with it)"
            )
        context = context_for_model(config, model, self.rows.tokenizer, input_device(model))
        self.spec = context.spec
        self.modules = context.modules
        self.true_fisher = takes_true_fisher(config)
        # ZeRO-3: the sampled-label backward gets a forward of its own when the step's block ends (TrainingHooks)
        seed = config.curvature.seed if self.true_fisher else None
        self.hooks = TrainingHooks(model, context.capture, seed, reforward=partitioned)
        if self.hooks.reforward:
            self.hooks.release_gathered = zero3_release(optimizer, wrapper)
            if self.hooks.release_gathered is None:
                raise TributaryError(
                    "curvature.fisher true under DeepSpeed ZeRO-3 needs deepspeed.initialize's engine or optimizer "
                    "(to release the weights its re-forward gathers); pass the engine and the optimizer it returned"
                )
        self.hooks.install()
        # the Trainer under DeepSpeed updates inside its backward call, before any callback: the re-forward runs
        # from the optimizer's own pre-step hook there (after the step API's block it finds nothing left to run)
        self._pre_step = (
            self.optimizer.register_step_pre_hook(lambda *_: self.hooks.run_reforwards())
            if self.hooks.reforward
            else None
        )
        run = config.training_run
        self.cuts = cut_points(
            run.boundaries if run else None,
            run.segments if run and isinstance(run.segments, int) else 1,
            total_steps or (run.total_steps if run else None),
        )
        self.epochs_per_segment = epochs_per_segment
        kind, momentum = _optimizer_kind(self.optimizer)
        self.preconditioned = bool(run and run.optimizer.preconditioned)
        if self.preconditioned and kind != "adam":
            raise TributaryError(
                f"training_run.optimizer.preconditioned needs an Adam/AdamW optimizer, not {type(self.optimizer).__name__}"
            )
        self.ranks, self.rank = world_size(), rank()
        writer = RunWriter if self.rank == 0 else OtherRankWriter
        self.writer = writer(
            config,
            self.spec,
            self.rows.ids,
            {"tokenizer": tokenizer_fingerprint(self.rows.tokenizer)},
            kind,
            momentum,
            keep_all_weights=keep_weights if keep_weights is not None else config.method.name in WEIGHT_METHODS,
            preconditioned=self.preconditioned,
            resume_segments=None if resume_step is None else self._saved_segment(resume_step),
        )
        self.numpy_dtype = np.float64 if context.capture.compute_dtype == torch.float64 else np.float32
        self.step_count = 0  # optimizer steps done
        self.epoch = 0
        self.epochs_in_segment = 0
        self.segment = self._new_segment()
        self.cut_pending = False  # a cut ends its segment once the step's update is done (the next step or close)
        self.closed = False
        self.segment_write_s = 0.0  # seconds spent ending segments (reduction, fingerprint, store, saved weights)
        if resume_step is not None:
            self._restore(resume_step)

    # ---- resuming ---------------------------------------------------------------------------------------
    def save_state(self, step: int) -> None:
        """Keep what a run resumed after optimizer step `step` needs (the segment in progress, the counters),
        written whole (a temporary file renamed) so that a crash while saving leaves the previous states."""
        if step != self.step_count:
            raise TributaryError(f"capture state asked for step {step}, but capture has recorded {self.step_count}")
        path = state_path(self.config, step, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = segment_arrays(self.segment, list(self.modules))
        arrays["capture"] = np.array(
            [self.step_count, self.epoch, self.epochs_in_segment, int(self.cut_pending)], dtype=np.int64
        )
        arrays["world"] = np.array([self.ranks], dtype=np.int64)
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as handle:
            cast(Any, np.savez)(handle, **arrays)  # array names that np.savez's own keywords cannot shadow
        os.replace(partial, path)

    def keep_states(self, steps: set[int]) -> None:
        """Delete the kept states of every step not in `steps` (the Trainer rotated their checkpoints away)."""
        directory = state_path(self.config, 0, self.rank).parent
        for path in directory.glob("step-*.npz"):
            if int(path.stem.removeprefix("step-")) not in steps:
                path.unlink()

    def _state(self, step: int):
        path = state_path(self.config, step, self.rank)
        if not path.is_file():
            raise TributaryError(
                f"no capture state for step {step} at {path}; resume from a checkpoint saved while capturing "
                "(TributaryCallback keeps one at every Trainer save)"
            )
        arrays = np.load(path)
        saved = int(arrays["world"][0]) if "world" in arrays else 1
        if saved != self.ranks:
            raise TributaryError(
                f"the capture state of step {step} was saved by {saved} process(es), but this run has {self.ranks}; "
                f"resume with {saved} (each rank holds the rows of its own micro-batches)"
            )
        return arrays

    def _saved_segment(self, step: int) -> int:
        return int(self._state(step)["meta"][0])

    def _restore(self, step: int) -> None:
        arrays = self._state(step)
        restore_segment(self.segment, arrays, list(self.modules))
        self.step_count, self.epoch, self.epochs_in_segment, pending = (int(v) for v in arrays["capture"])
        self.cut_pending = bool(pending)

    def _new_segment(self) -> SegmentRows:
        index = len(self.writer.segments)
        dtype = np.dtype(self.numpy_dtype)
        return SegmentRows(index, len(self.rows), self.spec, dtype, self.step_count + 1, self.true_fisher)

    @contextmanager
    def step(self, rows=None):
        """One optimizer step: run every micro-batch's forward and backward inside. `rows`: the step's row
        indices in micro-batch order (None: each batch carries its own, under ROW_KEY). Under ZeRO-3 with the
        true Fisher the block's end runs each micro-batch's forward again, so it must come before the optimizer
        step (engine.step())."""
        if self.closed:
            raise TributaryError("this capture is closed; start a new one for another training run")
        self._end_pending_cut()
        rate = float(self.optimizer.param_groups[0]["lr"])
        self.hooks.armed = True
        try:
            yield self
        finally:
            self.hooks.armed = False
        self._record(self.hooks.finish(), rate, None if rows is None else tensor_rows(rows))

    def _record(self, batches, rate: float, rows: list[int] | None) -> None:
        self.step_count += 1
        position = 0
        for batch in batches:
            if batch.rows is None and rows is not None:
                batch.rows = rows[position : position + batch.grads.shape[0]]
            position += batch.grads.shape[0]
            self.segment.add(batch, self.step_count, self.epoch)
        self.segment.rates.append(rate)
        self.cut_pending = self.step_count in self.cuts

    def _end_pending_cut(self) -> None:
        if self.cut_pending:
            self.cut_pending = False
            self._end_segment(final=False)

    def end_epoch(self) -> None:
        """Call after the epoch's last optimizer update."""
        self._end_pending_cut()
        self.epoch += 1
        self.epochs_in_segment += 1
        if self.epochs_per_segment and self.epochs_in_segment >= self.epochs_per_segment:
            self._end_segment(final=False)

    def _end_segment(self, final: bool) -> None:
        self.epochs_in_segment = 0
        if not self.segment.steps:
            return
        started = time.perf_counter()
        if self.ranks > 1:  # every rank reaches each boundary at the same step; rank 0 writes the whole segment
            reduce_over_ranks(self.segment)
        with gathered(self.model):  # ZeRO-3: the weights whole for the fingerprint and the saved boundary
            self._write_segment(final)
        self.segment_write_s += time.perf_counter() - started

    def _write_segment(self, final: bool) -> None:
        preconditioner = None
        if self.preconditioned:  # P at the segment's end, as a checkpoint saved at its boundary holds it
            run = self.config.training_run
            optimizer = run.optimizer if run is not None else None
            preconditioner = live_preconditioner(
                self.optimizer,
                self.modules,
                self.spec,
                self.config.model.include_bias,
                optimizer.beta2 if optimizer else None,
                optimizer.eps if optimizer else None,
            )
        self.writer.write_segment(self.segment, self.model, self.modules, final, preconditioner)
        self.segment = self._new_segment()

    def close(self):
        """End the last segment (its weights are the final model's) and complete the store."""
        if self.closed:
            return self.writer.root
        self.hooks.remove()
        if self._pre_step is not None:
            self._pre_step.remove()
        self._end_pending_cut()
        self.closed = True
        if self.segment.steps:
            self._end_segment(final=True)
        elif self.writer.segments:
            self._keep_final_weights()
        store = self.writer.complete()
        # a complete store resumes nothing (rank 0 removes every rank's states; the others their own)
        shutil.rmtree(
            resume_root(self.config) if self.rank == 0 else state_path(self.config, 0, self.rank).parent,
            ignore_errors=True,
        )
        return store

    def _keep_final_weights(self) -> None:
        """Training ended right at a cut: the last written segment's weights are the final model's (every rank
        decides alike, so that ZeRO-3's gather runs on all of them)."""
        if not self.writer.keep_all_weights:
            with gathered(self.model):
                self.writer.keep_final_weights(self.model, self.modules)
