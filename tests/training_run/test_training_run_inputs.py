"""Training runs: a real HF Trainer run with AdamW (optimizer state → preconditioner), Fast-Source on the
LM store, and bad input — each a TributaryError naming the input, raised before anything is written.

Independent computations: P = 1/(√v̂ + ε) recomputed here from optimizer.pt by parameter name; gradients by
brute-force autograd; averaged parameters averaged here; Source's Adam form written with dense matrices.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.attribution import Checkpoint, Dataset, InMemoryAttribution, Segment, TrainingRun, squared_error
from engine.config import OptimizerConfig, parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index, run_query
from engine.store.run_store import RunStore
from engine.testing.tiny import save_tiny
from tests.conftest import SENTENCES, job_config, vocabulary_texts, write_jsonl
from tests.trained_checkpoints import reference_rows, train_checkpoints
from tests.unrolling import mlp


def _trainer_run(base: Path, out: Path) -> list[Path]:
    """The HF Trainer with AdamW (linear decay) for 4 steps on SENTENCES, saving checkpoint-2 and -4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(SENTENCES)

        def __getitem__(self, index: int) -> dict:
            ids = torch.tensor(tokenizer(SENTENCES[index])["input_ids"][:6])
            return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        save_only_model=False,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=Rows()).train()
    return [out / "checkpoint-2", out / "checkpoint-4"]


@pytest.fixture(scope="module")
def adam_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adam")
    checkpoints = _trainer_run(tiny_models["gpt2"], root / "trainer")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    queries = write_jsonl(root / "queries.jsonl", [{"id": "q", "text": SENTENCES[2]}])
    raw = job_config(
        root,
        tiny_models["gpt2"],
        train,
        method={"name": "source"},
        training_run={"trainer_dir": str(root / "trainer"), "optimizer": {"name": "adamw", "preconditioned": True}},
    )
    return root, raw, checkpoints, queries


def _explicit_preconditioner(checkpoint: Path, model, module_name: str) -> np.ndarray:
    """P of one GPT-2 Conv1D module from optimizer.pt, matched by the Trainer's parameter order (decay first)."""
    from transformers import Trainer

    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    names = [n for n, _ in model.named_parameters()]
    # the method reads no Trainer state, so an uninitialised Trainer stands in for a configured one
    decay = set(Trainer.__new__(Trainer).get_decay_parameter_names(model))
    order = [n for n in names if n in decay] + [n for n in names if n not in decay]
    positions = [i for group in state["param_groups"] for i in group["params"]]
    by_name = {name: state["state"][i] for name, i in zip(order, positions)}
    beta2, eps = state["param_groups"][0]["betas"][1], state["param_groups"][0]["eps"]

    def p(name: str) -> np.ndarray:
        entry = by_name[name]
        v = entry["exp_avg_sq"].double().numpy() / (1 - beta2 ** int(entry["step"]))
        return 1.0 / (np.sqrt(v) + eps)

    return np.concatenate([p(f"{module_name}.weight").T, p(f"{module_name}.bias")[:, None]], axis=1)


