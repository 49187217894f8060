"""A routed expert's K-FAC input covariance is a mean over the tokens routed to it, not over every token; an
expert no token of the fit reached gets A = 0 (damping alone) and is named, not silently fitted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.capture.experts import ExpertSlice
from engine.config import parse_config
from engine.curvature.factors import eigendecompose
from engine.curvature.packing import covariance_counts, pack_covariance, unpack_covariance
from engine.data.rows import field_names, read_rows
from engine.gradients.context import context_for_model, prepare_index_job
from engine.gradients.passes import covariance_pass
from engine.local_or_ray import run_index
from engine.store import GradientStore
from engine.testing.families import build_family_model, save_family
from engine.testing.tiny import build_tokenizer
from tests.conftest import SENTENCES, job_config, vocabulary_texts

EXPERTS = "model.layers.{layer}.mlp.experts"


def _mixtral_context(tmp_path, batch_size: int, top1_to_expert0: bool = False):
    tokenizer = build_tokenizer(vocabulary_texts(), add_bos=False)
    model = build_family_model("mixtral", len(tokenizer), dtype=torch.float64)
    if top1_to_expert0:  # layer 0's router sends every token to expert 0 alone
        model = build_family_model("mixtral", len(tokenizer), dtype=torch.float64, num_experts_per_tok=1)
        router = model.model.layers[0].mlp.gate
        original = router.forward

        def routed(hidden_states):
            logits, scores, indices = original(hidden_states)
            return logits, scores, torch.zeros_like(indices)

        router.forward = routed
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:5]))
    raw = job_config(tmp_path, tmp_path, train)
    raw["data"]["batch_size"] = batch_size
    config = parse_config(raw)
    context = context_for_model(config, model, tokenizer, torch.device("cpu"))
    rows = context.tokenize(read_rows(str(train), field_names(config), what="data.train"), str(train))
    return context, rows, model


def _routed_inputs(model, rows, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, run alone (no padding): the experts module's input hidden states (T, d) and top-k choice (T, k)."""
    experts = model.model.layers[layer].mlp.experts
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, args, kwargs):
        hidden, choice = (args + tuple(kwargs.values()))[:2]
        seen.append((hidden.detach().clone(), choice.detach().clone()))

    handle = experts.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for row in rows:
                model(input_ids=torch.tensor([row.input_ids]))
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("batch_size", [1, 3])
def test_an_experts_input_covariance_is_the_mean_over_its_routed_tokens(tmp_path, batch_size):
    """Against an explicit loop: each row run alone, the experts module's inputs and routing read by a hook, and
    A_e = mean over the tokens routed to e of x xᵀ (gate_up) and of h hᵀ, h its gated hidden (down)."""
    context, rows, model = _mixtral_context(tmp_path, batch_size)
    sums, _ = covariance_pass(context, rows)
    total_tokens = sum(len(row.input_ids) for row in rows)
    assert sums["model.layers.0.self_attn.q_proj"].tokens == total_tokens  # other modules: every token, as before
    layer = 1
    module = model.model.layers[layer].mlp.experts
    seen = _routed_inputs(model, rows, layer)
    token_shares = []
    for expert in range(module.num_experts):
        xs = torch.cat([hidden[(choice == expert).any(-1)] for hidden, choice in seen])
        assert xs.shape[0] > 0, "the tiny model should route some token to every expert of layer 1"
        gate_up = context.modules[f"{EXPERTS.format(layer=layer)}.gate_up.{expert}"]
        assert isinstance(gate_up, ExpertSlice)
        with torch.no_grad():
            gated = module._apply_gate(xs @ gate_up.weight.T)
        for side, inputs in (("gate_up", xs), ("down", gated)):
            ours = sums[f"{EXPERTS.format(layer=layer)}.{side}.{expert}"]
            assert ours.tokens == xs.shape[0]
            reference = (inputs.T @ inputs / inputs.shape[0]).numpy()
            np.testing.assert_allclose(ours.a_sum / ours.tokens, reference, rtol=1e-9, atol=1e-12)
        token_shares.append(xs.shape[0])
    assert sum(token_shares) == 2 * total_tokens  # top-2: every token reaches two experts


def test_an_expert_no_token_reached_is_damping_alone_and_survives_the_store_counts(tmp_path):
    context, rows, _ = _mixtral_context(tmp_path, 3, top1_to_expert0=True)
    sums, _ = covariance_pass(context, rows)
    unrouted = f"{EXPERTS.format(layer=0)}.gate_up.1"
    assert sums[unrouted].tokens == 0 and sums[f"{EXPERTS.format(layer=0)}.gate_up.0"].tokens > 0
    # the per-module token counts travel through a shard's packed partial sums
    vector, counts = pack_covariance(sums, context.spec)
    assert counts.shape == (covariance_counts(context.spec),)
    back = unpack_covariance(vector, counts, context.spec)
    assert {name: c.tokens for name, c in back.items()} == {name: c.tokens for name, c in sums.items()}
    factors = eigendecompose(back[unrouted], "kfac")
    assert np.all(factors.alpha == 0) and np.all(factors.lam == 0)  # damping alone, not a division by zero


