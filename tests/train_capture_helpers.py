"""What the training-capture tests share: their job config, how a spawned rank that finished leaves, and a Trainer
callback that stops a run inside a step."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from engine.config import JobConfig, parse_config
from tests.conftest import job_config


def capture_job_config(root: Path, model: Path, train: Path, store: str, **sections) -> JobConfig:
    settings = {
        "projection": {"dim": 4, "kind": "rademacher"},
        "curvature": {"strategy": "ekfac", "fisher": "empirical"},
        "method": {"name": "source"},
        "training_run": {"segments": 1},
        "store": {"path": str(root / store)},
    }
    for section, values in sections.items():
        settings[section] = dict(settings.get(section, {}), **values)
    return parse_config(job_config(root, model, train, **settings))


def leave_rank() -> None:
    """End a spawned rank that finished without error, skipping its interpreter's teardown: freeing a DDP
    Reducer there can deadlock in torch 2.13 (~ProcessGroupGloo waits on a mutex holding the GIL while gloo's
    worker thread waits for the GIL to free a finished allreduce's tensors; seen in a fresh-clone heavy run, the
    rank's work done and written), and spawn's join would wait for it forever."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def one_process_steps(capture, model, rows, optimizer, steps: list[list[int]]) -> None:
    """The one-process reference of a 2-rank run: each step's 4 rows as two half-weighted micro-batches (DDP and
    ZeRO-3 average the ranks' mean losses), one optimizer step each, then the capture closed."""
    for indices in steps:
        with capture.step():
            for half in (indices[:2], indices[2:]):
                (model(**rows.collate([rows[i] for i in half])).loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    capture.close()


class CrashAt(TrainerCallback):
    """Raise inside step `step` (after the capture has begun it), as a killed run would stop."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise RuntimeError(f"crash in step {self.step}")
