"""Routed experts as `nn.Linear` modules: which tokens each expert's call was given.

A mixture-of-experts block that keeps one module per expert (an MLP of `nn.Linear`s, or a Linear) holds them as
`experts`, an `nn.ModuleList` or `nn.ModuleDict`, and its forward gives each expert a copy of the rows of its
input routed there (`hidden_states[tokens]`). A capture hook on a Linear sees only those rows, not whose they are.
`ExpertRouting` recovers them: a pre-hook on the block keeps its input rows, and a pre-hook on each expert
matches the expert's rows to them bit for bit, giving each row's flat (batch x position) index, which the
expert's tracked Linears use as an `ExpertSlice` uses its own (engine.capture.experts): a token's gradient goes
to the experts it was routed to and nowhere else.

Identical input rows (the same prefix in two examples) are routed identically and dispatched in increasing
position order (a dispatch by `torch.where`/`nonzero`, as every transformers loop does), so the k-th copy of a
row an expert is given is the k-th such token. Rows that are not rows of the block's input (a block that
transforms its input before dispatching) are refused, never guessed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from engine.errors import TributaryError

_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def linear_expert_blocks(model: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """Each block with per-module experts: its name → {expert's qualified name: expert module}."""
    blocks = {}
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, (nn.ModuleList, nn.ModuleDict)) and len(experts) > 1:
            prefix = f"{name}.experts" if name else "experts"
            blocks[name] = {f"{prefix}.{key}": member for key, member in experts.named_children()}
    return blocks


def routed_linear_experts(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """The tracked modules inside an expert of a per-module experts block: tracked name → the expert's name."""
    owners = {}
    for experts in linear_expert_blocks(model).values():
        for expert_name in experts:
            for name in modules:
                if name == expert_name or name.startswith(expert_name + "."):
                    owners[name] = expert_name
    return owners


def _row_keys(rows: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rows' bit patterns as integers (n, d), a 64-bit hash of each row (n,)): equal rows, equal hashes."""
    bits = rows.contiguous().view(_BITS[rows.element_size()]).to(torch.int64)
    return bits, (bits * weights).sum(dim=-1)  # integer arithmetic: wraps, exact and order-independent


def match_rows(rows: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
    """The index into `source` (N, d) of each row of `rows` (n, d), the k-th copy of a repeated row taking its
    k-th occurrence; None where a row of `rows` is not a row of `source`."""
    if rows.shape[-1] != source.shape[-1] or rows.dtype != source.dtype:
        return None
    generator = torch.Generator().manual_seed(0)
    weights = torch.randint(1, 2**62, (rows.shape[-1],), generator=generator, dtype=torch.int64)
    source_bits, source_keys = _row_keys(source, weights.to(source.device))
    row_bits, row_keys = _row_keys(rows, weights.to(rows.device))
    source_keys, row_keys = source_keys.to(rows.device), row_keys.to(rows.device)
    order = torch.argsort(source_keys, stable=True)
    sorted_keys = source_keys[order]
    row_order = torch.argsort(row_keys, stable=True)
    keys = row_keys[row_order]
    first = torch.searchsorted(sorted_keys, keys)
    end = torch.searchsorted(sorted_keys, keys, right=True)
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[1:] = keys[1:] != keys[:-1]
    index = torch.arange(keys.numel(), device=keys.device)
    copy = index - torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values
    chosen = first + copy
    if bool((chosen >= end).any()):
        return None
    matched = torch.empty_like(row_order)
    matched[row_order] = order[chosen]
    if not torch.equal(source_bits[matched.to(source_bits.device)].to(row_bits.device), row_bits):
        return None  # a hash collision between different rows: refused rather than resolved
    return matched


class ExpertRouting:
    """While `hooks()` is open: the flat token positions of the rows each tracked Linear expert is called on."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]):
        self.model = model
        self.owners = routed_linear_experts(model, modules)  # tracked name → expert name
        self._tracked = {name: modules[name] for name in self.owners}
        self._inputs: dict[str, torch.Tensor] = {}  # block name → its input rows (N, d) during its call
        self._positions: dict[str, torch.Tensor] = {}  # expert name → its call's token positions
        self.tokens = 0  # counted rows of the current batch (B x T)

    def positions(self, name: str) -> torch.Tensor | None:
        """The positions of the rows tracked module `name` is being called on; None for a module not routed."""
        expert = self.owners.get(name)
        if expert is None:
            return None
        positions = self._positions.get(expert)
        if positions is None:
            raise TributaryError(
                f"module {name} ran outside a call of its expert {expert}: Tributary cannot tell whose tokens it "
                "was given; leave it out with model.modules"
            )
        return positions

    @contextmanager
    def hooks(self):
        handles = []
        blocks = linear_expert_blocks(self.model)
        wanted = set(self.owners.values())
        for block_name, experts in blocks.items():
            if not wanted.intersection(experts):
                continue
            block = self.model.get_submodule(block_name)
            handles.append(block.register_forward_pre_hook(self._keep_input(block_name), with_kwargs=True))
            handles.append(block.register_forward_hook(self._drop_input(block_name)))
            for expert_name, expert in experts.items():
                if expert_name in wanted:
                    handles.append(expert.register_forward_pre_hook(self._locate(block_name, expert_name)))
                    handles.append(expert.register_forward_hook(self._forget(expert_name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._inputs.clear()
            self._positions.clear()

    def _keep_input(self, block_name: str):
        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor):
                raise TributaryError(
                    f"mixture-of-experts block {block_name} ({type(module).__name__}) was not called with its hidden "
                    "states first: Tributary cannot tell which tokens its experts are given; leave its experts out "
                    "with model.modules"
                )
            rows = hidden.detach().reshape(-1, hidden.shape[-1])
            if rows.shape[0] != self.tokens:
                raise TributaryError(
                    f"mixture-of-experts block {block_name} was called on {rows.shape[0]} rows for {self.tokens} "
                    "tokens: Tributary cannot tell which example each of its experts' rows belongs to; leave its "
                    "experts out with model.modules"
                )
            self._inputs[block_name] = rows

        return keep

    def _drop_input(self, block_name: str):
        def drop(module: nn.Module, args: tuple, output) -> None:
            self._inputs.pop(block_name, None)

        return drop

    def _locate(self, block_name: str, expert_name: str):
        def locate(module: nn.Module, args: tuple) -> None:
            source = self._inputs.get(block_name)
            given = args[0] if args else None
            if source is None or not isinstance(given, torch.Tensor):
                raise TributaryError(
                    f"expert {expert_name} ran outside a call of its block {block_name} (or without rows): Tributary "
                    "cannot tell whose tokens it was given; leave it out with model.modules"
                )
            positions = match_rows(given.detach().reshape(-1, given.shape[-1]), source)
            if positions is None:
                raise TributaryError(
                    f"expert {expert_name} was given rows that are not rows of its block {block_name}'s input (the "
                    "block changes its hidden states before dispatching them), so Tributary cannot tell whose tokens "
                    "they are; leave the experts out with model.modules"
                )
            self._positions[expert_name] = positions

        return locate

    def _forget(self, expert_name: str):
        def forget(module: nn.Module, args: tuple, output) -> None:
            self._positions.pop(expert_name, None)

        return forget
