"""`exact.factor_memory_gb`: the modules cut into groups whose full-width factors one actor can hold, for the Λ
pass (as kronfluence partitions modules). Contiguous in layout order and greedy, so the groups depend on the
budget and the model alone, never on the workers: every worker derives the same groups, and any number of
workers gives the same sums."""

from __future__ import annotations

from dataclasses import replace

from engine.errors import TributaryError
from engine.projection import ProjectionSpec

GIB = 2**30


def full_width_factor_bytes(k_in: int, k_out: int) -> int:
    """A module's float64 EK-FAC factors at full width: Q_A (k_in²), Q_S (k_out²) and Λ (k_out k_in)."""
    return 8 * (k_in * k_in + k_out * k_out + k_in * k_out)


def module_groups(spec: ProjectionSpec, memory_gb: float | None) -> list[ProjectionSpec]:
    """`spec` cut into the fewest contiguous groups of modules whose factors fit `memory_gb` (None: one group)."""
    if memory_gb is None:
        return [spec]
    budget = memory_gb * GIB
    groups: list[list] = [[]]
    used = 0
    for module in spec.modules:
        size = full_width_factor_bytes(module.k_in, module.k_out)
        if size > budget:
            raise TributaryError(
                f"exact.factor_memory_gb {memory_gb} is below the full-width factors of module {module.name} "
                f"({size / GIB:.3g} GB); set exact.factor_memory_gb to at least {size / GIB:.3g}, or null, and run "
                "tributary index again (the rows stay as they are)"
            )
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(module)
        used += size
    return [replace(spec, modules=tuple(group)) for group in groups]


def lambda_stage(number: int, groups: int) -> tuple[str, str]:
    """(the manifest's stage key, the partials array) of group `number`: one group keeps the names of before."""
    if groups == 1:
        return "exact_lambdas", "exact_lambda"
    return f"exact_lambdas_{number}", f"exact_lambda_{number}"
