"""Full-width curvature factors in a store: one subgroup per module, so that a worker can read the modules it
needs alone (a module's factors of an 8B model are up to ~0.5 GB)."""

from __future__ import annotations

from engine.curvature.factors import ModuleFactors
from engine.errors import TributaryError
from engine.projection import ProjectionSpec
from engine.projection.fitted import full_width
from engine.store import GradientStore
from engine.store.location import redact
from engine.store.zarr_store import read_factor_group, write_factor_group

BASIS = "exact_basis"  # the eigenbases after the covariance pass (K-FAC's Λ = σ αᵀ)
FACTORS = "exact_factors"  # the final factors (EK-FAC's Λ from the full-width eigenvalue-correction pass)


def full_spec(store: GradientStore) -> ProjectionSpec:
    """The identity projection of the store's modules: the layout of full-width gradients and factors."""
    return full_width(store.manifest.projection)


def write_exact_factors(store: GradientStore, factors: dict[str, ModuleFactors], name: str = FACTORS) -> None:
    spec = full_spec(store)
    root = store.group.require_group(name)
    for number, module in enumerate(spec.modules):
        digests = write_factor_group(root.require_group(str(number)), {module.name: factors[module.name]}, [module])
        store.record_checksums(f"{name}/{number}", {f"{name}/{number}/{f}": v for f, v in digests.items()})
    root.attrs["modules"] = [module.name for module in spec.modules]


LAMBDA_GROUP = "exact_lambda_group"  # the store attribute naming the module group the Λ stage runs


def set_lambda_group(store: GradientStore, number: int) -> None:
    store.group.attrs[LAMBDA_GROUP] = number


def lambda_group(store: GradientStore) -> int:
    return int(store.group.attrs.get(LAMBDA_GROUP, 0))  # pyright: ignore[reportArgumentType]


def has_exact_factors(store: GradientStore) -> bool:
    return bool(store.manifest.stages.get(FACTORS)) and store.has_group(FACTORS)


def read_exact_factors(
    store: GradientStore, name: str = FACTORS, modules: set[str] | None = None
) -> dict[str, ModuleFactors]:
    """Every module's factors, or those of `modules` alone (an actor's group, engine.exact.partition)."""
    spec = full_spec(store)
    root = store.group[name]
    out = {}
    for number, module in enumerate(spec.modules):
        if modules is not None and module.name not in modules:
            continue
        out.update(read_factor_group(root[str(number)], [module]))  # pyright: ignore[reportArgumentType]
    return out


def require_exact_factors(store: GradientStore) -> dict[str, ModuleFactors]:
    require_stored_factors(store)
    return read_exact_factors(store)


def require_stored_factors(store: GradientStore) -> None:
    """Refused in one line where the store has no full-width factors, without reading them (the pass reads them
    once, when it runs: reading them here as well cost 0.45 s of a 21 s batch on issue 13's model)."""
    if not has_exact_factors(store):
        raise TributaryError(
            f"store {redact(store.path)} has no full-width factors, which --exact needs for method if; add "
            "`exact: {factors: true}` to the config and run `tributary index` again (the rows stay as they are)"
        )
