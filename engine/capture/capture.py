"""Forward hooks that keep projected inputs, and output-gradients taken with autograd.grad.

For one example and tracked module, G = Σ_t δ_t a_tᵀ. We keep ã_t = P_inᵀ a_t from the forward pass,
take δ_t = ∂L/∂y_t for the module outputs y with `torch.autograd.grad` (weights stay frozen and no
`.grad` is ever materialised), project δ̃_t = P_outᵀ δ_t, and form G̃ = Σ_t δ̃_t ã_tᵀ per example —
never the d_out x d_in gradient. Padding positions are zeroed; prompt positions keep their
activations (they pass gradient through attention) and so contribute exactly what autograd gives.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.capture.experts import ExpertSlice
from engine.capture.linear_experts import ExpertRouting
from engine.capture.modules import module_has_bias_column
from engine.data.batching import Batch
from engine.errors import TributaryError
from engine.projection import ProjectionSpec


@dataclass
class ForwardPass:
    logits: torch.Tensor
    activations: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # (B, T, k_in) per call
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # module outputs y per call
    # per call: the flat (batch x position) index of each row of a routed expert's call, None for a call on all
    positions: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    # routed experts only: the counted tokens (mask) routed to each, 0 for an expert no token reached
    routed_tokens: dict[str, int] = field(default_factory=dict)


class GradientCapture:
    """Projected per-example gradients of tracked modules for batches of one model."""

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        spec: ProjectionSpec,
        include_bias: bool,
        compute_dtype: torch.dtype,
        device: torch.device,
        devices: dict[str, torch.device] | None = None,
    ):
        """`device` holds the batch, the logits and everything after the projections; `devices` says where
        each module computes (a device_map replica), its projection matrices living there too."""
        self.model = model
        self.modules = modules
        self.spec = spec
        self.compute_dtype = compute_dtype
        self.layout = {m.name: m for m in spec.modules}
        if list(self.layout) != list(modules):
            raise ValueError("projection spec and tracked modules disagree on names or order")
        self.bias_column = {name: module_has_bias_column(mod, include_bias) for name, mod in modules.items()}
        # nn.Linear experts (engine.capture.linear_experts) and fused experts' slices: called on routed tokens only
        self.routing = ExpertRouting(model, modules)
        self.routed = {n for n, m in modules.items() if isinstance(m, ExpertSlice) or n in self.routing.owners}
        self.device = device
        where = devices or {}
        # a fitted projection whose matrices are not read yet (an index before its fit) cannot capture until they
        # are: engine.gradients.context.with_stored_projection gives a new capture then
        self.unfitted = spec.fitted and spec.matrices is None
        sides = [] if self.unfitted else spec.modules
        self.p_in = {m.name: spec.side_matrix(m, "in", compute_dtype, where.get(m.name, device)) for m in sides}
        self.p_out = {m.name: spec.side_matrix(m, "out", compute_dtype, where.get(m.name, device)) for m in sides}
        self._mask: torch.Tensor | None = None
        self._kept: tuple[torch.Tensor, torch.Tensor, bool] | None = None  # `_keep`'s last mask and its answer
        self._current: ForwardPass | None = None
        self._checking = False  # check_routed_forward: hooks record without projecting

    def _current_mask(self) -> torch.Tensor:
        if self._mask is None:
            raise RuntimeError("a capture hook ran outside run(): there is no attention mask to apply")
        return self._mask

    def _project_input(self, name: str, inputs: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        batch_size = self._current_mask().shape[0]
        rows = 1 if positions is not None else batch_size  # a routed expert's rows, scattered back after projecting
        a = inputs.detach().reshape(rows, -1, inputs.shape[-1]).to(self.compute_dtype)
        projection = self.p_in[name]
        if projection is None:
            if self.bias_column[name]:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            fresh = self.bias_column[name]  # torch.cat made `a`; otherwise it may be the module's own input
            return self._zero_padding(self._scattered(a.to(self.device), positions), fresh=fresh)
        # [a, 1] @ P_in = a @ P_in[:-1] + P_in[-1]: the bias column is never materialised
        if self.bias_column[name]:
            projected = torch.addmm(projection[-1], a.reshape(-1, a.shape[-1]), projection[:-1])
            projected = projected.view(rows, -1, projection.shape[1])
        else:
            projected = a @ projection
        # padding is zeroed after the projection (row-wise, so a NaN at padding stays in its own row)
        return self._zero_padding(self._scattered(projected.to(self.device), positions), fresh=True)

    def _scattered(self, values: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """(B, T, k) from a routed expert's rows (1, n, k) at their flat positions, zeros at tokens not routed
        to it; `values` as they are for a call on every token."""
        if positions is None:
            return values
        mask = self._current_mask()
        full = values.new_zeros(mask.numel(), values.shape[-1])
        full.index_copy_(0, positions.to(values.device), values.reshape(-1, values.shape[-1]))
        return full.view(*mask.shape, values.shape[-1])

    def _zero_padding(
        self, values: torch.Tensor, mask: torch.Tensor | None = None, fresh: bool = False
    ) -> torch.Tensor:
        # where(), not a product: fully masked attention rows can leave NaN at padding positions.
        keep, padded = self._keep(self._current_mask() if mask is None else mask)
        if fresh and not padded:  # no padding: `values` (made here, aliasing nothing) as they are
            return values
        return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))

    def _keep(self, mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(mask as a (B, T, 1) bool, whether any position is padding), worked out once per batch mask: every
        tracked module's projections in a batch use the same mask (the cache holds it, so its identity is its own)."""
        if self._kept is None or self._kept[0] is not mask:
            keep = mask.unsqueeze(-1).bool()
            self._kept = (mask, keep, not bool(keep.all()))
        return self._kept[1], self._kept[2]

    def project_activations(self, name: str, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ã (B, T, k_in) of one call of module `name` on a batch whose counted positions `mask` (B, T) marks,
        outside `run()` (engine.capture.training: hooks on a training forward)."""
        previous, self._mask = self._mask, mask
        try:
            return self._project_input(name, inputs, None)
        finally:
            self._mask = previous

    def project_output_gradient(self, name: str, grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """δ̃ (B, T, k_out) of one call of module `name` from its output gradient, zero at padding."""
        delta = grad.reshape(mask.shape[0], -1, grad.shape[-1]).to(self.compute_dtype)
        projection = self.p_out[name]
        projected = delta if projection is None else delta @ projection
        # a product is a fresh tensor: without padding it is returned as it is (no copy through where)
        return self._zero_padding(projected.to(self.device), mask, fresh=projection is not None)

    def projected_activations(self, activations: dict[str, list[torch.Tensor]], mask: torch.Tensor):
        """ã of this capture's projection from a full-width capture's a of the same batch (bias column appended,
        zero at padding and at tokens a routed expert did not see): at every counted token the numbers this
        capture's hooks record (the same product on the same values), zero elsewhere."""
        return {
            name: [a if self.p_in[name] is None else self._projected_full(a, name, mask) for a in calls]
            for name, calls in activations.items()
        }

    def projected_deltas(self, deltas: dict[str, list[torch.Tensor]], mask: torch.Tensor):
        """δ̃ of this capture's projection from a full-width capture's δ of the same batch (zero where not counted)."""
        out = {}
        for name, calls in deltas.items():
            projection = self.p_out[name]
            out[name] = [
                d if projection is None else self._zero_padding(d @ projection.to(d.device), mask, fresh=True)
                for d in calls
            ]
        return out

    def _projected_full(self, a: torch.Tensor, name: str, mask: torch.Tensor) -> torch.Tensor:
        projection = self.p_in[name]
        assert projection is not None
        projection = projection.to(a.device)
        if not self.bias_column[name]:
            return self._zero_padding(a @ projection, mask, fresh=True)
        # as _project_input's addmm; the bias column is 0 where a token does not count (padding, not routed)
        plain = a[..., :-1].reshape(-1, a.shape[-1] - 1)
        projected = torch.addmm(projection[-1], plain, projection[:-1]).view(*a.shape[:-1], projection.shape[1])
        counted = a[..., -1:] != 0
        return torch.where(counted, projected, torch.zeros((), dtype=projected.dtype, device=projected.device))

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            state = self._current
            if state is None:
                return
            # set by a fused expert's slice (engine.capture.experts), or found for a Linear expert's rows
            positions = getattr(module, "positions", None) if isinstance(module, ExpertSlice) else None
            if name in self.routing.owners:
                positions = self.routing.positions(name)
            if positions is None:
                self._check_every_token(name, args[0])
            elif args[0].numel() // max(args[0].shape[-1], 1) != positions.numel():
                raise TributaryError(
                    f"module {name} was called on another number of rows than its expert was given: Tributary cannot "
                    "tell whose tokens they are; leave it out with model.modules"
                )
            # the routed-forward check records where each call's rows go, not their projections
            activations = args[0] if self._checking else self._project_input(name, args[0], positions)
            state.activations.setdefault(name, []).append(activations)
            # a router returns (logits, weights, choice): its linear map's output is the logits
            state.outputs.setdefault(name, []).append(output if isinstance(output, torch.Tensor) else output[0])
            state.positions.setdefault(name, []).append(positions)

        return record

    def _check_every_token(self, name: str, inputs: torch.Tensor) -> None:
        """A module called on a subset of the tokens outside a recognised experts block cannot be told which
        example each row belongs to: refused, never attributed to the wrong example."""
        tokens = self._current_mask().numel()
        rows = inputs.numel() // max(inputs.shape[-1], 1)
        if rows != tokens:
            raise TributaryError(
                f"module {name} was called on {rows} rows for {tokens} tokens: it sees a subset of the tokens outside "
                "an experts block Tributary recognises (a module whose `experts` is an nn.ModuleList or ModuleDict), "
                "so Tributary cannot assign its rows to examples; leave it out with model.modules"
            )

    @staticmethod
    def _requires_grad(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # Weights are frozen, so make the graph start at the embeddings: every module output downstream
        # then has a grad_fn and autograd.grad can reach it.
        return output.requires_grad_(True) if not output.requires_grad else output

    @contextmanager
    def hooks(self):
        if self.unfitted and not self._checking:
            raise RuntimeError(f"projection kind {self.spec.kind}: its fitted matrices are not loaded")
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        embeddings = getattr(self.model, "get_input_embeddings", None)
        if embeddings is not None:  # a plain torch model starts the graph at its (grad-requiring) inputs instead
            handles.append(embeddings().register_forward_hook(self._requires_grad))
        try:
            with self.routing.hooks():
                yield self
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, batch: Batch) -> ForwardPass:
        def call() -> torch.Tensor:
            logits = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            # losses in float32 (float64 for a float64 model) on the batch's device, whatever the weights' dtype
            # and wherever the last module ran
            dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
            return logits.to(device=batch.input_ids.device, dtype=dtype)

        return self.run(call, batch.attention_mask)

    def check_routed_forward(self, vocab_size: int) -> None:
        """One forward of a tiny batch with the hooks recording, for a model with routed experts: a module whose
        rows cannot be assigned to examples, or that never runs, is refused here, before anything is written,
        not during pass 1."""
        if not self.routed:
            return
        ids = (torch.arange(8, device=self.device) % max(vocab_size, 1)).view(2, 4)
        ones = torch.ones_like(ids)
        positions = torch.arange(4, device=self.device).expand(2, 4)
        self._checking = True
        try:
            with self.hooks():
                self.forward(Batch([0, 1], ids, ones, positions, ids))
        finally:
            self._checking = False

    def run(self, call, mask: torch.Tensor) -> ForwardPass:
        """Run `call()` (a forward pass returning the outputs) with the hooks recording; `mask` (B, T) marks
        the counted positions (ones for a plain model with one position per example)."""
        self._mask = mask
        self.routing.tokens = mask.numel()
        self._current = ForwardPass(logits=torch.empty(0))
        try:
            with torch.enable_grad():
                self._current.logits = call()
            self._unrouted_as_zeros(self._current, mask)
            self._count_routed_tokens(self._current, mask)
            return self._current
        finally:
            self._current = None

    def _unrouted_as_zeros(self, state: ForwardPass, mask: torch.Tensor) -> None:
        """An expert no token of the batch was routed to ran no call: its ã is zeros (and so, in
        `_projected_gradients`, its δ̃), so every module has a gradient, and that gradient is exactly zero."""
        for name, module in self.modules.items():
            if name not in state.activations:
                if name not in self.routed:
                    raise TributaryError(
                        f"module {name} ({type(module).__name__}) did not run in the forward pass: its weights are "
                        "used some other way (a LoRA on fused expert parameters, for one); leave it out with "
                        "model.modules"
                    )
                k_in = self.layout[name].k_in
                state.activations[name] = [torch.zeros(*mask.shape, k_in, dtype=self.compute_dtype, device=self.device)]

    def _count_routed_tokens(self, state: ForwardPass, mask: torch.Tensor) -> None:
        """Each routed expert's counted tokens: those of `mask` among the flat positions of its calls."""
        flat = mask.reshape(-1)
        for name in self.routed:
            calls = [p for p in state.positions.get(name, []) if p is not None]
            state.routed_tokens[name] = sum(int(flat[p.to(flat.device)].sum()) for p in calls)

    def output_gradients(
        self, state: ForwardPass, loss: torch.Tensor, retain_graph: bool
    ) -> dict[str, list[torch.Tensor]]:
        """Projected δ̃ (B, T, k_out) per module call for the summed per-example `loss`."""
        return self._projected_gradients(state, loss.sum(), None, retain_graph)

    def output_gradients_of_logits(
        self, state: ForwardPass, logit_gradient: torch.Tensor, retain_graph: bool
    ) -> dict[str, list[torch.Tensor]]:
        """As `output_gradients`, for a loss whose gradient with respect to `state.logits` is given
        (engine.capture.loss.NextTokenLoss): the backward starts at the logits."""
        return self._projected_gradients(state, state.logits, logit_gradient, retain_graph)

    def _projected_gradients(
        self, state: ForwardPass, root: torch.Tensor, root_gradient: torch.Tensor | None, retain_graph: bool
    ) -> dict[str, list[torch.Tensor]]:
        names = [(name, i) for name, outs in state.outputs.items() for i in range(len(outs))]
        flat_outputs = [state.outputs[name][i] for name, i in names]
        flat_positions = [state.positions[name][i] for name, i in names]
        grads = torch.autograd.grad(
            root, flat_outputs, grad_outputs=root_gradient, retain_graph=retain_graph, allow_unused=True
        )
        batch_size = state.logits.shape[0]
        deltas: dict[str, list[torch.Tensor]] = {}
        for (name, _), output, grad, positions in zip(names, flat_outputs, grads, flat_positions):
            if grad is None:
                grad = torch.zeros_like(output)
            rows = 1 if positions is not None else batch_size
            delta = grad.reshape(rows, -1, grad.shape[-1]).to(self.compute_dtype)
            projection = self.p_out[name]
            projected = delta if projection is None else delta @ projection
            deltas.setdefault(name, []).append(
                self._zero_padding(self._scattered(projected.to(self.device), positions), fresh=projection is not None)
            )
        for name in self.modules:
            if name not in deltas:  # an expert no token was routed to (`_unrouted_as_zeros`)
                shape = (*self._current_mask().shape, self.layout[name].k_out)
                deltas[name] = [torch.zeros(shape, dtype=self.compute_dtype, device=self.device)]
        return deltas

    def example_gradients(self, state: ForwardPass, deltas: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """G̃ = Σ_t δ̃_t ã_tᵀ per example and module: (B, k_out, k_in)."""
        return {name: example_gradient(deltas[name], state.activations[name]) for name in self.modules}

    def write_example_gradients(
        self, state: ForwardPass, deltas: dict[str, list[torch.Tensor]], out: torch.Tensor
    ) -> None:
        """flatten(example_gradients(...)) written into `out` (B, D) module by module: one module's G̃ is held at a
        time, not every module's and then their concatenation (two copies of a batch's rows: 0.27 GB at full width
        on issue 13's workload)."""
        offset = 0
        with torch.no_grad():
            for name in self.modules:
                gradient = example_gradient(deltas[name], state.activations[name]).flatten(start_dim=1)
                out[:, offset : offset + gradient.shape[1]] = gradient
                offset += gradient.shape[1]
        if offset != out.shape[1]:
            raise ValueError(f"the rows are {out.shape[1]} wide but the modules' gradients {offset}")

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate modules into stored rows (B, D) in layout order."""
        return torch.cat([grads[name].flatten(start_dim=1) for name in self.modules], dim=1)


def example_gradient(deltas: list[torch.Tensor], activations: list[torch.Tensor]) -> torch.Tensor:
    """G̃ = Σ_calls Σ_t δ̃_t ã_tᵀ per example of one module, from its calls' δ̃ (B, T, k_out) and ã (B, T, k_in)."""
    products = (torch.einsum("btk,btj->bkj", delta, act) for delta, act in zip(deltas, activations, strict=True))
    total = next(products)
    for product in products:
        total = total + product
    return total
