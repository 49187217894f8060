"""What a run attributes: the model's parameter-holding modules by kind, which of them are tracked, and why the
rest are not.

Printed before pass 1 of `tributary index`, kept in the manifest (`coverage`) and shown by `tributary info`.
Coverage is tracked parameters over the non-embedding parameters (over the adapter's parameters in adapter
mode); `model.min_coverage` refuses a run below it before anything is written. A module type Tributary cannot
track that holds parameters is listed by type, never left out in silence.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from engine.capture.experts import ExpertSlice, is_fused_experts, routed_loop
from engine.capture.modules import EXCLUDED_BY_DEFAULT, LORA_PATTERNS, TrackedKind, is_peft_model, is_router
from engine.errors import TributaryError

KINDS = ("attention", "mlp", "experts", "router", "embeddings", "norms", "adapter", "other")
DEFAULT_MIN_COVERAGE = 0.5
ROW_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

_ATTENTION = ("*attn*", "*attention*")
_MLP = ("*mlp*", "*ffn*", "*feed_forward*", "*.fc1", "*.fc2", "*dense_h_to_4h*", "*dense_4h_to_h*")


@dataclass
class KindCount:
    modules: int = 0
    tracked_modules: int = 0
    parameters: int = 0
    tracked_parameters: int = 0


@dataclass
class Coverage:
    kinds: dict[str, KindCount]
    parameters: int  # all of the model's parameters
    attributable: int  # the denominator: non-embedding parameters, or the adapter's in adapter mode
    tracked: int
    bytes_per_row: int
    skipped: list[str] = field(default_factory=list)  # "what: why", one per reason

    @property
    def share(self) -> float:
        return self.tracked / self.attributable if self.attributable else 0.0

    def to_dict(self) -> dict:
        return {
            "kinds": {name: vars(count) for name, count in self.kinds.items() if count.modules},
            "parameters": self.parameters,
            "attributable_parameters": self.attributable,
            "tracked_parameters": self.tracked,
            "coverage": round(self.share, 6),
            "bytes_per_row": self.bytes_per_row,
            "skipped": list(self.skipped),
        }


def coverage_lines(report: dict) -> list[str]:
    """The report printed before pass 1, from `Coverage.to_dict()` (as a worker describes it); none for {}."""
    if not report:
        return []
    kinds = ", ".join(
        f"{name} {count['tracked_modules']}/{count['modules']}" for name, count in report["kinds"].items()
    )
    lines = [
        f"tracking {report['tracked_parameters']:,} of {report['attributable_parameters']:,} attributable parameters "
        f"({report['coverage']:.1%}; {report['parameters']:,} in all), {report['bytes_per_row']:,} bytes per row",
        f"modules tracked by kind: {kinds}",
    ]
    lines += [f"not tracked: {reason}" for reason in report["skipped"]]
    return lines + ([unrouted_line(report["unrouted_experts"])] if report.get("unrouted_experts") else [])


def unrouted_line(experts: list[str]) -> str:
    """The experts no token of the curvature fit was routed to (named after pass 1, in the manifest's report)."""
    return (
        f"no token of the curvature fit was routed to {len(experts)} expert module(s), whose K-FAC/EK-FAC factors "
        f"are damping alone and whose gradients are zero on every row: {', '.join(experts)}"
    )


def module_kind(name: str, module: nn.Module, output_embeddings: nn.Module | None) -> str:
    """The kind a parameter-holding module is counted under, from its type and its qualified name."""
    if isinstance(module, nn.Embedding) or module is output_embeddings or _matches(name, EXCLUDED_BY_DEFAULT):
        return "embeddings"
    if _matches(name, LORA_PATTERNS):
        return "adapter"
    if "norm" in type(module).__name__.lower() or _matches(name, ("*norm*", "*ln_*")):
        return "norms"
    if is_router(module) or name.endswith("shared_expert_gate"):
        return "router"
    if isinstance(module, ExpertSlice) or is_fused_experts(module) or "expert" in name:
        return "experts"
    if _matches(name, _ATTENTION):
        return "attention"
    if _matches(name, _MLP):
        return "mlp"
    return "other"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _own_parameters(module: nn.Module, seen: set[int]) -> int:
    """The module's own parameters not counted yet (a tied output head shares the input embeddings')."""
    count = 0
    for parameter in module._parameters.values():
        if parameter is None or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        count += getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 keeps an empty local tensor
    return count


def tracked_parameters(module: nn.Module, include_bias: bool) -> int:
    kind = TrackedKind.for_module(module)
    if kind is None:
        return 0
    d_in, d_out = kind.dims(module)
    bias = getattr(module, "bias", None)
    return d_in * d_out + (d_out if include_bias and bias is not None else 0)


def model_coverage(
    model: nn.Module, modules: dict[str, nn.Module], include_bias: bool, row_width: int, row_dtype: str
) -> Coverage:
    """The coverage of tracking `modules` (engine.capture.modules.select_modules) of `model`."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output_embeddings = get_output_embeddings() if get_output_embeddings is not None else None
    peft = is_peft_model(model)
    kinds = {name: KindCount() for name in KINDS}
    unmatched: dict[str, int] = {}
    unknown: dict[str, int] = {}
    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        count = _own_parameters(module, seen)
        if not count:
            continue
        total += count
        kind = module_kind(name, module, output_embeddings)
        kinds[kind].parameters += count
        if is_fused_experts(module):  # counted as its per-expert slices (engine.capture.experts)
            loop = routed_loop(module)
            slices = loop.slices if loop is not None else []
            kinds[kind].modules += len(slices)
            chosen = sum(tracked_parameters(s, include_bias) for s in slices if any(s is m for m in modules.values()))
            if count > chosen and not peft:
                unmatched[kind] = unmatched.get(kind, 0) + count - chosen
            continue
        kinds[kind].modules += 1
        if name in modules or kind in ("embeddings", "norms"):
            continue
        if TrackedKind.for_module(module) is None:
            unknown[type(module).__name__] = unknown.get(type(module).__name__, 0) + count
        elif not (peft and kind != "adapter"):
            unmatched[kind] = unmatched.get(kind, 0) + count
    tracked = 0
    for name, module in modules.items():
        count = tracked_parameters(module, include_bias)
        tracked += count
        kind = module_kind(name, module, output_embeddings)
        kinds[kind].tracked_modules += 1
        kinds[kind].tracked_parameters += count
    attributable = kinds["adapter"].parameters if peft else total - kinds["embeddings"].parameters
    skipped = _skipped(kinds, unmatched, unknown, peft, total - attributable - kinds["embeddings"].parameters)
    return Coverage(kinds, total, attributable, tracked, row_width * ROW_BYTES[row_dtype], skipped)


def _skipped(kinds: dict[str, KindCount], unmatched: dict[str, int], unknown: dict[str, int], peft: bool, base: int):
    reasons = []
    if kinds["embeddings"].parameters:
        reasons.append(
            f"embeddings and output head, {kinds['embeddings'].parameters:,} parameters (a gradient row per "
            "vocabulary entry; not counted in coverage)"
        )
    if peft and base:
        reasons.append(f"frozen base weights, {base:,} parameters (adapter mode attributes the adapter only)")
    if kinds["norms"].parameters:
        reasons.append(f"norms, {kinds['norms'].parameters:,} parameters (elementwise scales, not a linear map)")
    for kind, count in unmatched.items():
        reasons.append(f"{kind} modules not chosen by model.modules, {count:,} parameters")
    for module_type, count in unknown.items():
        reasons.append(f"{module_type}, {count:,} parameters (a module type Tributary cannot track)")
    return reasons


def check_coverage(coverage: Coverage, min_coverage: float | None, chosen_by_hand: bool) -> None:
    """Refuse a run below model.min_coverage (default 0.5; 0 where model.modules names the modules by hand)."""
    if min_coverage is None:
        min_coverage = 0.0 if chosen_by_hand else DEFAULT_MIN_COVERAGE
    if coverage.share >= min_coverage:
        return
    skipped = "; ".join(coverage.skipped) or "nothing else is trackable"
    raise TributaryError(
        f"the run would track {coverage.share:.1%} of the model's attributable parameters, below model.min_coverage "
        f"{min_coverage:g}; not tracked: {skipped}. Choose more modules (model.modules) or lower model.min_coverage"
    )
