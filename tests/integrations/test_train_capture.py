"""Capture during training (engine.integrations): rows, factors and the training-run store from the training
backward itself, through transformers.Trainer and through the plain-loop step API.

Independent computations: the same Trainer run without capture (weights compared bit for bit), `tributary
index`'s gradient pass (engine.gradients.passes.gradient_pass) at the checkpoint the Trainer saved one step
before each row was seen, the loss scale against autograd of an explicitly scaled summed loss, and TracIn's
sum written out from query gradients at each kept checkpoint.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.multiprocessing.spawn import spawn
from transformers import TrainerCallback

from engine.capture.loss import per_example_loss
from engine.capture.training import ROW_KEY, loss_scale, training_log_softmax
from engine.config import JobConfig, QueryOptions
from engine.errors import TributaryError
from engine.gradients.context import load_model_context, prepare_index_job, with_projection
from engine.gradients.passes import gradient_pass
from engine.integrations import TrainingCapture, TrainingRows, TributaryCallback
from engine.integrations.segments import cut_points
from engine.integrations.store_writer import captured_rows
from engine.local_or_ray import run_exact, run_query
from engine.projection.fitted import full_width
from engine.store.run_store import RunStore
from engine.training_run.configs import checkpoint_config
from tests.conftest import SENTENCES, write_jsonl
from tests.ports import unused_port
from tests.train_capture_helpers import (
    CrashAt,
    capture_job_config,
    leave_rank,
    one_process_steps,
    resumed_run_checkpoints,
)

QUERY = [{"id": "q0", "text": "the fox eats seeds in the snow"}]


def _train(
    config: JobConfig,
    weights: Path,
    out: Path,
    capture: bool,
    batch: int = 3,
    accumulate: int = 1,
    epochs: int = 2,
    save: int = 0,
    adapter=None,
    optim: str = "sgd",
    epochs_per_segment: int | None = 1,
    crash_at: int | None = None,
    resume: Path | None = None,
    ddp: bool = False,
):
    """A Trainer run (SGD, linear decay, float64, seeded), with or without the callback, saving a checkpoint every
    `save` steps (0: none); the trained model."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float64)
    if adapter is not None:
        model = adapter(model)
    rows = TrainingRows(config)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        num_train_epochs=epochs,
        optim=optim,
        learning_rate=0.05 if optim == "sgd" else 0.01,
        lr_scheduler_type="linear",
        save_strategy="steps" if save else "no",
        save_steps=max(save, 1),
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
        **({"ddp_backend": "gloo", "ddp_timeout": 180} if ddp else {}),  # a rank left waiting fails in minutes
    )
    callbacks: list[TrainerCallback] = (
        [TributaryCallback(config, rows, epochs_per_segment=epochs_per_segment, keep_weights=True)] if capture else []
    )
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    collate = rows.collate if capture else rows.plain_collate
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return model


def _index_rows(config: JobConfig, weights: Path, rows: list[int], adapter: Path | None = None) -> np.ndarray:
    """What `tributary index` computes for `rows` at `weights` (a model, or an adapter on config's model)."""
    if adapter is not None:
        base = config.model.model_copy(update={"adapter": str(adapter)})
        job = prepare_index_job(config.model_copy(update={"model": base}))
    else:
        job = prepare_index_job(checkpoint_config(config, str(weights), config.data.train, "unused"))
    return gradient_pass(job.context, [job.tokenized[i] for i in rows], with_covariance=False).grads


@pytest.fixture(scope="module")
def trainer_runs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(root, tiny_models["llama"], train, "store.zarr")
    plain = _train(config, tiny_models["llama"], root / "plain", capture=False, save=1)
    captured = _train(config, tiny_models["llama"], root / "captured", capture=True)
    return root, config, plain, captured


def test_capture_leaves_training_bit_identical(trainer_runs):
    _, _, plain, captured = trainer_runs
    plain_state, captured_state = plain.state_dict(), captured.state_dict()
    assert list(plain_state) == list(captured_state)
    for name, value in plain_state.items():
        assert torch.equal(value, captured_state[name]), name


