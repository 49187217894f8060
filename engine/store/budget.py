"""`projection.budget`: the projection spec whose k per module comes from another store's measured Λ.

The effective dimension Σ Λ/(Λ+λ) of each module is read from the full-width factors of the store named by
`projection.budget.measured_on`: its `exact_factors` (written by `exact: {factors: true}`,
engine.exact.stored_factors) or, for a store indexed at projection.dim 0, its own factors. The split itself is
engine.projection.budget's; an index and a query both rebuild the same spec from the same store, so a query
against a budgeted store is checked like any other.

Without `measured_on`, `tributary index` measures them itself first (engine.indexing.budget_fit): a fit pass over
the rows into the measurement store at store.path + ".budget" accumulates each module's full-width K-FAC
covariances, and the effective dimension of the K-FAC eigenvalues a_i·s_j (the proxy for EK-FAC's Λ) is kept
there per module. Index and query then read the same numbers, so they allocate the same k.
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

MEASURED = "effective_dimension"  # the measurement store's per-module arrays (one number each)
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


def measurement_path(config: JobConfig) -> str:
    """Where `tributary index` keeps the effective dimensions it measured (projection.budget without measured_on)."""
    return config.store.path.rstrip("/") + ".budget"


def measured_effective_dimensions(config: JobConfig, shapes: list[tuple[str, int, int]]) -> dict[str, float]:
    """module → Σ Λ/(Λ+λ): from measured_on's full-width factors, or the measurement store's fit pass."""
    budget = config.projection.budget
    assert budget is not None
    source = budget.measured_on or measurement_path(config)
    if budget.measured_on is None:
        if not GradientStore.exists(source) or not GradientStore.open(source).has_group(MEASURED):
            raise TributaryError(
                f"projection.budget: the effective dimensions are not measured yet ({redact(source)} is missing "
                "or incomplete); run `tributary index` with this config first, or set projection.budget.measured_on"
            )
        store = GradientStore.open(source)
        measured = {name: float(value.ravel()[0]) for name, value in store.read_module_arrays(MEASURED).items()}
        names = [(m.name, m.d_in, m.d_out) for m in full_width(store.manifest.projection).modules]
    else:
        full, factors = _full_width_factors(source)
        measured = {name: effective_dimension(factors[name].lam, config.method.damping) for name in factors}
        names = [(m.name, m.d_in, m.d_out) for m in full.modules]
    if names != shapes:
        raise TributaryError(
            f"projection.budget.measured_on: store {redact(source)} tracks other modules than this "
            "config; measure on a store of the same model and model.modules"
        )
    return measured


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
    effective = measured_effective_dimensions(config, shapes)
    widths = allocate(budget.numbers_per_row, shapes, effective)
    largest = max(max(pair) for pair in widths.values())  # dim is informational here: each module has its own k
    return build_projection(largest, spec.seed, spec.kind, shapes, widths=widths, budget=budget.numbers_per_row)


def budgeted_context(config: JobConfig, context: ModelContext) -> ModelContext:
    """`context` (built from the config alone) with the budgeted spec, where config.projection.budget is set."""
    if config.projection.budget is None or context.spec.budget is not None:
        return context
    return with_projection(context, budgeted_projection(config, context.spec))
