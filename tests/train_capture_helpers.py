"""What the training-capture tests share: their job config, how a spawned rank that finished leaves, and a Trainer
callback that stops a run inside a step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import TrainerCallback

from engine.config import JobConfig, parse_config
from engine.integrations.store_writer import captured_rows
from engine.store.run_store import RunStore
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


def resumed_run_checkpoints(
    resumed: JobConfig, whole: JobConfig, steps: list[list[int]] | None = None
) -> tuple[RunStore, RunStore, list[tuple]]:
    """(resumed run, uninterrupted run, their checkpoint stores in pairs), after checking what every resume test
    checks: the resumed store complete with nothing left to resume, the same segments, and each checkpoint's rows
    seen at the same steps and epochs. Rows (1e-12) and Λ (1e-10) are compared too. `steps`: the 8 rows' steps of
    a run cut after its first step, whose rows each segment must have seen that often."""
    ours, theirs = RunStore.open(resumed.store.path), RunStore.open(whole.store.path)
    if steps is not None:
        seen = [captured_rows(ours.checkpoint(c.name))["seen"] for c in ours.plan.checkpoints]
        np.testing.assert_array_equal(seen[0], np.isin(np.arange(8), steps[0]).astype(int))
        np.testing.assert_array_equal(seen[1], np.bincount(steps[1] + steps[2], minlength=8))
    assert ours.manifest.complete and ours.manifest.segments_done == [0, 1]
    assert not Path(resumed.store.path + ".resume").exists()  # a complete store resumes nothing
    assert [(s.steps, s.eta) for s in ours.plan.segments] == [(s.steps, s.eta) for s in theirs.plan.segments]
    pairs = []
    for mine, expected in zip(ours.plan.checkpoints, theirs.plan.checkpoints, strict=True):
        a, b = ours.checkpoint(mine.name), theirs.checkpoint(expected.name)
        for name in ("step", "seen", "epoch"):
            np.testing.assert_array_equal(captured_rows(a)[name], captured_rows(b)[name])
        rows = b.read_rows(0, b.rows)
        np.testing.assert_allclose(a.read_rows(0, a.rows), rows, rtol=0, atol=1e-12 * np.abs(rows).max())
        for name, factors in b.read_factors().items():
            np.testing.assert_allclose(a.read_factors()[name].lam, factors.lam, rtol=1e-10)
        pairs.append((a, b))
    return ours, theirs, pairs


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
