"""Attribution for a plain torch model (its `nn.Linear` layers) on in-memory tensors.

Every method runs through the same code as the LM store: `GradientCapture` (per-example projected
gradients G̃ = Σ_t δ̃_t ã_tᵀ), `engine.curvature` (the sums' accumulators and `fit_factors`, which also fits
the store's segment factors), `engine.training_run` (the run plan, Adam's preconditioner) and
`engine.spectral` (`CachedResources`, each method's query terms). Only the source of the gradients differs:
`model(inputs)` and a per-example loss (engine.attribution.losses) instead of a tokenised batch of an HF model.

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

Curvature labels: `Settings.exact_fisher` (default here) sums over the output dimensions with the loss's
output-Hessian root, so the factors estimate the Gauss-Newton matrix with no sampling noise; without it,
`Settings.curvature.fisher` True samples labels from the model (the LM path's default) and "empirical" uses
the data's targets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from engine.attribution.inputs import ADAM_BETA2, ADAM_EPS, Checkpoint, Dataset, Settings, TrainingRun
from engine.attribution.losses import ExampleLoss, flatten_outputs
from engine.capture.capture import ForwardPass, GradientCapture
from engine.capture.modules import tracked_shapes
from engine.config import MethodConfig
from engine.curvature.accumulators import CovarianceAccumulator, LambdaAccumulator
from engine.curvature.fitting import Factors, fit_factors, module_widths
from engine.curvature.statistics import ModuleCovariance, ModuleLambda
from engine.errors import TributaryError
from engine.projection import build_projection
from engine.spectral.core import QueryTerm, score_terms
from engine.spectral.methods import Method, method_from_config
from engine.spectral.resources import CachedResources
from engine.training_run.keys import ResourceKey
from engine.training_run.plan import CheckpointPlan, RunPlan, SegmentPlan
from engine.training_run.preconditioner import average, module_preconditioner, square_root

Tensor = torch.Tensor
Parameters = dict[str, Tensor]


def _segment_rate(rate: float | None, run: TrainingRun) -> float | None:
    if rate is None or run.optimizer.name != "sgd":
        return rate
    return rate / (1.0 - run.optimizer.momentum)


class InMemoryAttribution(CachedResources):
    """Implements `engine.spectral.methods.Resources` for a plain model, so every method applies."""

    def __init__(self, model: nn.Module, loss: ExampleLoss, run: TrainingRun, settings: Settings = Settings()):
        self.model = model
        self.loss = loss
        self.run = run
        self.settings = settings
        self.modules = self._tracked(model, settings.modules)
        shapes = tracked_shapes(self.modules, settings.include_bias)
        projection = settings.projection
        if projection.budget is not None:
            raise TributaryError("projection.budget is measured on a store; in-memory attribution takes projection.dim")
        spec = build_projection(projection.dim, projection.seed, projection.kind, shapes)
        if spec.fitted:
            raise TributaryError(
                f"projection kind {spec.kind} is fitted by `tributary index` into a store; in-memory attribution "
                "projects with projection.kind rademacher or gaussian"
            )
        self.capture = GradientCapture(
            model, self.modules, spec, settings.include_bias, settings.dtype, torch.device("cpu")
        )
        self._datasets: list[Dataset] = []
        self._parameters: dict[ResourceKey, Parameters] = {}
        self._data: dict[ResourceKey, Dataset] = {}
        self._checkpoints: dict[ResourceKey, Checkpoint] = {}
        super().__init__(spec, self._describe(run))
        self._query_data: Dataset | None = None
        self._measurement: ExampleLoss = loss

    # ---- set-up and validation --------------------------------------------------------------------
    @staticmethod
    def _tracked(model: nn.Module, names: tuple[str, ...] | None) -> dict[str, nn.Module]:
        linears: dict[str, nn.Module] = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
        if names is None:
            return linears
        missing = [n for n in names if n not in linears]
        if missing:
            raise TributaryError(
                f"Settings.modules names {missing}, which are not nn.Linear modules of the model "
                f"(it has {', '.join(linears)})"
            )
        return {n: linears[n] for n in names}

    def _check_parameters(self, parameters: Mapping[str, Tensor], where: str) -> Parameters:
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

    def _describe(self, run: TrainingRun) -> RunPlan:
        """The run's plan; fills in the parameters, data and checkpoint of every key, and the datasets."""
        if not run.segments:
            raise TributaryError("the training run has no segments; give at least one Segment")
        if run.optimizer.name not in ("sgd", "adam"):
            raise TributaryError(
                f"TrainingRun.optimizer.name {run.optimizer.name!r} is not run in memory; use 'sgd' or 'adam'"
            )
        if run.optimizer.preconditioned and run.optimizer.name != "adam":
            raise TributaryError("TrainingRun.optimizer.preconditioned needs optimizer.name adam (P = 1/(sqrt(v)+eps))")
        checkpoints: list[CheckpointPlan] = []
        segments: list[SegmentPlan] = []
        for index, segment in enumerate(run.segments):
            if not segment.checkpoints:
                raise TributaryError(f"segment {index} has no checkpoints; give each segment at least one Checkpoint")
            dataset = next((i for i, d in enumerate(self._datasets) if d is segment.data), None)
            if dataset is None:
                self._datasets.append(segment.data)
                dataset = len(self._datasets) - 1
            keys = []
            for checkpoint in segment.checkpoints:
                key = ResourceKey.checkpoint(len(checkpoints))
                self._parameters[key] = self._check_parameters(
                    checkpoint.parameters, f"checkpoint {key} (segment {index})"
                )
                self._data[key] = segment.data
                self._checkpoints[key] = checkpoint
                rate = _segment_rate(checkpoint.learning_rate, run)
                checkpoints.append(CheckpointPlan(key.group_name, index, learning_rate=rate, step=checkpoint.step))
                keys.append(key)
            plan = SegmentPlan(
                index, tuple(k.group_name for k in keys), _segment_rate(segment.eta, run), segment.steps, dataset
            )
            segments.append(plan)
            if run.averaged:
                first = self._parameters[keys[0]]
                self._parameters[plan.averaged] = {
                    name: torch.stack([self._parameters[k][name] for k in keys]).mean(dim=0) for name in first
                }
                self._data[plan.averaged] = segment.data
        return RunPlan(
            tuple(checkpoints),
            tuple(segments),
            tuple(f"dataset{i}" for i in range(len(self._datasets))),
            run.optimizer.name,
            run.optimizer.preconditioned,
            run.averaged,
        )

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

    def _forward(self, parameters: Parameters, inputs: Tensor) -> tuple[ForwardPass, Tensor]:
        x = inputs.detach().to(self.settings.dtype).requires_grad_(True)
        mask = torch.ones(len(x), 1, dtype=torch.long)
        state = self.capture.run(lambda: functional_call(self.model, parameters, (x,)), mask)
        return state, mask

    def _curvature_deltas(
        self, state: ForwardPass, targets: Tensor, generator: torch.Generator
    ) -> list[dict[str, list[Tensor]]]:
        """Output-gradients for the curvature, one dict per label draw (several for the exact Fisher)."""
        fisher = "exact" if self.settings.exact_fisher else self.settings.curvature.fisher
        outputs = state.logits
        if fisher == "empirical":
            return [self.capture.output_gradients(state, self.loss.loss(outputs, targets), retain_graph=True)]
        if fisher is True:
            if self.loss.sample is None:
                raise TributaryError(
                    "Settings.curvature.fisher true samples labels, but the ExampleLoss has no `sample`"
                )
            sampled = self.loss.sample(outputs, generator)
            return [self.capture.output_gradients(state, self.loss.loss(outputs, sampled), retain_graph=True)]
        if fisher == "exact":
            if self.loss.hessian_root is None:
                raise TributaryError("Settings.exact_fisher needs an ExampleLoss with `hessian_root`")
            roots = self.loss.hessian_root(outputs.detach())
            flat = flatten_outputs(outputs)
            return [
                self.capture.output_gradients(state, (flat * roots[:, :, k]).sum(dim=1), retain_graph=True)
                for k in range(roots.shape[2])
            ]
        raise ValueError(f"fisher {fisher!r}: CurvatureConfig admits only true or 'empirical'")

    def _gradients(self, parameters: Parameters, data: Dataset, loss: ExampleLoss) -> np.ndarray:
        rows = []
        with self.capture.hooks():
            for inputs, targets in self._batches(data):
                state, _ = self._forward(parameters, inputs)
                deltas = self.capture.output_gradients(state, loss.loss(state.logits, targets), retain_graph=False)
                rows.append(self.capture.flatten(self.capture.example_gradients(state, deltas)).detach())
        return torch.cat(rows).to(torch.float64).numpy()

    def _covariance(self, key: ResourceKey) -> dict[str, ModuleCovariance]:
        sums = CovarianceAccumulator(self.spec)
        generator = torch.Generator().manual_seed(self.settings.curvature.seed)
        with self.capture.hooks():
            for inputs, targets in self._batches(self._data[key]):
                state, mask = self._forward(self._parameters[key], inputs)
                draws = self._curvature_deltas(state, targets, generator)
                merged = {name: [d for draw in draws for d in draw[name]] for name in self.modules}
                sums.add(state.activations, merged, mask, state.routed_tokens)
        return sums.sums

    def _lambdas(
        self, key: ResourceKey, basis: Factors, scale: dict[str, np.ndarray] | None
    ) -> dict[str, ModuleLambda]:
        sums = LambdaAccumulator(self.spec, basis, scale)
        generator = torch.Generator().manual_seed(self.settings.curvature.seed)
        with self.capture.hooks():
            for inputs, targets in self._batches(self._data[key]):
                state, _ = self._forward(self._parameters[key], inputs)
                for draw, deltas in enumerate(self._curvature_deltas(state, targets, generator)):
                    grads, rotated = sums.token_gradients(state.activations, deltas)
                    sums.add(grads, count=draw == 0, rotated=rotated)
        return sums.sums

    def _fit(self, keys: Sequence[ResourceKey], scale: dict[str, np.ndarray] | None) -> Factors:
        """Factors shared by `keys` (one eigenbasis, Λ averaged), of P^{1/2} H P^{1/2} with a scale P^{1/2}."""
        return fit_factors(
            self.settings.curvature.strategy, module_widths(self.spec), keys, self._covariance, self._lambdas, scale
        )

    def _scale(self, segment: int) -> dict[str, np.ndarray] | None:
        return square_root(self.preconditioner(segment)) if self.plan.preconditioned else None

    # ---- Resources -------------------------------------------------------------------------------
    def gradients(self, key: ResourceKey | str) -> np.ndarray:
        """(N, D) projected per-example training gradients under `key` (or its name: "c0", ..., "avg0", ...)."""
        key = ResourceKey.of(key)
        return self.cached("rows", key, lambda: self._gradients(self._parameters[key], self._data[key], self.loss))

    def factors(self, key: ResourceKey | str) -> Factors:
        """A checkpoint's own factors; a segment's, averaged over its checkpoints; those at a segment's averaged
        parameters (names "c0", "s0", "avg0" too). For a preconditioned run, a segment's and its averaged
        parameters' are the factors of P̄^{1/2} H P̄^{1/2}."""
        return super().factors(ResourceKey.of(key))

    def training_blocks(self, key: ResourceKey) -> Iterator[np.ndarray]:
        yield self.gradients(key)

    def _query_gradients(self, key: ResourceKey) -> np.ndarray:
        if self._query_data is None:
            raise ValueError("no queries set; call scores()")
        return self._gradients(self._parameters[key], self._query_data, self._measurement)

    def _checkpoint_factors(self, key: ResourceKey) -> Factors:
        return self._fit([key], None)

    def _segment_factors(self, segment: int) -> Factors:
        return self._fit(self.plan.segments[segment].checkpoint_keys, self._scale(segment))

    def _averaged_factors(self, segment: int) -> Factors:
        return self._fit([ResourceKey.averaged(segment)], self._scale(segment))

    def _preconditioner(self, segment: int) -> dict[str, np.ndarray]:
        return average([self._checkpoint_preconditioner(key) for key in self.plan.segments[segment].checkpoint_keys])

    def _checkpoint_preconditioner(self, key: ResourceKey) -> dict[str, np.ndarray]:
        checkpoint = self._checkpoints[key]
        state, step = checkpoint.exp_avg_sq, checkpoint.step
        if state is None or step is None:
            raise TributaryError(
                f"the preconditioned (Adam) variant needs exp_avg_sq and the optimizer step (for "
                f"the bias correction) at checkpoint {key}"
            )
        expected = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        wrong = [
            f"{n}: {tuple(state[n].shape)} vs {expected[n]}"
            for n in state
            if n in expected and tuple(state[n].shape) != expected[n]
        ]
        unknown = [n for n in state if n not in expected]
        if wrong or unknown:
            raise TributaryError(
                f"exp_avg_sq at checkpoint {key} does not match the model's parameters "
                f"(shapes {wrong[:4]}, unknown {unknown[:4]})"
            )
        out = {}
        for module in self.spec.modules:
            prefix = f"{module.name}." if module.name else ""  # the model itself may be the Linear
            weight = f"{prefix}weight"
            bias = f"{prefix}bias" if self.capture.bias_column[module.name] else None
            missing = [n for n in (weight, bias) if n is not None and n not in state]
            if missing:
                raise TributaryError(f"exp_avg_sq at checkpoint {key} has no entry for {missing}")
            out[module.name] = module_preconditioner(
                module,
                (state[weight].detach().numpy(), step),
                None if bias is None else (state[bias].detach().numpy(), step),
                ADAM_BETA2 if self.run.optimizer.beta2 is None else self.run.optimizer.beta2,
                ADAM_EPS if self.run.optimizer.eps is None else self.run.optimizer.eps,
                f"exp_avg_sq at checkpoint {key}",
            )
        return out

    # ---- scores ------------------------------------------------------------------------------------
    def terms(self, method: Method, queries: Dataset, measurement: ExampleLoss | None = None) -> list[QueryTerm]:
        measurement = measurement or self.loss
        if self._query_data is not queries or self._measurement is not measurement:
            self.forget_queries()
        self._query_data, self._measurement = queries, measurement
        return method.terms(self)

    def scores(
        self, method: str | MethodConfig, queries: Dataset, measurement: ExampleLoss | None = None, **options
    ) -> np.ndarray:
        """(Q, total_rows) scores of `method` (a name with MethodConfig options, or a MethodConfig)."""
        config = method if isinstance(method, MethodConfig) else MethodConfig(name=method, **options)
        resolved = method_from_config(config)
        terms = self.terms(resolved, queries, measurement)

        def blocks(key: ResourceKey) -> Iterator[tuple[int, int, np.ndarray]]:
            columns = self.columns(self.plan.dataset_of(key))
            yield columns.start, columns.stop, self.gradients(key)

        return score_terms(terms, blocks, self.total_rows, resolved)
