"""What runs with what, declared once as data: method × placement × store kind × feature.

Every route checks a request against this one table with `check_capability`: a config as parsed or derived
(engine.config.validation), the query run's flags (engine.query.plan), the service's start (engine.serving.plan)
and each HTTP request's method (engine.query.attributor.Attributor.method). A refusal is one line naming the
combination and what to change. `supported` reads the same table, for `capability_matrix` and the tests.

The exact streamed pass (`--exact`, `--rescore`, `serve.rescore`) is the `exact` feature column: the methods with
an exact streamed form, on any store (a training run's at its final checkpoint), on every placement (zero3's ranks in
lockstep);
`check_exact_factors` reads the same table for a config's `exact.factors`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal, get_args

from engine.config.method import method_names
from engine.config.placement import PlacementConfig
from engine.errors import TributaryError

StoreKind = Literal["checkpoint", "training_run", "averaged_run"]
Feature = Literal["per_token", "generate", "serve", "exact"]
STORE_KINDS: tuple[StoreKind, ...] = get_args(StoreKind)
FEATURES: tuple[Feature, ...] = get_args(Feature)
PLACEMENT_KINDS: tuple[str, ...] = get_args(PlacementConfig.model_fields["kind"].annotation)

STORE_NAMES: dict[StoreKind, str] = {
    "checkpoint": "a single-checkpoint store",
    "training_run": "a training-run store",
    "averaged_run": "a training-run store indexed with training_run.averaged: true",
}
FEATURE_NAMES: dict[Feature, str] = {
    "per_token": "--per-token",
    "generate": "--generate",
    "serve": "tributary serve",
    "exact": "--exact/--rescore",
}
_RUNS: frozenset[StoreKind] = frozenset({"training_run", "averaged_run"})
_ALL_STORES: frozenset[StoreKind] = frozenset(STORE_KINDS)


@dataclass(frozen=True)
class MethodCapability:
    stores: frozenset[StoreKind]  # the store kinds the method scores
    per_token: frozenset[StoreKind]  # where it splits a score over the query's tokens
    fix: str  # what to change when the store kind is not one of `stores`
    exact: bool = False  # has an exact streamed form (engine.exact): a full-width query side, one term


@dataclass(frozen=True)
class PlacementCapability:
    stores: frozenset[StoreKind]
    features: frozenset[Feature]
    fix: str  # what to change for a store kind or feature it lacks


# Per-token needs one query term at the final model: the single-term methods anywhere, a spectral F(Λ) (source's
# one segment) on a single-checkpoint store only. tracin and fast_source read a training run's checkpoints.
METHOD_CAPABILITIES: dict[str, MethodCapability] = {
    "grad_dot": MethodCapability(_ALL_STORES, _ALL_STORES, "", exact=True),
    "grad_cos": MethodCapability(_ALL_STORES, _ALL_STORES, "", exact=True),
    "if": MethodCapability(_ALL_STORES, _ALL_STORES, "", exact=True),
    "source": MethodCapability(_ALL_STORES, frozenset({"checkpoint"}), ""),
    "fast_source": MethodCapability(
        frozenset({"averaged_run"}), frozenset(), "index a training_run section with averaged: true"
    ),
    "tracin": MethodCapability(
        _RUNS, frozenset(), "index a training_run section (tracin sums over its checkpoints)", exact=True
    ),
    "trak": MethodCapability(_ALL_STORES, frozenset(), ""),
    "datainf": MethodCapability(_ALL_STORES, frozenset(), ""),
}

EXACT_METHODS: tuple[str, ...] = tuple(name for name, capability in METHOD_CAPABILITIES.items() if capability.exact)
# The exact pass reads one checkpoint's weights and its full-width factors: a training run's final checkpoint,
# which is where its single-term methods score; tracin runs a grad_dot pass at each checkpoint (engine.exact.
# checkpoints). source, which needs full-width factors per segment, has no exact form yet.
EXACT_STORES: frozenset[StoreKind] = _ALL_STORES

# zero3 partitions the model over a group of ranks: no one process holds it to generate, to take a gradient per
# token or to serve, and a training run's checkpoints are not indexed with it yet. Its ranks run the exact
# stages in lockstep (engine.exact.zero_worker): activations and output gradients are whole there.
PLACEMENT_CAPABILITIES: dict[str, PlacementCapability] = {
    "single": PlacementCapability(_ALL_STORES, frozenset(FEATURES), ""),
    "device_map": PlacementCapability(_ALL_STORES, frozenset(FEATURES), ""),
    "zero3": PlacementCapability(
        frozenset({"checkpoint"}), frozenset({"exact"}), "use placement.kind single or device_map"
    ),
}


def supported(method: str, placement: str, store: StoreKind, feature: Feature | None = None) -> bool:
    """Whether the table allows `method` with `placement` on `store` (and `feature`, when given)."""
    return _refusal(method, placement, store, () if feature is None else (feature,)) is None


def capability_matrix() -> dict[tuple[str, str, StoreKind, Feature | None], bool]:
    """Every (method, placement, store kind, feature or None for the plain query) → supported."""
    return {
        (method, placement, store, feature): supported(method, placement, store, feature)
        for method, placement, store, feature in itertools.product(
            method_names(), PLACEMENT_KINDS, STORE_KINDS, (None, *FEATURES)
        )
    }


def check_capability(
    method: str,
    placement: str,
    store: StoreKind | None,
    features: tuple[Feature, ...] = (),
    source: str | None = None,
) -> None:
    """A TributaryError (one line, naming the combination and the fix) unless the table allows it. `store`:
    None where the store kind is not known yet (one checkpoint's config inside a training run)."""
    refusal = _refusal(method, placement, store, features)
    if refusal is not None:
        raise TributaryError(refusal if source is None else f"invalid config {source}: {refusal}")


def _refusal(method: str, placement: str, store: StoreKind | None, features: tuple[Feature, ...]) -> str | None:
    capability = METHOD_CAPABILITIES.get(method)
    if capability is None:  # a declared method without a row here: a bug, caught by the tests
        raise ValueError(f"method {method!r} has no row in engine.config.capabilities.METHOD_CAPABILITIES")
    hosting = PLACEMENT_CAPABILITIES[placement]
    for feature in features:
        if feature not in hosting.features:
            return f"{FEATURE_NAMES[feature]} with placement.kind {placement} is not supported; {hosting.fix}"
    if store is not None and store not in hosting.stores:
        return f"placement.kind {placement} is not supported with {STORE_NAMES[store]} yet; {hosting.fix}"
    if store is not None and store not in capability.stores:
        return f"method {method} needs {_store_list(capability.stores)}, not {STORE_NAMES[store]}; {capability.fix}"
    if "per_token" in features and store is not None and store not in capability.per_token:
        allowed = [name for name, c in METHOD_CAPABILITIES.items() if store in c.per_token]
        return (
            f"--per-token is available for {', '.join(allowed)} on {STORE_NAMES[store]}, not for method {method}; "
            "drop --per-token"
        )
    if "exact" in features and not capability.exact:
        return (
            f"method {method} has no exact streamed form; --exact and --rescore take method.name "
            f"{', '.join(EXACT_METHODS)} (give --method if, or query the store without --exact)"
        )
    if "exact" in features and store is not None and store not in EXACT_STORES:
        return (
            f"--exact/--rescore (and serve.rescore) run on {_store_list(EXACT_STORES)}, not {STORE_NAMES[store]}; "
            "query without --exact/--rescore"
        )
    return None


def check_exact_factors(placement: str, store: StoreKind) -> None:
    """`exact.factors` (full-width factors fitted at index time, for any method; a training run's at its final
    checkpoint) where the exact pass runs: the table's exact column for the placement and the store kind."""
    if store not in EXACT_STORES:
        raise TributaryError(
            f"exact.factors is not fitted for {STORE_NAMES[store]}; remove the training_run section or exact.factors"
        )
    if store not in PLACEMENT_CAPABILITIES[placement].stores:
        raise TributaryError(
            f"placement.kind {placement} is not supported with {STORE_NAMES[store]} yet; "
            f"{PLACEMENT_CAPABILITIES[placement].fix}"
        )
    if "exact" not in PLACEMENT_CAPABILITIES[placement].features:
        raise TributaryError(
            f"exact.factors does not run with placement.kind {placement} yet; {PLACEMENT_CAPABILITIES[placement].fix}"
        )


def _store_list(stores: frozenset[StoreKind]) -> str:
    return " or ".join(STORE_NAMES[kind] for kind in STORE_KINDS if kind in stores)
