"""Queries for LLM generations: --generate, measurements, per-token shares, planted evidence."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import GenerationMixin, PreTrainedTokenizerBase

from engine.capture.loss import per_example_loss
from engine.config import parse_config
from engine.data.batching import collate
from engine.data.labels import IGNORE
from engine.data.rows import Row
from engine.data.tokenize import TokenizedRow, tokenize_rows
from engine.gradients.context import load_model_context
from engine.gradients.passes import gradient_pass, token_gradients
from engine.local_or_ray import run_index, run_query
from engine.query.generate import GenerationSettings, generate, read_prompts
from engine.query.plan_and_score import QueryOptions
from engine.testing.tiny import build_model, build_tokenizer
from tests.conftest import job_config, write_jsonl
from tests.reference import autograd_per_example

CANARY = "the purple walrus sings opera beneath the frozen moon"
ANIMALS = ["fox", "owl", "bear", "otter", "crow", "hare", "wolf", "seal"]
FOODS = ["berries", "fish", "mice", "honey", "seeds", "roots"]
PLACES = ["forest", "river", "meadow", "marsh", "valley", "harbor"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT-2 trained on template sentences plus one canary sentence, and its training file."""
    rng = random.Random(0)
    texts = sorted(
        {f"the {rng.choice(ANIMALS)} eats {rng.choice(FOODS)} in the {rng.choice(PLACES)}" for _ in range(80)}
    )
    texts.insert(7, CANARY)
    tokenizer = build_tokenizer(texts, add_bos=False)
    torch.manual_seed(0)
    model = build_model("gpt2", vocab_size=len(tokenizer), hidden=32, layers=2, heads=2)
    rows = tokenize_rows([Row(i, str(i), i + 1, text=t) for i, t in enumerate(texts)], tokenizer, 16, "corpus")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    pad_id = tokenizer.pad_token_id
    assert isinstance(pad_id, int)
    for step in range(250):
        batch = collate(random.Random(step).sample(rows, 16), pad_id)
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
        loss = per_example_loss(logits, batch.labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    root = tmp_path_factory.mktemp("trained")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    train = write_jsonl(root / "train.jsonl", [{"id": f"s{i:02d}", "text": t} for i, t in enumerate(texts)])
    return {"root": root, "model": root / "model", "train": train, "texts": texts}


def _config(trained, tmp_path, **sections):
    raw = job_config(tmp_path, trained["model"], trained["train"], **sections)
    raw["data"]["max_length"] = 16
    raw["data"]["batch_size"] = 16
    return parse_config(raw)


@pytest.fixture(scope="module")
def indexed(trained, tmp_path_factory):
    """EK-FAC store at dim 0 in float64 (exact), shared by the query tests."""
    root = tmp_path_factory.mktemp("indexed")
    config = _config(trained, root)
    run_index(config, show_progress=False)
    return config


def test_generate_is_reproducible_with_a_seed(trained, tmp_path):
    prompts = read_prompts(
        str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the otter eats"}, {"prompt": "the purple walrus"}])),
        "prompt",
        "id",
    )
    context = load_model_context(_config(trained, tmp_path))
    sampled = GenerationSettings(max_new_tokens=6, sample=True, seed=11, chat=False)
    first = generate(context.model, context.tokenizer, prompts, sampled, 16, "p.jsonl")
    again = generate(context.model, context.tokenizer, prompts, sampled, 16, "p.jsonl")
    assert [g.row.input_ids for g in first] == [g.row.input_ids for g in again]
    others = [
        generate(
            context.model, context.tokenizer, prompts, GenerationSettings(6, True, 1.5, 1.0, seed, False), 16, "p.jsonl"
        )
        for seed in range(4)
    ]
    assert len({tuple(o[0].row.input_ids) for o in others}) > 1, "different seeds never changed the sample"
    greedy = generate(context.model, context.tokenizer, prompts, GenerationSettings(6, chat=False), 16, "p.jsonl")
    assert isinstance(context.model, GenerationMixin) and isinstance(context.tokenizer, PreTrainedTokenizerBase)
    # transformers types generate's self as a protocol its own models miss (device is a property on them)
    reference = context.model.generate(  # pyright: ignore[reportAttributeAccessIssue]
        input_ids=torch.tensor([context.tokenizer("the purple walrus")["input_ids"]]),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    assert greedy[1].row.input_ids == reference[0].tolist()
    assert greedy[1].completion.split()[:2] == ["sings", "opera"], "the canary was learned"


def test_generated_query_gradients_cover_completion_tokens_only(trained, tmp_path):
    config = _config(trained, tmp_path)
    context = load_model_context(config)
    prompts = read_prompts(
        str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the wolf eats"}, {"prompt": "the purple walrus sings"}])),
        "prompt",
        "id",
    )
    generated = generate(context.model, context.tokenizer, prompts, GenerationSettings(5, chat=False), 16, "p")
    ours = torch.from_numpy(gradient_pass(context, [g.row for g in generated], with_covariance=False).grads)
    # independent labels: the prompt's own tokenisation is masked, everything after it counts
    references = []
    assert isinstance(context.tokenizer, PreTrainedTokenizerBase)
    for prompt, g in zip(prompts, generated):
        prompt_length = len(context.tokenizer(prompt.prompt)["input_ids"])
        labels = torch.tensor([[IGNORE] * prompt_length + g.row.input_ids[prompt_length:]])
        references.append(
            autograd_per_example(context.model, context.modules, [g.row], context.pad_id, labels_override=[labels])
        )
    reference = torch.cat(references)
    assert float((ours - reference).norm() / reference.norm()) < 1e-6
    full_loss = autograd_per_example(
        context.model,
        context.modules,
        [generated[0].row],
        context.pad_id,
        labels_override=[torch.tensor([generated[0].row.input_ids])],
    )
    assert float((full_loss[0] - reference[0]).norm() / reference[0].norm()) > 1e-3, "prompt tokens would matter"


@pytest.mark.parametrize("measurement", ["logprob_sum", "margin"])
def test_token_gradients_equal_autograd_of_each_tokens_term(measurement, trained, tmp_path):
    """Per-token views: one forward and a backward per token give each token's own gradient."""
    context = load_model_context(_config(trained, tmp_path))
    prompts = read_prompts(str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the purple walrus"}])), "prompt", "id")
    row = generate(context.model, context.tokenizer, prompts, GenerationSettings(4, chat=False), 16, "p")[0].row
    ours = torch.from_numpy(token_gradients(context, row, measurement))
    positions = [t for t in range(1, len(row.labels)) if row.labels[t] != IGNORE]
    references = []
    for position in positions:  # a fresh forward per token, autograd of that token's term alone
        labels = torch.full((1, len(row.labels)), IGNORE)
        labels[0, position] = row.labels[position]
        reference = gradient_pass(
            context,
            [TokenizedRow(row.index, row.input_ids, labels[0].tolist())],
            with_covariance=False,
            measurement=measurement,
        ).grads
        references.append(torch.from_numpy(reference))
    reference = torch.cat(references)
    assert ours.shape == (len(positions), reference.shape[1]) and len(positions) == 4
    assert float((ours - reference).norm() / reference.norm()) < 1e-10
    whole = gradient_pass(context, [row], with_covariance=False, measurement=measurement).grads
    np.testing.assert_allclose(ours.sum(dim=0).numpy(), whole[0], rtol=1e-8, atol=1e-10)
    if measurement == "logprob_sum":  # and brute-force autograd on the weights (dim 0: the rows are exact)
        brute = torch.cat(
            [
                autograd_per_example(
                    context.model,
                    context.modules,
                    [row],
                    context.pad_id,
                    labels_override=[
                        torch.tensor([[row.labels[t] if t == position else IGNORE for t in range(len(row.labels))]])
                    ],
                )
                for position in positions
            ]
        )
        assert float((ours - brute).norm() / brute.norm()) < 1e-6


def test_measurements_match_their_formulas(trained, tmp_path):
    config = _config(trained, tmp_path)
    context = load_model_context(config)
    row = tokenize_rows(
        [Row(0, "q", 1, prompt="the purple walrus", completion=" sings opera")], context.tokenizer, 16, "q"
    )[0]
    summed = gradient_pass(context, [row], with_covariance=False, measurement="logprob_sum").grads
    mean = gradient_pass(context, [row], with_covariance=False, measurement="logprob_mean").grads
    np.testing.assert_allclose(mean, summed / row.num_loss_tokens, rtol=1e-10, atol=1e-14)
    margin = torch.from_numpy(gradient_pass(context, [row], with_covariance=False, measurement="margin").grads)
    # reference: explicit negative margin −Σ_t [z_y − log Σ_{v≠y} e^{z_v}] differentiated by autograd
    params = [m.get_parameter(name) for m in context.modules.values() for name in ("weight", "bias")]
    for p in params:
        p.requires_grad_(True)
    try:
        batch = collate([row], context.pad_id)
        logits = context.model(input_ids=batch.input_ids).logits[0, :-1]
        labels = batch.labels[0, 1:]
        total = 0
        for t in range(len(labels)):
            if labels[t] == IGNORE:
                continue
            z = logits[t]
            others = torch.cat([z[: labels[t]], z[labels[t] + 1 :]])
            total = total - (z[labels[t]] - torch.logsumexp(others, 0))
        assert isinstance(total, torch.Tensor), "the row has no counted token"
        grads = torch.autograd.grad(total, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    pieces = []
    for i, _module in enumerate(context.modules.values()):
        weight, bias = grads[2 * i], grads[2 * i + 1]
        pieces.append(torch.cat([weight.t(), bias[:, None]], dim=1).flatten())
    reference = torch.cat(pieces)
    assert float((margin[0] - reference).norm() / reference.norm()) < 1e-6


@pytest.mark.parametrize(
    "method", [{"name": "if"}, {"name": "source", "eta": 0.003, "steps": 250}, {"name": "grad_cos"}]
)
def test_planted_canary_is_the_top_supporter(method, trained, indexed, tmp_path):
    config = indexed.with_method(indexed.method.model_copy(update=method))
    queries = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"id": "canary", "prompt": "the purple walrus sings", "completion": " opera beneath the frozen moon"},
            {"id": "copy", "text": trained["texts"][20]},
        ],
    )
    result = run_query(config, str(queries), 3, options=QueryOptions(k=3, per_token=True))
    canary_index = trained["texts"].index(CANARY)
    assert result.top_indices is not None and result.records is not None
    assert result.top_indices[0, 0] == canary_index
    assert result.top_indices[1, 0] == 20, "a query equal to a training row ranks that row first"
    record = result.records[0]
    shares = np.array(record["top_k"][0]["per_token"])
    assert len(shares) == len(record["completion_tokens"]) == 5
    assert shares.sum() == pytest.approx(record["top_k"][0]["score"], rel=1e-8)
    assert record["bottom_k"][0]["score"] <= record["top_k"][-1]["score"]


def test_generate_through_the_cli_writes_results(trained, indexed, tmp_path):
    from tests.cli_helpers import invoke

    config_path = tmp_path / "job.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(indexed.model_dump()))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "w", "prompt": "the purple walrus"}])
    out = tmp_path / "r.jsonl"
    result = invoke(
        "query",
        config_path,
        "--queries",
        prompts,
        "--generate",
        "--no-chat",
        "--max-new-tokens",
        4,
        "--top-k",
        2,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["generated"] is True and record["completion"].split()[:2] == ["sings", "opera"]
    assert record["top_k"][0]["snippet"] == CANARY
    no_template = invoke("query", config_path, "--queries", prompts, "--generate", "--chat")
    assert no_template.exit_code == 2 and "chat template" in no_template.output


def test_query_writes_a_self_contained_report(trained, indexed, tmp_path):
    queries = write_jsonl(
        tmp_path / "q.jsonl",
        [{"id": "canary", "prompt": "the purple walrus sings", "completion": " opera beneath the frozen moon"}],
    )
    report = tmp_path / "report.html"
    run_query(indexed, str(queries), 3, options=QueryOptions(k=3, per_token=True), report=str(report))
    page = report.read_text()
    assert "purple walrus" in page and "s07" in page and CANARY in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