def test_rows_at_step_t_equal_index_of_checkpoint_t_minus_1(trainer_runs, tiny_models):
    root, config, _, _ = trainer_runs
    run = RunStore.open(config.store.path)
    assert run.manifest.complete and [s.steps for s in run.plan.segments] == [3, 3]  # 8 rows, batch 3, 2 epochs
    for segment, checkpoint in enumerate(run.plan.checkpoints):
        store = run.checkpoint(checkpoint.name)
        grads = store.read_rows(0, store.rows)
        captured = captured_rows(store)
        steps = captured["step"]
        assert (captured["epoch"] == segment).all()
        assert (captured["seen"] == 1).all()  # one epoch a segment: every row once
        assert sorted(set(steps.tolist())) == [3 * segment + 1, 3 * segment + 2, 3 * segment + 3]
        for step in sorted(set(steps.tolist())):
            before = tiny_models["llama"] if step == 1 else root / "plain" / f"checkpoint-{step - 1}"
            rows = np.flatnonzero(steps == step).tolist()
            expected = _index_rows(config, before, rows)
            # HF computes the training loss in float32 (ForCausalLMLoss upcasts logits to float32, not float64)
            np.testing.assert_allclose(grads[rows], expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_segment_schedule_is_the_trainers(trainer_runs):
    _, config, _, _ = trainer_runs
    plan = RunStore.open(config.store.path).plan
    rates = [0.05 * (1 - step / 6) for step in range(6)]  # linear decay over 6 steps, the rate each step used
    assert [c.step for c in plan.checkpoints] == [3, 6]
    np.testing.assert_allclose([float(s.eta or 0) for s in plan.segments], [np.mean(rates[:3]), np.mean(rates[3:])])


def test_query_every_method_from_the_captured_store(trainer_runs):
    root, config, _, _ = trainer_runs
    queries = write_jsonl(root / "queries.jsonl", QUERY)
    for method in ("source", "tracin", "if", "grad_dot"):
        method_config = config.model_copy(update={"method": config.method.model_copy(update={"name": method})})
        total = run_query(method_config, str(queries), k=3).total
        assert total is not None and np.isfinite(total).all() and total.shape == (1, len(SENTENCES))


def test_exact_grad_dot_on_the_captured_store_scores_at_the_final_weights(trainer_runs):
    """`--exact` on a callback-captured store recomputes every row's gradient at the final checkpoint's weights (the
    captured rows are each from the step before it was seen, and projected): against the index's gradient pass at
    full width over the rows and the query, at the weights the plain Trainer run saved after its last step."""
    root, config, _, _ = trainer_runs
    queries = write_jsonl(root / "queries_exact.jsonl", QUERY)
    grad_dot = config.model_copy(update={"method": config.method.model_copy(update={"name": "grad_dot"})})
    ours = run_exact(grad_dot, str(queries), QueryOptions(k=3)).scores
    final = str(root / "plain" / "checkpoint-6")

    def full_width_gradients(path: str) -> np.ndarray:
        job = prepare_index_job(checkpoint_config(config, final, path, "unused"))
        context = with_projection(job.context, full_width(job.context.spec))
        return gradient_pass(context, job.tokenized, with_covariance=False).grads

    expected = full_width_gradients(str(queries)) @ full_width_gradients(str(config.data.train)).T
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    stored = run_query(grad_dot, str(queries), k=3).total  # the captured rows: not the final weights' gradients
    assert stored is not None and not np.allclose(stored, expected, rtol=0, atol=1e-3 * np.abs(expected).max())


def _reloaded_fingerprints(run: RunStore, config: JobConfig) -> list[tuple[str, str]]:
    """(recorded, reloaded) model fingerprint of every checkpoint with saved weights: the recorded one is taken
    from the live weights, the reloaded one as a query takes it, from the saved files."""
    pairs = []
    for checkpoint in run.plan.checkpoints:
        if checkpoint.path is None:
            continue
        sub = checkpoint_config(config, checkpoint.path, config.data.train, "unused")
        pairs.append(
            (run.checkpoint(checkpoint.name).manifest.fingerprints.model, load_model_context(sub).fingerprints["model"])
        )
    return pairs


def test_saved_boundaries_carry_the_fingerprint_their_reloaded_weights_have(trainer_runs):
    _, config, _, _ = trainer_runs
    pairs = _reloaded_fingerprints(RunStore.open(config.store.path), config)
    assert len(pairs) == 2 and all(recorded == reloaded for recorded, reloaded in pairs)


@pytest.mark.parametrize("fisher", ["empirical", True])
def test_gradient_accumulation_of_two_micro_batches_equals_one_batch(tiny_models, tmp_path, fisher):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    whole = capture_job_config(tmp_path, tiny_models["llama"], train, "whole.zarr", curvature={"fisher": fisher})
    split = capture_job_config(tmp_path, tiny_models["llama"], train, "split.zarr", curvature={"fisher": fisher})
    _train(whole, tiny_models["llama"], tmp_path / "a", capture=True, batch=4, epochs=1)
    _train(split, tiny_models["llama"], tmp_path / "b", capture=True, batch=2, accumulate=2, epochs=1)
    one, two = RunStore.open(whole.store.path).checkpoint("c0"), RunStore.open(split.store.path).checkpoint("c0")
    np.testing.assert_array_equal(captured_rows(one)["step"], captured_rows(two)["step"])
    whole_rows = one.read_rows(0, one.rows)
    # the loss is float32 in HF (logits upcast to float32), so two micro-batches agree with one to float32 rounding
    np.testing.assert_allclose(two.read_rows(0, two.rows), whole_rows, rtol=0, atol=1e-6 * np.abs(whole_rows).max())
    for name, factors in one.read_factors().items():
        lam = two.read_factors()[name].lam
        np.testing.assert_allclose(lam, factors.lam, rtol=0, atol=1e-5 * np.abs(factors.lam).max())


def test_loss_scale_is_exact_for_a_mean_token_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, :2] = -100
    labels[2, 3:] = -100
    summed = per_example_loss(logits, labels)
    counted = int((labels[:, 1:] != -100).sum())
    (grad,) = torch.autograd.grad(summed.sum() / counted / 2, logits)  # HF's mean over tokens, / 2 micro-batches
    c, losses = loss_scale(logits.detach(), grad, labels)
    assert c == pytest.approx(1 / counted / 2, rel=1e-12)
    np.testing.assert_allclose(losses.double().numpy(), summed.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_training_loss_s_log_softmax_is_found_only_where_it_is_the_logits_own(tiny_models, kind):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 5, 7, 2, 9], [4, 6, 8, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.float32)
    for extra in ({}, {"num_items_in_batch": torch.tensor(7)}):
        out = model(input_ids=ids, attention_mask=mask, labels=ids, **extra)
        found = training_log_softmax(out.loss, out.logits)
        assert found is not None and torch.equal(found, torch.log_softmax(out.logits.detach(), dim=-1))
    out = model(input_ids=ids, attention_mask=mask)
    sliced = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    assert training_log_softmax(sliced, out.logits) is None  # a loss of a slice: not the logits' own
    assert training_log_softmax(None, out.logits) is None
    wide = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.float64)
    out = wide(input_ids=ids, attention_mask=mask, labels=ids)
    assert training_log_softmax(out.loss, out.logits) is None  # HF's loss runs on a float32 copy