def test_adam_run_from_trainer_output(adam_run, tmp_path):
    """Learning rates from trainer_state.json, P̄ from both checkpoints' optimizer.pt (Trainer order, Conv1D
    transposed, bias column), and Source = u · P̄^{1/2} R(M) P̄^{1/2} · ḡ with M's stored factors."""
    from transformers import AutoModelForCausalLM

    root, raw, checkpoints, queries = adam_run
    store = run_index(parse_config(raw), show_progress=False)
    assert isinstance(store, RunStore)
    plan = store.plan
    assert plan.preconditioned and [c.step for c in plan.checkpoints] == [2, 4]
    assert all(c.learning_rate is not None for c in plan.checkpoints) and plan.segments[0].steps == 4
    model = AutoModelForCausalLM.from_pretrained(checkpoints[0], dtype=torch.float64)
    module = "transformer.h.0.attn.c_attn"
    expected = np.mean([_explicit_preconditioner(c, model, module) for c in checkpoints], axis=0)
    stored = store.read_segment_preconditioner(0)
    np.testing.assert_allclose(stored[module], expected, rtol=1e-12)

    train_file = Path(raw["data"]["train"])
    rows = np.mean([reference_rows(raw, c, train_file) for c in checkpoints], axis=0)
    u = reference_rows(raw, checkpoints[-1], queries)
    spec = store.manifest.projection
    factors = store.read_segment_factors(0)
    eta, steps = plan.segments[0].eta, plan.segments[0].steps
    assert eta is not None and steps is not None, "the run plan resolved the segment's rate and steps"
    horizon = eta * steps
    total = np.zeros((len(u), len(rows)))
    for m in spec.modules:
        f = factors[m.name]
        assert f.q_s is not None and f.q_a is not None
        basis = np.kron(f.q_s, f.q_a)
        lam = f.lam.ravel()
        residual = np.where(lam > 0, -np.expm1(-horizon * lam) / np.where(lam > 0, lam, 1.0), horizon)
        root_p = np.sqrt(stored[m.name].ravel())
        block = slice(m.offset, m.offset + m.width)
        total += (u[:, block] * root_p) @ basis @ np.diag(residual) @ basis.T @ (rows[:, block] * root_p).T
    config = parse_config(raw)
    run_query(config, str(queries), k=2, scores_out=str(tmp_path / "s.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), total, rtol=1e-7)


def test_fast_source_indexes_the_averaged_parameters(tiny_models, tmp_path):
    """averaged: true stores gradients at the mean of the segment's checkpoint weights (averaged here), and
    fast_source scores against them."""
    from transformers import AutoModelForCausalLM

    checkpoints = train_checkpoints(tiny_models["gpt2"], tmp_path / "trainer", saves=(2, 4))
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(
        tmp_path,
        tiny_models["gpt2"],
        train,
        method={"name": "fast_source"},
        training_run={"trainer_dir": str(tmp_path / "trainer"), "averaged": True},
    )
    store = run_index(parse_config(raw), show_progress=False)
    assert isinstance(store, RunStore)
    models = [AutoModelForCausalLM.from_pretrained(c, dtype=torch.float64) for c in checkpoints]
    average = models[0]
    with torch.no_grad():
        for p, q in zip(average.parameters(), models[1].parameters()):
            p.copy_((p + q) / 2)
    average.save_pretrained(tmp_path / "average")
    np.testing.assert_allclose(
        store.checkpoint("avg0").read_rows(0, len(SENTENCES)),
        reference_rows(raw, tmp_path / "average", train),
        rtol=1e-9,
        atol=1e-12,
    )
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "text": SENTENCES[0]}])
    result = run_query(parse_config(raw), str(queries), k=3)
    assert result.total is not None
    assert result.total.shape == (1, len(SENTENCES)) and np.all(np.isfinite(result.total))


# ---- bad input --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_checkpoints(tiny_models, tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """Two checkpoints without trainer_state.json (copied model directories) and a wider model."""
    root = tmp_path_factory.mktemp("bad")
    trained = train_checkpoints(tiny_models["gpt2"], root / "trainer", saves=(2, 4))
    plain = []
    for path in trained:
        target = root / f"plain-{path.name}"
        shutil.copytree(path, target)
        (target / "trainer_state.json").unlink()
        plain.append(target)
    wide = save_tiny(root / "wide", "gpt2", vocabulary_texts(), hidden=16, layers=2, heads=2, seed=1)
    return root, plain, wide


def _refused(raw: dict, *phrases: str) -> None:
    config = parse_config(raw)
    with pytest.raises(TributaryError) as error:
        run_index(config, show_progress=False)
    for phrase in phrases:
        assert phrase in str(error.value), str(error.value)
    assert not Path(raw["store"]["path"]).exists(), "nothing may be written before the inputs are checked"


def test_checkpoints_with_another_architecture_are_refused(tiny_models, plain_checkpoints, tmp_path):
    root, plain, wide = plain_checkpoints
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    raw = job_config(
        tmp_path,
        tiny_models["gpt2"],
        train,
        method={"name": "tracin"},
        training_run={"checkpoints": [str(plain[0]), str(wide)], "learning_rate": 0.1},
    )
    _refused(raw, "different architectures", str(plain[0].resolve()), str(wide.resolve()), "n_embd")