@pytest.mark.heavy  # a full index run: ~30 s on a loaded machine
def test_an_index_stores_each_experts_own_token_count(tmp_path, text_train):
    """run_index (K-FAC) over shards: the store's reduced counts give each expert the tokens routed to it, as the
    in-process covariance pass counts them, and every other module every token."""
    path = save_family(tmp_path / "mixtral", "mixtral", vocabulary_texts())
    raw = job_config(tmp_path, path, text_train, model={"tokenizer": str(path / "tokenizer")})
    raw["curvature"] = {"strategy": "kfac"}
    config = parse_config(raw)
    store = run_index(config, show_progress=False)
    assert isinstance(store, GradientStore)
    job = prepare_index_job(config)
    expected, _ = covariance_pass(job.context, job.tokenized)
    stored = unpack_covariance(*store.summed_partials("covariance"), job.context.spec)
    assert {name: c.tokens for name, c in stored.items()} == {name: c.tokens for name, c in expected.items()}
    experts = [name for name, m in job.context.modules.items() if isinstance(m, ExpertSlice)]
    total = sum(len(row.input_ids) for row in job.tokenized)
    assert all(stored[name].tokens < total for name in experts)
    assert all(c.tokens == total for name, c in stored.items() if name not in experts)


def _to_expert_0(router_forward):
    def routed(hidden_states):
        logits, scores, indices = router_forward(hidden_states)
        return logits, scores, torch.zeros_like(indices)

    return routed


def _unrouted_index(tmp_path, monkeypatch, linear: bool):
    """`tributary index` (EK-FAC) of a top-1 Mixtral whose routers send every token to expert 0 (through the
    worker's own model load); experts 1-3 of each layer then see no token of the fit."""
    from engine.gradients import context
    from engine.testing.linear_moe import with_linear_experts
    from tests.cli_helpers import invoke

    path = save_family(tmp_path / "mixtral", "mixtral", vocabulary_texts(), num_experts_per_tok=1)
    load_model = context.load_model

    def all_to_expert_0(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        for layer in (0, 1):
            router = model.get_submodule(f"model.layers.{layer}.mlp.gate")
            router.forward = _to_expert_0(router.forward)
        return (with_linear_experts(model) if linear else model), tokenizer

    monkeypatch.setattr(context, "load_model", all_to_expert_0)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:4]))
    raw = job_config(tmp_path, path, train, model={"tokenizer": str(path / "tokenizer")})
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(raw))
    result = invoke("index", config, "--no-progress")
    assert result.exit_code == 0, result.output
    return raw["store"]["path"], result.output


@pytest.mark.parametrize("linear", [False, pytest.param(True, marks=pytest.mark.heavy)], ids=["fused", "linear"])
def test_an_expert_no_token_reached_is_named_and_its_factors_are_not_invented(tmp_path, monkeypatch, linear):
    from tests.cli_helpers import invoke

    path, output = _unrouted_index(tmp_path, monkeypatch, linear)
    layers = [EXPERTS.format(layer=layer) for layer in (0, 1)]
    if linear:
        unrouted = [f"{experts}.{e}.{p}" for experts in layers for e in (1, 2, 3) for p in ("w1", "w3", "w2")]
    else:
        unrouted = [f"{experts}.{p}.{e}" for experts in layers for p in ("gate_up", "down") for e in (1, 2, 3)]
    store = GradientStore.open(path)
    assert sorted(store.manifest.coverage["unrouted_experts"]) == sorted(unrouted)
    assert f"no token of the curvature fit was routed to {len(unrouted)} expert module(s)" in " ".join(output.split())
    info = invoke("info", path)
    assert info.exit_code == 0, info.output
    assert sorted(json.loads(info.stdout)["coverage"]["unrouted_experts"]) == sorted(unrouted)
    factors = store.read_factors()
    rows = store.read_rows(0, store.rows)
    offset = 0
    for module in store.manifest.projection.modules:
        width = module.d_in * module.d_out
        if module.name in unrouted:  # damping alone: no eigenvalue, no Λ made up, and no gradient on any row
            assert not np.any(factors[module.name].lam), module.name
            assert factors[module.name].alpha is None or not np.any(factors[module.name].alpha), module.name
            assert not np.any(rows[:, offset : offset + width]), module.name
        offset += width
    routed = f"{layers[1]}.0.w1" if linear else f"{layers[1]}.gate_up.0"
    assert np.any(factors[routed].lam) and np.any(factors[routed].alpha)
