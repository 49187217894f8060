"""Attribution for a plain torch model (its `nn.Linear` layers) on in-memory tensors.

Every method runs through the same code as the LM store: `GradientCapture` (per-example projected
gradients G̃ = Σ_t δ̃_t ã_tᵀ), `engine.curvature` (mergeable sums, eigendecomposition, eigenvalue
correction, dense Gram) and `engine.spectral` (each method's query terms). Only the source of the
gradients differs: `model(inputs)` and a per-example loss instead of a tokenised batch of an HF model.

    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    run = TrainingRun([Segment([Checkpoint(early_a), Checkpoint(early_b)], Dataset(x, y), eta=0.1, steps=50),
                       Segment([Checkpoint(final)], Dataset(x, y), eta=0.05, steps=50)])
    attribution = InMemoryAttribution(model, squared_error(), run)
    scores = attribution.scores("source", Dataset(x_query, y_query))   # (Q, N), positive = supports

Conventions are those of the store: scores are not divided by N (predicted change of the query's
measurement when example i is removed from its dataset of N = score / N; positive = supports), one
position per example (Ã is normalised per example), bias as a constant-1 input column, checkpoints in
training order with the last one the final model. Segments that share a `Dataset` object share its rows
(one run); different objects are different stages (continual training) and get their own score columns,
in order of first appearance (`columns(i)`).

Curvature labels (`Settings.fisher`): "exact" (default here) sums over the output dimensions with the
loss's output-Hessian root, so the factors estimate the Gauss-Newton matrix with no sampling noise;
True samples labels from the model (the LM path's default); "empirical" uses the data's targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn
from torch.func import functional_call

from engine.capture.capture import ForwardPass, GradientCapture
from engine.capture.modules import tracked_shapes
from engine.config import MethodConfig
from engine.curvature.dense import dense_gram_factors
from engine.curvature.factors import NEEDS_COVARIANCE, NEEDS_LAMBDA_PASS, ModuleFactors, final_factors, initial_factors
from engine.curvature.statistics import (
    ModuleCovariance,
    ModuleLambda,
    PartialSums,
    add_covariance,
    add_lambda,
    merge_all,
)
from engine.errors import TributaryError
from engine.projection import ProjectionSpec, build_projection
from engine.spectral.core import QueryTerm, score_terms
from engine.spectral.methods import Method, adam_preconditioner, method_from_config
from engine.training_run.plan import CheckpointPlan, RunPlan, SegmentPlan
from engine.training_run.preconditioner import average, module_layout

Tensor = torch.Tensor


# ---- what the caller supplies ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExampleLoss:
    """A per-example loss and what the Gauss-Newton curvature needs from it.

    loss(outputs, targets) -> (B,) per-example losses (summed over output dimensions, not averaged);
    sample(outputs, generator) -> targets drawn from the model's predictive distribution (fisher=True);
    hessian_root(outputs) -> (B, K, K) with R Rᵀ = ∂²loss/∂outputs² per example (fisher="exact").
    """

    loss: Callable[[Tensor, Tensor], Tensor]
    sample: Callable[[Tensor, torch.Generator], Tensor] | None = None
    hessian_root: Callable[[Tensor], Tensor] | None = None


def _flat(outputs: Tensor) -> Tensor:
    return outputs.reshape(outputs.shape[0], -1)


def squared_error() -> ExampleLoss:
    """½‖f(x) − y‖² (Gaussian likelihood with unit variance)."""

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * ((_flat(outputs) - _flat(targets).to(outputs.dtype)) ** 2).sum(dim=1)

    def sample(outputs: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
        return outputs.detach() + noise

    def hessian_root(outputs: Tensor) -> Tensor:
        width = _flat(outputs).shape[1]
        return torch.eye(width, dtype=outputs.dtype).expand(outputs.shape[0], width, width)

    return ExampleLoss(loss, sample, hessian_root)


def cross_entropy() -> ExampleLoss:
    """Softmax cross-entropy on logits (B, C) with integer targets (B,)."""

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return functional.cross_entropy(outputs, targets.long(), reduction="none")

    def sample(outputs: Tensor, generator: torch.Generator) -> Tensor:
        return torch.multinomial(torch.softmax(outputs.detach(), dim=-1), 1, generator=generator).squeeze(1)

    def hessian_root(outputs: Tensor) -> Tensor:
        p = torch.softmax(outputs.detach().to(torch.float64), dim=-1)
        hessian = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        values, vectors = torch.linalg.eigh(hessian)
        return (vectors * values.clamp(min=0).sqrt().unsqueeze(-2)).to(outputs.dtype)

    return ExampleLoss(loss, sample, hessian_root)


@dataclass(frozen=True)
class Dataset:
    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class Checkpoint:
    """Parameters by name (as `model.named_parameters()`), the learning rate there (TracInCP's η_c), and
    for the Adam variant the second moments by parameter name and the optimizer step (bias correction)."""

    parameters: Mapping[str, Tensor]
    learning_rate: float | None = None
    exp_avg_sq: Mapping[str, Tensor] | None = None
    step: int | None = None


@dataclass
class Segment:
    """Checkpoints sampled along K = `steps` optimizer steps of mean learning rate `eta` on `data`."""

    checkpoints: Sequence[Checkpoint]
    data: Dataset
    eta: float | None = None
    steps: int | None = None


@dataclass
class TrainingRun:
    segments: Sequence[Segment]
    optimizer: str = "sgd"  # "sgd" (momentum β: η/(1−β)) or "adam"
    momentum: float = 0.0
    preconditioned: bool = False  # Adam: Source with P·H, P from the checkpoints' exp_avg_sq
    beta2: float = 0.999
    eps: float = 1e-8
    averaged: bool = False  # Fast-Source: also compute at each segment's averaged parameters

    @classmethod
    def final_only(cls, parameters: Mapping[str, Tensor], data: Dataset) -> TrainingRun:
        return cls([Segment([Checkpoint(parameters)], data)])


@dataclass(frozen=True)
class Settings:
    projection_dim: int = 0  # 0 = exact
    projection_seed: int = 0
    projection_kind: str = "rademacher"
    strategy: str = "ekfac"  # identity | diagonal | kfac | ekfac
    fisher: bool | str = "exact"  # "exact" | True (sampled labels) | "empirical"
    seed: int = 0
    include_bias: bool = True
    batch_size: int | None = None  # None: a whole dataset per forward pass
    dtype: torch.dtype = torch.float64
    modules: tuple[str, ...] | None = None  # names of the tracked nn.Linear modules; None: all


# ---- the attribution engine for one model and one run -------------------------------------------


def _segment_rate(rate: float | None, run: TrainingRun) -> float | None:
    if rate is None or run.optimizer != "sgd":
        return rate
    return rate / (1.0 - run.momentum)


class InMemoryAttribution:
    """Implements `engine.spectral.methods.Resources` for a plain model, so every method applies."""

    def __init__(self, model: nn.Module, loss: ExampleLoss, run: TrainingRun, settings: Settings = Settings()):
        self.model = model
        self.loss = loss
        self.run = run
        self.settings = settings
        self.modules = self._tracked(model, settings.modules)
        shapes = tracked_shapes(self.modules, settings.include_bias)
        self.spec: ProjectionSpec = build_projection(
            settings.projection_dim, settings.projection_seed, settings.projection_kind, shapes
        )
        self.capture = GradientCapture(
            model, self.modules, self.spec, settings.include_bias, settings.dtype, torch.device("cpu")
        )
        self.plan, self._parameters, self._data, self._checkpoints = self._describe(run)
        self._cache: dict[tuple, object] = {}
        self._queries: Dataset | None = None
        self._measurement: ExampleLoss = loss

    # ---- set-up and validation --------------------------------------------------------------------
    @staticmethod
    def _tracked(model: nn.Module, names: tuple[str, ...] | None) -> dict[str, nn.Module]:
        linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
        if names is None:
            return linears
        missing = [n for n in names if n not in linears]
        if missing:
            raise TributaryError(
                f"Settings.modules names {missing}, which are not nn.Linear modules of the model "
                f"(it has {', '.join(linears)})"
            )
        return {n: linears[n] for n in names}

    def _check_parameters(self, parameters: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
        expected = {name: tuple(p.shape) for name, p in self.model.named_parameters()}
        given = {name: tuple(p.shape) for name, p in parameters.items()}
        if given != expected:
            missing = sorted(set(expected) - set(given))
            extra = sorted(set(given) - set(expected))
            shapes = [
                f"{n}: {given[n]} vs model {expected[n]}" for n in expected if n in given and given[n] != expected[n]
            ]
            raise TributaryError(
                f"{where} has a different architecture from the model (missing {missing[:4]}, unexpected "
                f"{extra[:4]}, shapes {shapes[:4]}); every checkpoint must hold the same parameters"
            )
        return {name: p.detach().to(self.settings.dtype) for name, p in parameters.items()}

    def _describe(self, run: TrainingRun):
        if not run.segments:
            raise TributaryError("the training run has no segments; give at least one Segment")
        if run.optimizer not in ("sgd", "adam"):
            raise TributaryError(f"TrainingRun.optimizer {run.optimizer!r} is unknown; use 'sgd' or 'adam'")
        if run.preconditioned and run.optimizer != "adam":
            raise TributaryError("TrainingRun.preconditioned needs optimizer 'adam' (P = 1/(sqrt(v)+eps))")
        datasets: list[Dataset] = []
        checkpoints, segments, parameters, data, originals = [], [], {}, {}, {}
        for index, segment in enumerate(run.segments):
            if not segment.checkpoints:
                raise TributaryError(f"segment {index} has no checkpoints; give each segment at least one Checkpoint")
            dataset = next((i for i, d in enumerate(datasets) if d is segment.data), None)
            if dataset is None:
                datasets.append(segment.data)
                dataset = len(datasets) - 1
            names = []
            for checkpoint in segment.checkpoints:
                name = f"c{len(checkpoints)}"
                parameters[name] = self._check_parameters(checkpoint.parameters, f"checkpoint {name} (segment {index})")
                data[name] = segment.data
                originals[name] = checkpoint
                checkpoints.append(
                    CheckpointPlan(
                        name, index, learning_rate=_segment_rate(checkpoint.learning_rate, run), step=checkpoint.step
                    )
                )
                names.append(name)
            plan = SegmentPlan(index, tuple(names), _segment_rate(segment.eta, run), segment.steps, dataset)
            segments.append(plan)
            if run.averaged:
                parameters[plan.averaged] = {
                    key: torch.stack([parameters[n][key] for n in names]).mean(dim=0) for key in parameters[names[0]]
                }
                data[plan.averaged] = segment.data
        plan = RunPlan(
            tuple(checkpoints),
            tuple(segments),
            tuple(f"dataset{i}" for i in range(len(datasets))),
            run.optimizer,
            run.preconditioned,
            run.averaged,
        )
        self._datasets = datasets
        return plan, parameters, data, originals

    # ---- columns of the score matrix ------------------------------------------------------------------
    def columns(self, dataset: int) -> slice:
        """The score columns of dataset `dataset` (order of first appearance in the run's segments)."""
        start = sum(len(d) for d in self._datasets[:dataset])
        return slice(start, start + len(self._datasets[dataset]))

    @property
    def total_rows(self) -> int:
        return sum(len(d) for d in self._datasets)

    # ---- forward passes ---------------------------------------------------------------------------
    def _batches(self, data: Dataset) -> Iterator[tuple[Tensor, Tensor]]:
        size = self.settings.batch_size or max(len(data), 1)
        for start in range(0, len(data), size):
            yield data.inputs[start : start + size], data.targets[start : start + size]

    def _forward(self, parameters: dict[str, Tensor], inputs: Tensor) -> tuple[ForwardPass, Tensor]:
        x = inputs.detach().to(self.settings.dtype).requires_grad_(True)
        mask = torch.ones(len(x), 1, dtype=torch.long)
        state = self.capture.run(lambda: functional_call(self.model, parameters, (x,)), mask)
        return state, mask

    def _curvature_deltas(self, state: ForwardPass, targets: Tensor, generator: torch.Generator) -> list[dict]:
        """Output-gradients for the curvature, one dict per label draw (several for the exact Fisher)."""
        fisher, outputs = self.settings.fisher, state.logits
        if fisher == "empirical":
            return [self.capture.output_gradients(state, self.loss.loss(outputs, targets), retain_graph=True)]
        if fisher is True:
            if self.loss.sample is None:
                raise TributaryError("Settings.fisher True samples labels, but the ExampleLoss has no `sample`")
            sampled = self.loss.sample(outputs, generator)
            return [self.capture.output_gradients(state, self.loss.loss(outputs, sampled), retain_graph=True)]
        if fisher == "exact":
            if self.loss.hessian_root is None:
                raise TributaryError("Settings.fisher 'exact' needs an ExampleLoss with `hessian_root`")
            roots = self.loss.hessian_root(outputs.detach())
            flat = _flat(outputs)
            return [
                self.capture.output_gradients(state, (flat * roots[:, :, k]).sum(dim=1), retain_graph=True)
                for k in range(roots.shape[2])
            ]
        raise TributaryError(f"Settings.fisher {fisher!r} is unknown; use 'exact', True or 'empirical'")

    def _gradients(self, parameters: dict[str, Tensor], data: Dataset, loss: ExampleLoss) -> np.ndarray:
        rows = []
        with self.capture.hooks():
            for inputs, targets in self._batches(data):
                state, _ = self._forward(parameters, inputs)
                deltas = self.capture.output_gradients(state, loss.loss(state.logits, targets), retain_graph=False)
                rows.append(self.capture.flatten(self.capture.example_gradients(state, deltas)).detach())
        return torch.cat(rows).to(torch.float64).numpy()

    def _covariance(self, key: str) -> dict[str, ModuleCovariance]:
        sums = {m.name: ModuleCovariance.zeros(m.k_in, m.k_out) for m in self.spec.modules}
        generator = torch.Generator().manual_seed(self.settings.seed)
        with self.capture.hooks():
            for inputs, targets in self._batches(self._data[key]):
                state, mask = self._forward(self._parameters[key], inputs)
                draws = self._curvature_deltas(state, targets, generator)
                for name in self.modules:
                    add_covariance(sums[name], state.activations[name], [d for draw in draws for d in draw[name]], mask)
        return sums

    def _lambdas(
        self, key: str, factors: dict[str, ModuleFactors], scale: dict[str, np.ndarray] | None
    ) -> dict[str, ModuleLambda]:
        sums = {m.name: ModuleLambda.zeros(m.k_in, m.k_out) for m in self.spec.modules}
        bases = {
            name: (torch.from_numpy(f.q_s), torch.from_numpy(f.q_a)) if f.rotated else None
            for name, f in factors.items()
        }
        scales = {name: torch.from_numpy(s) for name, s in scale.items()} if scale is not None else {}
        generator = torch.Generator().manual_seed(self.settings.seed)
        with self.capture.hooks():
            for inputs, targets in self._batches(self._data[key]):
                state, _ = self._forward(self._parameters[key], inputs)
                for draw, deltas in enumerate(self._curvature_deltas(state, targets, generator)):
                    for name, grads in self.capture.example_gradients(state, deltas).items():
                        add_lambda(sums[name], grads, bases[name], scales.get(name), count=draw == 0)
        return sums

    def _fit(self, keys: Sequence[str], scale: dict[str, np.ndarray] | None) -> dict[str, ModuleFactors]:
        """Factors averaged over `keys` (one shared eigenbasis, Λ averaged), of P^{1/2} H P^{1/2} with a scale."""
        strategy = self.settings.strategy
        widths = {m.name: (m.k_in, m.k_out) for m in self.spec.modules}
        covariance = {}
        if strategy in NEEDS_COVARIANCE:
            covariance = merge_all([PartialSums(covariance=self._covariance(key)) for key in keys]).covariance
        initial = initial_factors(strategy, covariance, widths)
        if strategy not in NEEDS_LAMBDA_PASS:
            if scale is not None:
                raise TributaryError(
                    f"the preconditioned (Adam) variant needs strategy ekfac or diagonal, not {strategy}"
                )
            return initial
        lambdas = merge_all([PartialSums(lambdas=self._lambdas(key, initial, scale)) for key in keys]).lambdas
        return final_factors(strategy, initial, lambdas)

    def _cached(self, key: tuple, compute: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    # ---- Resources -------------------------------------------------------------------------------
    def gradients(self, key: str) -> np.ndarray:
        """(N, D) projected per-example training gradients stored under `key` ("c0", ..., "avg0", ...)."""
        return self._cached(("rows", key), lambda: self._gradients(self._parameters[key], self._data[key], self.loss))

    def query_gradients(self, key: str) -> np.ndarray:
        if self._queries is None:
            raise ValueError("no queries set; call scores()")
        return self._cached(
            ("queries", key), lambda: self._gradients(self._parameters[key], self._queries, self._measurement)
        )

    def factors(self, key: str) -> dict[str, ModuleFactors]:
        """ "cJ": checkpoint J's own factors; "sL": averaged over segment L's checkpoints; "avgL": at segment L's
        averaged parameters. For a preconditioned run, "sL" and "avgL" are the factors of P̄^{1/2} H P̄^{1/2}."""

        def compute() -> dict[str, ModuleFactors]:
            if key.startswith("c"):
                return self._fit([key], None)
            index = int(key[1:] if key.startswith("s") else key[3:])
            scale = None
            if self.plan.preconditioned:
                scale = {name: np.sqrt(p) for name, p in self.preconditioner(index).items()}
            if key.startswith("avg"):
                return self._fit([key], scale)
            names = self.plan.segments[index].checkpoints
            return self.factors(names[0]) if len(names) == 1 and scale is None else self._fit(names, scale)

        return self._cached(("factors", key), compute)

    def dense_factors(self, key: str) -> dict[str, ModuleFactors]:
        return self._cached(("dense", key), lambda: dense_gram_factors([self.gradients(key)], self.spec))

    def training_blocks(self, key: str) -> Iterator[np.ndarray]:
        yield self.gradients(key)

    def _checkpoint_preconditioner(self, name: str) -> dict[str, np.ndarray]:
        checkpoint = self._checkpoints[name]
        if checkpoint.exp_avg_sq is None or checkpoint.step is None:
            raise TributaryError(
                f"the preconditioned (Adam) variant needs exp_avg_sq and the optimizer step (for "
                f"the bias correction) at checkpoint {name}"
            )
        state = checkpoint.exp_avg_sq
        expected = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        wrong = [
            f"{n}: {tuple(state[n].shape)} vs {expected[n]}"
            for n in state
            if n in expected and tuple(state[n].shape) != expected[n]
        ]
        unknown = [n for n in state if n not in expected]
        if wrong or unknown:
            raise TributaryError(
                f"exp_avg_sq at checkpoint {name} does not match the model's parameters "
                f"(shapes {wrong[:4]}, unknown {unknown[:4]})"
            )
        out = {}
        for module in self.spec.modules:
            prefix = f"{module.name}." if module.name else ""  # the model itself may be the Linear
            weight = f"{prefix}weight"
            bias = f"{prefix}bias" if self.capture.bias_column[module.name] else None
            missing = [n for n in (weight, bias) if n is not None and n not in state]
            if missing:
                raise TributaryError(f"exp_avg_sq at checkpoint {name} has no entry for {missing}")

            def precondition(n: str) -> np.ndarray:
                return adam_preconditioner(state[n].detach().numpy(), checkpoint.step, self.run.beta2, self.run.eps)

            out[module.name] = module_layout(
                precondition(weight),
                None if bias is None else precondition(bias),
                module,
                f"exp_avg_sq at checkpoint {name}",
            )
        return out

    def preconditioner(self, segment: int) -> dict[str, np.ndarray]:
        names = self.plan.segments[segment].checkpoints
        return self._cached(
            ("preconditioner", segment), lambda: average([self._checkpoint_preconditioner(n) for n in names])
        )

    # ---- scores ------------------------------------------------------------------------------------
    def terms(self, method: Method, queries: Dataset, measurement: ExampleLoss | None = None) -> list[QueryTerm]:
        if self._queries is not queries or self._measurement is not (measurement or self.loss):
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "queries"}
        self._queries, self._measurement = queries, measurement or self.loss
        return method.terms(self)

    def scores(
        self, method: str | MethodConfig, queries: Dataset, measurement: ExampleLoss | None = None, **options
    ) -> np.ndarray:
        """(Q, total_rows) scores of `method` (a name with MethodConfig options, or a MethodConfig)."""
        config = method if isinstance(method, MethodConfig) else MethodConfig(name=method, **options)
        resolved = method_from_config(config)
        terms = self.terms(resolved, queries, measurement)

        def blocks(key: str):
            columns = self.columns(self.plan.dataset_of(key))
            yield columns.start, columns.stop, self.gradients(key)

        return score_terms(terms, blocks, self.total_rows, resolved)


__all__ = [
    "Checkpoint",
    "Dataset",
    "ExampleLoss",
    "InMemoryAttribution",
    "Segment",
    "Settings",
    "TrainingRun",
    "cross_entropy",
    "squared_error",
]