def test_loss_scale_from_the_training_loss_s_log_softmax_equals_its_own():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, :2] = -100
    summed = per_example_loss(logits, labels)
    (grad,) = torch.autograd.grad(summed.sum() / 11, logits)
    own = loss_scale(logits.detach(), grad, labels)
    reused = loss_scale(logits.detach(), grad, labels, torch.log_softmax(logits.detach(), dim=-1))
    assert reused[0] == pytest.approx(own[0], rel=1e-6) and own[0] == pytest.approx(1 / 11, rel=1e-5)
    np.testing.assert_allclose(reused[1].numpy(), own[1].numpy(), rtol=1e-6)


def test_a_loss_that_is_not_cross_entropy_is_refused():
    logits = torch.randn(2, 4, 6, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 4))
    with pytest.raises(TributaryError, match="not a scaled next-token cross-entropy"):
        loss_scale(logits, torch.randn_like(logits), labels)


def test_step_api_crash_leaves_finished_segments_and_an_incomplete_store(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(tmp_path, tiny_models["llama"], train, "loop.zarr")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float64)
    model.train()
    rows = TrainingRows(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    capture = TrainingCapture(config, model, optimizer, rows, epochs_per_segment=1, keep_weights=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    order = [[5, 1, 6, 0], [2, 7, 3, 4]]
    for number, indices in enumerate(order):
        batch = rows.collate([rows[i] for i in indices])
        with capture.step():
            model(**batch).loss.backward()
        if number == 0:
            step_one = {name: p.detach().clone() for name, p in model.named_parameters()}
            model.load_state_dict(before, strict=False)  # a row's gradient is taken at the weights before its step
            expected_one = _index_rows_in_memory(config, model, indices)
            model.load_state_dict(step_one, strict=False)
        optimizer.step()
        optimizer.zero_grad()
    capture.end_epoch()  # segment 0 (steps 1-2) is written here
    with pytest.raises(RuntimeError, match="crash"):
        with capture.step():
            model(**rows.collate([rows[i] for i in order[0]])).loss.backward()
            raise RuntimeError("crash in the middle of a step")
    run = RunStore.open(config.store.path)
    assert not run.manifest.complete and run.manifest.segments_done == [0]
    stored = run.checkpoint("c0").read_rows(0, len(SENTENCES))
    np.testing.assert_allclose(stored[order[0]], expected_one, rtol=0, atol=1e-6 * np.abs(expected_one).max())
    queries = write_jsonl(tmp_path / "queries.jsonl", QUERY)
    with pytest.raises(TributaryError, match="incomplete"):
        run_query(config, str(queries), k=2)


def _index_rows_in_memory(config: JobConfig, model, rows: list[int]) -> np.ndarray:
    path = config.store.path + ".reference"
    model.save_pretrained(path)
    return _index_rows(config, Path(path), rows)


def test_lora_fine_tune_through_trainer_is_queried_without_an_index_pass(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model

    def lora(model):
        torch.manual_seed(2)
        peft_model = get_peft_model(
            model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        )
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.3)
        return peft_model

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(tmp_path, tiny_models["llama"], train, "lora.zarr")
    _train(config, tiny_models["llama"], tmp_path / "out", capture=True, batch=4, epochs=2, adapter=lora)
    run = RunStore.open(config.store.path)
    assert all(".lora_" in m.name for m in run.modules) and len(run.plan.checkpoints) == 2
    pairs = _reloaded_fingerprints(run, config)
    assert len(pairs) == 2 and all(recorded == reloaded for recorded, reloaded in pairs)
    queries = write_jsonl(tmp_path / "queries.jsonl", QUERY)
    results = {}
    for method in ("source", "tracin"):
        method_config = config.model_copy(update={"method": config.method.model_copy(update={"name": method})})
        total = run_query(method_config, str(queries), k=3).total
        assert total is not None and np.isfinite(total).all()
        results[method] = total
    # TracIn written out: Σ_c η_c ⟨g_q at checkpoint c's adapter, the rows captured in segment c⟩
    query_rows = TrainingRows(
        config.model_copy(update={"data": config.data.model_copy(update={"train": str(queries)})})
    )
    expected = np.zeros(len(SENTENCES))
    for checkpoint in run.plan.checkpoints:
        assert checkpoint.path is not None and checkpoint.learning_rate is not None
        base = config.model.model_copy(update={"adapter": checkpoint.path})
        job = prepare_index_job(config.model_copy(update={"model": base}))
        query = gradient_pass(job.context, query_rows.rows, with_covariance=False).grads[0]
        stored = run.checkpoint(checkpoint.name)
        expected += checkpoint.learning_rate * (stored.read_rows(0, stored.rows) @ query)
    np.testing.assert_allclose(results["tracin"][0], expected, rtol=1e-9)


def test_true_fisher_capture_leaves_trainer_weights_bit_identical(trainer_runs, tiny_models):
    root, config, plain, _ = trainer_runs
    fisher = config.model_copy(
        update={
            "curvature": config.curvature.model_copy(update={"fisher": True}),
            "store": config.store.model_copy(update={"path": str(root / "fisher.zarr")}),
        }
    )
    captured = _train(fisher, tiny_models["llama"], root / "fisher", capture=True)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, captured.state_dict()[name]), name
    assert RunStore.open(fisher.store.path).manifest.complete


def test_true_fisher_sums_are_the_index_s_at_the_weights_before_the_step(tiny_models, tmp_path):
    """Each step's covariance sums (and the sampled-label rows Λ is read from) equal `tributary index`'s pass with
    the true Fisher at the weights the step started from: the same labels drawn from the same seed and rows."""
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(
        tmp_path, tiny_models["llama"], train, "fisher.zarr", curvature={"fisher": True, "seed": 3}
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float64)
    model.train()
    rows = TrainingRows(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    capture = TrainingCapture(config, model, optimizer, rows, epochs_per_segment=1, keep_weights=True)
    for number, indices in enumerate([[5, 1, 6, 0], [2, 7, 3]]):
        before = tmp_path / f"before-{number}"
        model.save_pretrained(before)
        job = prepare_index_job(checkpoint_config(config, str(before), config.data.train, "unused"))
        expected = gradient_pass(job.context, [job.tokenized[i] for i in indices], fisher_rows=True)
        with capture.step():
            model(**rows.collate([rows[i] for i in indices])).loss.backward()
        for name, sums in expected.sums.covariance.items():
            ours = capture.segment.covariance.sums[name]
            np.testing.assert_allclose(ours.a_sum, sums.a_sum, rtol=0, atol=1e-9 * np.abs(sums.a_sum).max())
            np.testing.assert_allclose(ours.s_sum, sums.s_sum, rtol=0, atol=1e-6 * np.abs(sums.s_sum).max())
            assert (ours.tokens, ours.examples) == (sums.tokens, sums.examples)
        assert capture.segment.fisher_sums is not None and expected.fisher_grads is not None
        fisher_rows = capture.segment.fisher_sums[indices]
        scale = np.abs(expected.fisher_grads).max()
        np.testing.assert_allclose(fisher_rows, expected.fisher_grads, rtol=0, atol=1e-6 * scale)
        assert not np.allclose(fisher_rows, expected.grads, rtol=0, atol=1e-3 * scale)  # labels were sampled
        # the rows stay the training gradient's, not the sampled labels'
        np.testing.assert_allclose(capture.segment.sums[indices], expected.grads, rtol=0, atol=1e-6 * scale)
        optimizer.step()
        optimizer.zero_grad()
        capture.end_epoch()  # one segment a step: the next step's sums start from zero
    capture.close()
    assert RunStore.open(config.store.path).manifest.complete


def test_a_float32_step_s_rows_and_sampled_rows_are_the_index_s(tiny_models, tmp_path):
    """A float32 model, whose training loss's log-softmax the capture reuses for the loss scale and the sampled
    labels' gradient: the step's rows, sampled-label rows and losses equal `tributary index`'s at the weights
    the step started from, to float32 rounding."""
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(tmp_path, tiny_models["gpt2"], train, "f32.zarr", curvature={"fisher": True})
    config = config.model_copy(update={"model": config.model.model_copy(update={"dtype": "float32"})})
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"], dtype=torch.float32)
    model.train()
    rows = TrainingRows(config)
    indices = [5, 1, 6, 0]
    before = tmp_path / "before"
    model.save_pretrained(before)
    job = prepare_index_job(checkpoint_config(config, str(before), config.data.train, "unused"))
    expected = gradient_pass(job.context, [job.tokenized[i] for i in indices], fisher_rows=True)
    capture = TrainingCapture(config, model, torch.optim.SGD(model.parameters(), lr=0.1), rows)
    with capture.step():
        model(**rows.collate([rows[i] for i in indices])).loss.backward()
    assert expected.fisher_grads is not None and capture.segment.fisher_sums is not None
    scale = np.abs(expected.grads).max()
    np.testing.assert_allclose(capture.segment.sums[indices], expected.grads, rtol=0, atol=1e-5 * scale)
    fisher_scale = np.abs(expected.fisher_grads).max()
    np.testing.assert_allclose(
        capture.segment.fisher_sums[indices], expected.fisher_grads, rtol=0, atol=1e-5 * fisher_scale
    )
    np.testing.assert_allclose(capture.segment.loss[indices], expected.losses, rtol=1e-5)
    capture.close()


def test_true_fisher_refuses_a_batch_without_row_indices(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(tmp_path, tiny_models["llama"], train, "refused.zarr", curvature={"fisher": True})
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float64)
    model.train()
    rows = TrainingRows(config)
    capture = TrainingCapture(config, model, torch.optim.SGD(model.parameters(), lr=0.1), rows)
    with pytest.raises(TributaryError, match="row index"):
        with capture.step([0, 1]):
            model(**rows.plain_collate([rows[0], rows[1]])).loss.backward()
    assert ROW_KEY == "tributary_rows"


@pytest.mark.heavy  # two AdamW Trainer runs, one saving its optimizer state: about 11 s
def test_adam_preconditioner_at_step_boundaries_is_the_saved_optimizer_states(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.capture.modules import select_modules
    from engine.training_run.optimizer_state import read_preconditioner

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(
        tmp_path,
        tiny_models["llama"],
        train,
        "adam.zarr",
        training_run={"segments": 1, "boundaries": [4], "optimizer": {"name": "adamw", "preconditioned": True}},
    )
    plain = tmp_path / "plain"
    _train(config, tiny_models["llama"], plain, capture=False, save=2, optim="adamw_torch")
    _train(
        config, tiny_models["llama"], tmp_path / "captured", capture=True, optim="adamw_torch", epochs_per_segment=None
    )
    run = RunStore.open(config.store.path)
    assert run.plan.preconditioned and [c.step for c in run.plan.checkpoints] == [4, 6]
    assert [s.steps for s in run.plan.segments] == [4, 2]
    for segment, step in enumerate((4, 6)):
        checkpoint = plain / f"checkpoint-{step}"
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
        modules = select_modules(model, None)
        assert config.training_run is not None
        expected = read_preconditioner(
            str(checkpoint), model, modules, run.manifest.projection, False, config.training_run.optimizer
        )
        stored = run.read_segment_preconditioner(segment)
        for name, values in expected.items():
            np.testing.assert_allclose(stored[name], values, rtol=1e-12)
        assert run.has_segment_factors(segment)
    queries = write_jsonl(tmp_path / "queries.jsonl", QUERY)
    total = run_query(config, str(queries), k=3).total
    assert total is not None and np.isfinite(total).all()


@pytest.mark.parametrize("checkpoint", [2, 4])
def test_resume_from_a_trainer_checkpoint_gives_the_uninterrupted_store(
    trainer_runs, tiny_models, tmp_path, checkpoint
):
    _, uninterrupted, _, _ = trainer_runs
    config = uninterrupted.model_copy(
        update={"store": uninterrupted.store.model_copy(update={"path": str(tmp_path / "resumed.zarr")})}
    )
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="crash in step 5"):
        _train(config, tiny_models["llama"], out, capture=True, save=2, crash_at=5)
    assert not RunStore.open(config.store.path).manifest.complete
    kept = sorted(path.name for path in Path(config.store.path + ".resume").iterdir())
    assert kept == ["step-2.npz", "step-4.npz"]  # one state per Trainer checkpoint, each written whole
    _train(config, tiny_models["llama"], out, capture=True, save=2, resume=out / f"checkpoint-{checkpoint}")
    resumed, reference = RunStore.open(config.store.path), RunStore.open(uninterrupted.store.path)
    assert resumed.manifest.complete and resumed.manifest.segments_done == [0, 1]
    assert not Path(config.store.path + ".resume").exists()  # a complete store resumes nothing
    assert [(s.steps, s.eta) for s in resumed.plan.segments] == [(s.steps, s.eta) for s in reference.plan.segments]
    for ours, theirs in zip(resumed.plan.checkpoints, reference.plan.checkpoints, strict=True):
        mine, expected = resumed.checkpoint(ours.name), reference.checkpoint(theirs.name)
        np.testing.assert_array_equal(captured_rows(mine)["step"], captured_rows(expected)["step"])
        np.testing.assert_array_equal(captured_rows(mine)["seen"], captured_rows(expected)["seen"])
        rows = expected.read_rows(0, expected.rows)
        np.testing.assert_allclose(mine.read_rows(0, mine.rows), rows, rtol=0, atol=1e-12 * np.abs(rows).max())
        for name, factors in expected.read_factors().items():
            np.testing.assert_allclose(mine.read_factors()[name].lam, factors.lam, rtol=1e-10)


DDP_STEPS = [[5, 1, 6, 0], [2, 7, 3, 4]]  # each step's rows; rank r takes the r-th half


def _ddp_rank(rank: int, world: int, init: str, config: JobConfig, model_dir: str) -> None:
    """One rank of a 2-rank gloo DDP run of the step API (spawned)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM

    # bounded: a rank left waiting in a collective fails the test in minutes instead of holding the heavy group
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180)
    )
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
        model.train()
        ddp = DistributedDataParallel(model)
        rows = TrainingRows(config)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        capture = TrainingCapture(config, ddp, optimizer, rows, keep_weights=True)
        for indices in DDP_STEPS:
            mine = indices[rank * 2 : rank * 2 + 2]
            with capture.step():
                ddp(**rows.collate([rows[i] for i in mine])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        capture.close()
    finally:
        dist.destroy_process_group()
    leave_rank()


@pytest.mark.heavy  # two spawned gloo ranks and a one-process run: about 40 s on 2 busy cores
def test_ddp_with_two_ranks_equals_one_process(tiny_models, tmp_path):
    """DDP averages the ranks' mean losses: one process does the same with two half-weighted micro-batches."""
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    ranks = capture_job_config(tmp_path, tiny_models["llama"], train, "ddp.zarr")
    single = capture_job_config(tmp_path, tiny_models["llama"], train, "single.zarr")
    spawn(
        _ddp_rank,
        args=(2, f"file://{tmp_path / 'init'}", ranks, str(tiny_models["llama"])),
        nprocs=2,
        join=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float64)
    model.train()
    rows = TrainingRows(single)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    capture = TrainingCapture(single, model, optimizer, rows, keep_weights=True)
    one_process_steps(capture, model, rows, optimizer, DDP_STEPS)
    distributed, alone = RunStore.open(ranks.store.path), RunStore.open(single.store.path)
    assert distributed.manifest.complete and distributed.plan.segments == alone.plan.segments
    ours, theirs = distributed.checkpoint("c0"), alone.checkpoint("c0")
    np.testing.assert_array_equal(captured_rows(ours)["step"], captured_rows(theirs)["step"])
    expected = theirs.read_rows(0, theirs.rows)
    np.testing.assert_allclose(ours.read_rows(0, ours.rows), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    for name, factors in theirs.read_factors().items():
        np.testing.assert_allclose(ours.read_factors()[name].lam, factors.lam, rtol=0, atol=1e-5 * factors.lam.max())


RESUME_STEPS = [[5, 1, 6, 0], [2, 7, 3, 4], [0, 4, 7, 1]]  # segment 0: step 1; segment 1: steps 2-3


def _ddp_steps(capture, ddp, rows, optimizer, rank: int, steps: list[list[int]]) -> None:
    for indices in steps:
        with capture.step():
            ddp(**rows.collate([rows[i] for i in indices[rank * 2 : rank * 2 + 2]])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _ddp_resume_rank(rank: int, world: int, init: str, whole: JobConfig, resumed: JobConfig, model_dir: str) -> None:
    """One rank: an uninterrupted 3-step run into `whole`; then the same run into `resumed`, saved after step 2 and
    stopped inside step 3 (a crash), and resumed from the saved weights, optimizer and capture state."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180)
    )
    saved = Path(resumed.store.path + ".trainer")

    def start(config: JobConfig, weights: str, resume_step: int | None = None):
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float64)
        model.train()
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.5)
        if resume_step is not None:
            optimizer.load_state_dict(torch.load(saved / "optimizer.pt"))
        rows = TrainingRows(config)
        capture = TrainingCapture(config, ddp, optimizer, rows, keep_weights=True, resume_step=resume_step)
        return model, ddp, optimizer, rows, capture

    try:
        _, ddp, optimizer, rows, capture = start(whole, model_dir)
        _ddp_steps(capture, ddp, rows, optimizer, rank, RESUME_STEPS)
        capture.close()

        model, ddp, optimizer, rows, capture = start(resumed, model_dir)
        _ddp_steps(capture, ddp, rows, optimizer, rank, RESUME_STEPS[:2])
        capture.save_state(2)  # what TributaryCallback does at a Trainer save
        if rank == 0:
            model.save_pretrained(saved)
            torch.save(optimizer.state_dict(), saved / "optimizer.pt")
        dist.barrier()
        with capture.step():  # the crash: step 3's backward ran, its update and the store's end never came
            ddp(**rows.collate([rows[i] for i in RESUME_STEPS[2][rank * 2 : rank * 2 + 2]])).loss.backward()
        capture.hooks.remove()
        dist.barrier()
        if rank == 0:
            assert not RunStore.open(resumed.store.path).manifest.complete

        _, ddp, optimizer, rows, capture = start(resumed, str(saved), resume_step=2)
        _ddp_steps(capture, ddp, rows, optimizer, rank, RESUME_STEPS[2:])
        capture.close()
    finally:
        dist.destroy_process_group()
    leave_rank()


@pytest.mark.heavy  # two spawned gloo ranks running 3 + 2 + 1 steps: 6 min on 2 cores shared with 8 jobs
def test_resumed_ddp_run_continues_the_store_of_an_uninterrupted_one(tiny_models, tmp_path):
    """Each rank keeps its own capture state (its micro-batches' rows of the segment in progress); resumed with
    them, the 2-rank store has every row once and equals the uninterrupted 2-rank run's."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    run = {"boundaries": [1], "total_steps": 3}
    whole = capture_job_config(tmp_path, tiny_models["llama"], train, "whole.zarr", training_run=run)
    resumed = capture_job_config(tmp_path, tiny_models["llama"], train, "resumed.zarr", training_run=run)
    spawn(
        _ddp_resume_rank,
        args=(2, f"file://{tmp_path / 'init'}", whole, resumed, str(tiny_models["llama"])),
        nprocs=2,
        join=True,
    )
    resumed_run_checkpoints(resumed, whole, RESUME_STEPS)


def test_a_capture_state_saved_by_other_ranks_is_refused(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.integrations.store_writer import state_path

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = capture_job_config(tmp_path, tiny_models["llama"], train, "world.zarr")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float64)
    model.train()
    rows = TrainingRows(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    capture = TrainingCapture(config, model, optimizer, rows)
    with capture.step():
        model(**rows.collate([rows[0], rows[1]])).loss.backward()
    optimizer.step()
    capture.save_state(1)
    capture.hooks.remove()
    path = state_path(config, 1)
    arrays = dict(np.load(path))
    arrays["world"] = np.array([2])  # as rank 0 of a 2-rank run saves it
    np.savez(path, **arrays)
    with pytest.raises(TributaryError, match="saved by 2 process"):
        TrainingCapture(config, model, optimizer, rows, resume_step=1)


def _trainer_rank(rank: int, world: int, port: int, config: JobConfig, model_dir: str, out: str) -> None:
    """One rank of a 2-process Trainer run (as torchrun starts it: the environment names the group)."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    try:
        _train(config, Path(model_dir), Path(out), capture=True, batch=2, epochs=2, ddp=True)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    leave_rank()


@pytest.mark.heavy  # two spawned Trainer ranks and a one-process run: 11 min on 2 cores shared with 8 jobs
def test_trainer_under_ddp_with_two_ranks_equals_one_process(tiny_models, tmp_path):
    """The Trainer under DDP (2 gloo ranks, 2 rows each a step) with the callback writes the store of one process
    training on 4 rows a step: the same shuffled rows a step, the same weights along the way."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    ranks = capture_job_config(tmp_path, tiny_models["llama"], train, "ddp.zarr")
    single = capture_job_config(tmp_path, tiny_models["llama"], train, "single.zarr")
    spawn(
        _trainer_rank,
        args=(2, unused_port(), ranks, str(tiny_models["llama"]), str(tmp_path / "ddp")),
        nprocs=2,
        join=True,
    )
    _train(single, tiny_models["llama"], tmp_path / "single", capture=True, batch=4, epochs=2)
    distributed, alone = RunStore.open(ranks.store.path), RunStore.open(single.store.path)
    assert distributed.manifest.complete and [s.steps for s in distributed.plan.segments] == [2, 2]
    assert [(s.steps, s.eta) for s in distributed.plan.segments] == [(s.steps, s.eta) for s in alone.plan.segments]
    for ours, theirs in zip(distributed.plan.checkpoints, alone.plan.checkpoints, strict=True):
        a, b = distributed.checkpoint(ours.name), alone.checkpoint(theirs.name)
        for name in ("step", "seen", "epoch"):
            np.testing.assert_array_equal(captured_rows(a)[name], captured_rows(b)[name])
        assert (captured_rows(a)["seen"] == 1).all()  # one epoch a segment: every row once, on one rank
        expected = b.read_rows(0, b.rows)
        np.testing.assert_allclose(a.read_rows(0, a.rows), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
        for name, factors in b.read_factors().items():
            np.testing.assert_allclose(a.read_factors()[name].lam, factors.lam, rtol=0, atol=1e-5 * factors.lam.max())


def test_segments_cut_at_boundaries_or_equal_parts_of_the_steps():
    assert cut_points([6, 2], segments=1, total_steps=None) == [2, 6]
    assert cut_points(None, segments=3, total_steps=9) == [3, 6]
    assert cut_points(None, segments=1, total_steps=None) == []
    with pytest.raises(TributaryError, match="total_steps"):
        cut_points(None, segments=2, total_steps=None)


def test_callback_refuses_a_trainer_that_drops_the_row_indices(tiny_models, tmp_path):
    from types import SimpleNamespace

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    callback = TributaryCallback(capture_job_config(tmp_path, tiny_models["llama"], train, "cb.zarr"))
    args = SimpleNamespace(remove_unused_columns=True, gradient_checkpointing=False)
    with pytest.raises(TributaryError, match="remove_unused_columns=False"):
        callback.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=1), None, model=None, optimizer=None)
