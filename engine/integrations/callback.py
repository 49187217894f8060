"""`transformers.Trainer` capture: a TrainerCallback that runs TrainingCapture around every optimizer step.

    rows = TrainingRows(config)
    args = TrainingArguments(..., remove_unused_columns=False)      # keep the batches' row indices
    trainer = Trainer(model, args, train_dataset=rows, data_collator=rows.collate,
                      callbacks=[TributaryCallback(config, rows)])
    trainer.train()                                                 # the store is complete when train() returns

Segments: training_run.boundaries (steps), training_run.segments equal parts of the Trainer's max_steps, or
`epochs_per_segment`. The Trainer calls on_step_begin before the first micro-batch of an optimizer step and
on_step_end after the update and the scheduler's step, so every micro-batch of a step (gradient accumulation)
is captured into that step, and an evaluation between steps is not.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from transformers import TrainerCallback

from engine.config import JobConfig, load_config
from engine.errors import TributaryError
from engine.integrations.capture import TrainingCapture, world_size
from engine.integrations.rows import TrainingRows
from engine.training_run.resolve import CHECKPOINT_DIR


class TributaryCallback(TrainerCallback):
    def __init__(
        self,
        config: str | Path | JobConfig,
        rows: TrainingRows | None = None,
        epochs_per_segment: int | None = None,
        keep_weights: bool | None = None,
    ):
        self.config = config if isinstance(config, JobConfig) else load_config(str(config))
        self.rows = rows
        self.epochs_per_segment = epochs_per_segment
        self.keep_weights = keep_weights
        self.capture: TrainingCapture | None = None
        self._step: AbstractContextManager | None = None

    def _require(self) -> TrainingCapture:
        if self.capture is None:
            raise TributaryError("TributaryCallback got a training step before on_train_begin")
        return self.capture

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.remove_unused_columns:
            raise TributaryError(
                "TributaryCallback needs TrainingArguments(remove_unused_columns=False): the Trainer would drop "
                "the batches' row indices"
            )
        if args.gradient_checkpointing:
            raise TributaryError(
                "TributaryCallback does not capture with gradient_checkpointing (the recomputed forward would be "
                "recorded twice); turn it off"
            )
        if model is None or optimizer is None:
            raise TributaryError("the Trainer gave TributaryCallback no model or optimizer at on_train_begin")
        check_trainer_processes(args.world_size)
        self.capture = TrainingCapture(
            self.config,
            model,
            optimizer,
            self.rows,
            total_steps=state.max_steps or None,
            epochs_per_segment=self.epochs_per_segment,
            keep_weights=self.keep_weights,
            resume_step=state.global_step or None,  # a Trainer resumed from checkpoint-STEP
        )

    def on_step_begin(self, args, state, control, **kwargs):
        capture = self._require()
        capture.epoch = int(state.epoch or 0)
        self._step = capture.step()
        self._step.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step is not None:
            step, self._step = self._step, None
            step.__exit__(None, None, None)

    def on_epoch_end(self, args, state, control, **kwargs):
        capture = self._require()
        epoch = capture.epoch
        capture.end_epoch()
        capture.epoch = epoch + 1

    def on_save(self, args, state, control, **kwargs):
        capture = self._require()
        capture.save_state(state.global_step)
        output = Path(args.output_dir or ".")
        kept = {int(m.group(1)) for path in output.iterdir() if (m := CHECKPOINT_DIR.match(path.name))}
        capture.keep_states(kept | {state.global_step})

    def on_train_end(self, args, state, control, **kwargs):
        self._require().close()


def check_trainer_processes(trainer_processes: int) -> None:
    """The Trainer must shard its rows over as many processes as torch.distributed has ranks: otherwise every
    rank trains on every row and the ranks' rows, added at each segment's end, would count each row world times.
    transformers passes no backend to accelerate under DeepSpeed, and accelerate has no default one for the CPU,
    so a ZeRO-3 Trainer on CPU sees one process while DeepSpeed runs its group (on GPUs NCCL is found)."""
    ranks = world_size()
    if trainer_processes != ranks:
        raise TributaryError(
            f"the Trainer runs as {trainer_processes} process(es) but torch.distributed has {ranks} ranks, so every "
            "rank would train on every row; under DeepSpeed on CPU create accelerate's state with its backend "
            "first (PartialState(backend='gloo') with ACCELERATE_USE_DEEPSPEED=true) and pass "
            "TrainingArguments(accelerator_config={'use_configured_state': True})"
        )