def test_segments_without_checkpoints_are_refused(tiny_models, plain_checkpoints, tmp_path):
    root, plain, _ = plain_checkpoints
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    run = {"learning_rate": 0.1}
    _refused(
        job_config(
            tmp_path,
            tiny_models["gpt2"],
            train,
            training_run=dict(run, segments=[{"checkpoints": []}, {"checkpoints": [str(plain[0])]}]),
        ),
        "training_run.segments[0] has no checkpoints",
    )
    _refused(
        job_config(
            tmp_path,
            tiny_models["gpt2"],
            train,
            training_run=dict(run, checkpoints=[str(p) for p in plain], segments=3),
        ),
        "segments is 3 but there are 2 checkpoints",
    )
    _refused(
        job_config(
            tmp_path,
            tiny_models["gpt2"],
            train,
            training_run=dict(
                run,
                checkpoints=[{"path": str(plain[0]), "step": 2}, {"path": str(plain[1]), "step": 4}],
                boundaries=[1],
            ),
        ),
        "segment 0 (steps (0, 1]) has no checkpoints",
    )


def test_learning_rate_that_cannot_be_inferred_is_refused(tiny_models, plain_checkpoints, tmp_path):
    root, plain, _ = plain_checkpoints
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    run = {"checkpoints": [{"path": str(plain[0]), "step": 2}, {"path": str(plain[1]), "step": 4}]}
    _refused(
        job_config(tmp_path, tiny_models["gpt2"], train, method={"name": "source"}, training_run=run),
        "mean learning rate of segment 0",
        "cannot be inferred",
        "training_run.learning_rate",
    )
    _refused(
        job_config(tmp_path, tiny_models["gpt2"], train, method={"name": "tracin"}, training_run=run),
        "learning rate at checkpoint",
        str(plain[0].resolve()),
        "cannot be inferred",
    )


def test_optimizer_state_that_does_not_match_is_refused(tiny_models, plain_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    root, plain, wide = plain_checkpoints
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    run = {
        "checkpoints": [{"path": str(p), "step": 2 * (i + 1)} for i, p in enumerate(plain)],
        "learning_rate": 0.01,
        "optimizer": {"name": "adam", "preconditioned": True},
    }
    _refused(
        job_config(tmp_path, tiny_models["gpt2"], train, method={"name": "source"}, training_run=run),
        "optimizer.pt",
        "does not exist",
    )
    wide_model = AutoModelForCausalLM.from_pretrained(wide)
    optimizer = torch.optim.Adam(wide_model.parameters())
    wide_model(input_ids=torch.tensor([[2, 5, 6]]), labels=torch.tensor([[2, 5, 6]])).loss.backward()
    optimizer.step()
    for path in plain:
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
    try:
        _refused(
            job_config(tmp_path, tiny_models["gpt2"], train, method={"name": "source"}, training_run=run),
            "does not match the model's parameters",
            "optimizer.pt",
        )
    finally:
        for path in plain:
            (path / "optimizer.pt").unlink()


def test_in_memory_bad_input():
    """The in-memory API refuses the same four inputs, naming them."""
    model = mlp(2, 3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    data = Dataset(torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    with pytest.raises(TributaryError, match="segment 1 has no checkpoints"):
        InMemoryAttribution(
            model, squared_error(), TrainingRun([Segment([Checkpoint(params)], data), Segment([], data)])
        )
    other = {n: p.detach() for n, p in mlp(2, 5).named_parameters()}
    with pytest.raises(TributaryError, match="different architecture"):
        InMemoryAttribution(
            model, squared_error(), TrainingRun([Segment([Checkpoint(params), Checkpoint(other)], data)])
        )
    run = TrainingRun([Segment([Checkpoint(params, learning_rate=0.1), Checkpoint(params)], data)])
    with pytest.raises(TributaryError, match="learning rate at checkpoint c1"):
        InMemoryAttribution(model, squared_error(), run).scores("tracin", data)
    with pytest.raises(TributaryError, match="mean learning rate and step count of segment 0"):
        InMemoryAttribution(model, squared_error(), run).scores("source", data)
    wrong = {n: torch.ones(3, 3) for n in params}
    adam = TrainingRun(
        [Segment([Checkpoint(params, exp_avg_sq=wrong, step=3)], data, eta=0.1, steps=3)],
        optimizer=OptimizerConfig(name="adam", preconditioned=True),
    )
    with pytest.raises(TributaryError, match="exp_avg_sq at checkpoint c0 does not match"):
        InMemoryAttribution(model, squared_error(), adam).scores("source", data)
