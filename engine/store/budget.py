"""`projection.budget`: the projection spec whose k per module comes from another store's measured Λ.

The effective dimension Σ Λ/(Λ+λ) of each module is read from the full-width factors of the store named by
`projection.budget.measured_on`: its `exact_factors` (written by `exact: {factors: true}`,
engine.exact.stored_factors) or, for a store indexed at projection.dim 0, its own factors. The split itself is
engine.projection.budget's; an index and a query both rebuild the same spec from the same store, so a query
against a budgeted store is checked like any other.
"""

from __future__ import annotations

from engine.config import JobConfig
from engine.curvature.factors import ModuleFactors
from engine.errors import TributaryError
from engine.gradients.context import ModelContext, with_projection
from engine.projection import ProjectionSpec, build_projection
from engine.projection.budget import allocate, effective_dimension
from engine.projection.fitted import full_width
from engine.store.location import redact
from engine.store.zarr_store import GradientStore, read_factor_group

EXACT_FACTORS = "exact_factors"  # engine.exact.stored_factors.FACTORS (a layer above: named here, not imported)


def _full_width_factors(path: str) -> tuple[ProjectionSpec, dict[str, ModuleFactors]]:
    store = GradientStore.open(path)
    full = full_width(store.manifest.projection)
    if store.manifest.stages.get(EXACT_FACTORS) and store.has_group(EXACT_FACTORS):
        root = store.group[EXACT_FACTORS]
        factors: dict[str, ModuleFactors] = {}
        for number, module in enumerate(full.modules):
            factors.update(read_factor_group(root[str(number)], [module]))  # pyright: ignore[reportArgumentType]
        return full, factors
    if store.manifest.projection.dim == 0 and store.manifest.complete:
        return full, store.read_factors()
    raise TributaryError(
        f"projection.budget.measured_on: store {redact(path)} has no full-width factors; index it with "
        "`exact: {factors: true}` (or projection.dim 0) first"
    )


def budgeted_projection(config: JobConfig, spec: ProjectionSpec) -> ProjectionSpec:
    """`spec`'s modules with the k per module that config.projection.budget allocates."""
    budget = config.projection.budget
    if budget is None:
        return spec
    shapes = [(m.name, m.d_in, m.d_out) for m in spec.modules]
    if budget.numbers_per_row < len(shapes):
        raise TributaryError(
            f"projection.budget.numbers_per_row is {budget.numbers_per_row}, fewer than one number for each of the "
            f"{len(shapes)} tracked modules; raise it to at least {len(shapes)}"
        )
    full, factors = _full_width_factors(budget.measured_on)
    if [(m.name, m.d_in, m.d_out) for m in full.modules] != shapes:
        raise TributaryError(
            f"projection.budget.measured_on: store {redact(budget.measured_on)} tracks other modules than this "
            "config; measure on a store of the same model and model.modules"
        )
    damping = config.method.damping
    effective = {name: effective_dimension(factors[name].lam, damping) for name, _, _ in shapes}
    widths = allocate(budget.numbers_per_row, shapes, effective)
    largest = max(max(pair) for pair in widths.values())  # dim is informational here: each module has its own k
    return build_projection(largest, spec.seed, spec.kind, shapes, widths=widths, budget=budget.numbers_per_row)


def budgeted_context(config: JobConfig, context: ModelContext) -> ModelContext:
    """`context` (built from the config alone) with the budgeted spec, where config.projection.budget is set."""
    if config.projection.budget is None or context.spec.budget is not None:
        return context
    return with_projection(context, budgeted_projection(config, context.spec))
