"""Per-example projected gradients taken from a training step's own backward: no extra forward or backward.

Hooks on the training model record, for each forward while armed, every tracked module's projected inputs ã
and (through a tensor hook on its output) the projected output gradients of the backward the training loop
runs anyway. The per-example gradient of a transformer's batch loss is exact from those: example i's
outputs reach only example i's loss, so G_i = Σ_t δ_it a_itᵀ restricted to example i's positions.

The training loss is not the summed per-example loss Tributary stores: HF's loss is the batch mean over
counted tokens (or the sum over `num_items_in_batch`, across gradient-accumulation micro-batches), divided by
the accumulation steps where the model takes no loss kwargs. Every one of these is L = c · Σ_i loss_i with
one positive constant c per forward, so each δ is c times the δ of the summed loss. c is read exactly from the
gradient of the logits, which the backward reaches first: at a counted position t with label y,
∂L/∂z_{t,y} = −c (1 − p_{t,y}), so c = Σ_t −g_{t,y} (1 − p_{t,y}) / Σ_t (1 − p_{t,y})² (least squares over the
counted positions, exact when the loss is a scaled cross-entropy; anything else — label smoothing, a custom
loss — leaves a residual and is refused). The δ̃ are divided by c: rows are those `tributary index` stores.

The true Fisher (`fisher_seed` given): when the training backward reaches the logits, the logits hook runs one
more backward of the summed loss on labels sampled exactly as `tributary index` samples them (same seed, row
index and positions), from the logits down to the tracked modules' outputs only, keeping the graph for the
training backward that then goes on. Parameter gradients are untouched (the nested backward's inputs are the
module outputs); a guard keeps the hooks from recording the nested backward as the training one. Its δ̃ give
the covariance sums and the sampled-label rows Λ is read from; the stored rows stay the training gradient's.

Under DeepSpeed ZeRO-3 (`reforward`) the sampled-label backward is not nested: a backward inside the training
backward sets off ZeRO-3's module backward hooks, which re-partition weights the training backward still needs.
The labels are drawn in the logits hook as above; `run_reforwards` (from `finish`, or from a pre-step hook on
the optimizer), after the training backward and before the update, runs each micro-batch's forward again (on
every rank: ZeRO-3's gathers are collective) with the weights of the step's forward, takes the sampled-label δ̃
by a data-only backward of that forward's graph and has ZeRO-3 release what it gathered. The extra forward is
the cost; the re-forward's losses must equal the training forward's (no dropout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.capture.capture import GradientCapture, example_gradient
from engine.capture.loss import NextTokenLoss, next_token_labels, sample_labels
from engine.data.labels import IGNORE
from engine.errors import TributaryError

ROW_KEY = "tributary_rows"  # the batch key that carries each example's row index; popped before the model sees it
SCALE_TOLERANCE = 1e-4  # relative residual of ∂L/∂z_label = −c (1 − p) above which the loss is not cross-entropy
REFORWARD_TOLERANCE = 1e-4  # relative loss difference above which a re-forward is not the training forward
DROPPED_KEYS = ("labels", "num_items_in_batch")  # the re-forward needs the logits only, not HF's loss


@dataclass
class MicroBatch:
    """One training forward: its rows, mask, labels and what the hooks recorded."""

    mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE where no loss
    rows: list[int] | None
    activations: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    deltas: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # of L, not yet divided by `scale`
    scale: float | None = None  # c of L = c Σ_i loss_i
    losses: torch.Tensor | None = None  # (B,) summed next-token loss per example
    position_ids: torch.Tensor | None = None  # (B, T), for the true Fisher's sampled labels
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # the modules' outputs (true Fisher)
    fisher_deltas: dict[str, list[torch.Tensor]] | None = None  # δ̃ of the summed sampled-label loss
    log_probs: torch.Tensor | None = None  # the training loss's own log-softmax of the logits, where it has one
    call: tuple[tuple, dict] | None = None  # the forward's arguments, for the re-forward (ZeRO-3's true Fisher)
    sampled: torch.Tensor | None = None  # (B, T) the sampled labels, drawn in the training backward (re-forward)


@dataclass
class CapturedBatch:
    """A finished micro-batch: per-example rows (B, D), losses, token counts, and δ̃ of the summed loss."""

    rows: list[int] | None
    grads: torch.Tensor
    losses: torch.Tensor
    num_tokens: torch.Tensor
    activations: dict[str, list[torch.Tensor]]
    deltas: dict[str, list[torch.Tensor]]  # of the covariance's loss: the sampled labels' with the true Fisher
    mask: torch.Tensor
    fisher_grads: torch.Tensor | None = None  # (B, D) sampled-label rows (true Fisher), for Λ


class TrainingHooks:
    """Hooks on a model being trained; `armed` says whether a forward belongs to a captured step.
    `fisher_seed`: take the covariance from a sampled-label backward with this seed (the true Fisher).
    `reforward`: take it from a forward of its own (`run_reforwards`) instead of a backward nested in the
    training one (ZeRO-3)."""

    def __init__(
        self, model: nn.Module, capture: GradientCapture, fisher_seed: int | None = None, reforward: bool = False
    ):
        self.model = model
        self.capture = capture
        self.fisher_seed = fisher_seed
        self.reforward = reforward and fisher_seed is not None
        self.sampling = False  # inside the sampled-label backward or re-forward: the training hooks record nothing
        self.reforward_outputs: dict[str, list[torch.Tensor]] | None = None  # the re-forward's module outputs
        # ZeRO-3: the data-only backward never reaches the modules before the first tracked one (the embedding),
        # so their gathered weights stay whole until released here (else an update inside DeepSpeed's step
        # leaves them stale for the next forward)
        self.release_gathered: Callable[[], None] | None = None
        self.armed = False
        self.pending: list[MicroBatch] = []
        self._handles: list = []

    def install(self) -> None:
        for name, module in self.capture.modules.items():
            weight = getattr(module, "weight", None)
            if weight is None or not weight.requires_grad:
                raise TributaryError(
                    f"tracked module {name} is frozen in this training run; capture tracks trained weights only: "
                    "set model.modules to the trained modules (LoRA adapters are chosen by default)"
                )
            self._handles.append(module.register_forward_hook(self._module_hook(name), prepend=True))
        # prepended: ahead of hooks installed before ours (DeepSpeed ZeRO-3's) that swap the outputs for copies
        # the loss, computed inside the forward from the originals, does not depend on
        self._handles.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True, prepend=True))
        self._handles.append(self.model.register_forward_hook(self._logits_hook, prepend=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- hooks --------------------------------------------------------------------------------------
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict):
        rows = kwargs.pop(ROW_KEY, None)  # always popped: an evaluation batch carries it too
        if self.sampling or not (self.armed and module.training and torch.is_grad_enabled()):
            return args, kwargs
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels")
        if input_ids is None or labels is None:
            raise TributaryError(
                "a captured training step calls the model without input_ids and labels keywords; pass the "
                "batch as model(**batch) with labels (engine.integrations.TrainingRows' collator gives them)"
            )
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        ids = None if rows is None else [int(r) for r in torch.as_tensor(rows).flatten().tolist()]
        if self.fisher_seed is not None and ids is None:
            raise TributaryError(
                "the true Fisher samples each row's labels from its row index, but this batch carries none; build "
                "batches with engine.integrations.TrainingRows.collate"
            )
        positions = kwargs.get("position_ids")
        if positions is None:  # as the index's batches count them: over real tokens only
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        batch = MicroBatch(mask=mask.detach(), labels=labels.detach(), rows=ids, position_ids=positions.detach())
        if self.reforward:
            batch.call = (args, {key: value for key, value in kwargs.items() if key not in DROPPED_KEYS})
        self.pending.append(batch)
        return args, kwargs

    def _current(self) -> MicroBatch | None:
        if self.sampling or not (self.armed and self.pending and self.model.training and torch.is_grad_enabled()):
            return None
        return self.pending[-1]

    def _module_hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.reforward_outputs is not None:
                self.reforward_outputs.setdefault(name, []).append(output)
                return
            batch = self._current()
            if batch is None:
                return
            batch.activations.setdefault(name, []).append(self.capture.project_activations(name, args[0], batch.mask))
            if self.fisher_seed is not None and not self.reforward:
                batch.outputs.setdefault(name, []).append(output)
            slot = batch.deltas.setdefault(name, [])
            position = len(slot)
            slot.append(torch.empty(0))

            def gradient(grad: torch.Tensor) -> None:
                if not self.sampling:
                    slot[position] = self.capture.project_output_gradient(name, grad.detach(), batch.mask)

            output.register_hook(gradient)

        return record

    def _logits_hook(self, module: nn.Module, args: tuple, output) -> None:
        batch = self._current()
        if batch is None:
            return
        logits = getattr(output, "logits", None)
        if logits is None or not logits.requires_grad:
            raise TributaryError("the trained model returned no logits that need a gradient; capture needs a causal LM")
        values = logits.detach()
        batch.log_probs = training_log_softmax(getattr(output, "loss", None), logits)

        def gradient(grad: torch.Tensor) -> None:
            if self.sampling:
                return
            batch.scale, batch.losses = loss_scale(values, grad.detach(), batch.labels, batch.log_probs)
            if self.reforward:  # drawn from the training forward's logits, as the nested backward draws them
                assert batch.rows is not None and batch.position_ids is not None and self.fisher_seed is not None
                batch.sampled = sample_labels(values, batch.labels, batch.position_ids, batch.rows, self.fisher_seed)
            elif self.fisher_seed is not None:
                self._sampled_backward(batch, logits, values)
            batch.log_probs = None  # held from the forward only until here

        logits.register_hook(gradient)

    def _sampled_backward(self, batch: MicroBatch, logits: torch.Tensor, values: torch.Tensor) -> None:
        """δ̃ of the summed loss on sampled labels, by a backward from `logits` to the modules' outputs only."""
        assert batch.rows is not None and batch.position_ids is not None and self.fisher_seed is not None
        labels = sample_labels(values, batch.labels, batch.position_ids, batch.rows, self.fisher_seed)
        root_gradient = NextTokenLoss(values, batch.log_probs).logit_gradient(labels)
        names = [(name, i) for name, outs in batch.outputs.items() for i in range(len(outs))]
        outputs = [batch.outputs[name][i] for name, i in names]
        self.sampling = True
        try:
            grads = torch.autograd.grad(
                logits, outputs, grad_outputs=root_gradient, retain_graph=True, allow_unused=True
            )
        finally:
            self.sampling = False
        batch.fisher_deltas = self._projected_deltas(names, outputs, grads, batch.mask)
        batch.outputs = {}  # the graph holds them while the training backward still needs them

    def _projected_deltas(
        self, names: list[tuple[str, int]], outputs: list[torch.Tensor], grads, mask: torch.Tensor
    ) -> dict[str, list[torch.Tensor]]:
        deltas: dict[str, list[torch.Tensor]] = {}
        for (name, _), output, grad in zip(names, outputs, grads, strict=True):
            grad = torch.zeros_like(output) if grad is None else grad
            deltas.setdefault(name, []).append(self.capture.project_output_gradient(name, grad, mask))
        return deltas

    def _reforwarded_backward(self, batch: MicroBatch) -> None:
        """δ̃ of the summed loss on `batch.sampled`, from a forward of its own and a backward from its logits to the
        modules' outputs only (no parameter gradient): the weights must still be those of the training forward."""
        if batch.call is None or batch.sampled is None or batch.losses is None:
            return  # no training backward reached this forward: `_finished` refuses it
        args, kwargs = batch.call
        self.sampling, self.reforward_outputs = True, {}
        try:
            with torch.enable_grad():  # DeepSpeed's optimizer step may call us under no_grad
                logits = self.model(*args, **kwargs).logits
            outputs_by_name, self.reforward_outputs = self.reforward_outputs, None
        finally:
            self.sampling, self.reforward_outputs = False, None
        token_loss = NextTokenLoss(logits)
        losses = token_loss.losses(batch.labels).float()
        difference = float((losses - batch.losses.to(losses.device)).abs().max())
        if difference > REFORWARD_TOLERANCE * max(float(batch.losses.abs().max()), 1.0):
            raise TributaryError(
                "the true Fisher's re-forward under ZeRO-3 gave other losses than the training forward (by "
                f"{difference:.2e}): the forward is not deterministic, e.g. dropout is on; set every dropout to 0 or "
                "use curvature.fisher empirical"
            )
        names = [(name, i) for name, outs in outputs_by_name.items() for i in range(len(outs))]
        outputs = [outputs_by_name[name][i] for name, i in names]
        grads = torch.autograd.grad(
            logits, outputs, grad_outputs=token_loss.logit_gradient(batch.sampled), allow_unused=True
        )
        batch.fisher_deltas = self._projected_deltas(names, outputs, grads, batch.mask)
        batch.call = batch.sampled = None

    # ---- after the backward -------------------------------------------------------------------------
    def finish(self) -> list[CapturedBatch]:
        """The micro-batches recorded since the last call, with rows of the summed per-example loss (see
        `run_reforwards`)."""
        self.run_reforwards()
        done, self.pending = self.pending, []
        return [self._finished(batch) for batch in done]

    def run_reforwards(self) -> None:
        """With `reforward`, the sampled-label δ̃ of every micro-batch recorded and not yet re-run, then
        `release_gathered`; call it after the training backward and before the optimizer step, on every rank at
        once (`finish` calls it, and so does a pre-step hook on the optimizer where the update comes first)."""
        waiting = [batch for batch in self.pending if batch.call is not None] if self.reforward else []
        for batch in waiting:
            self._reforwarded_backward(batch)
        if waiting and self.release_gathered is not None:
            self.release_gathered()

    def _finished(self, batch: MicroBatch) -> CapturedBatch:
        if batch.scale is None or batch.losses is None:
            raise TributaryError(
                "a captured training forward had no backward before the step ended; call loss.backward() inside "
                "the captured step"
            )
        deltas = {name: [d / batch.scale for d in calls] for name, calls in batch.deltas.items()}
        for name, calls in deltas.items():
            if any(d.numel() == 0 for d in calls):
                raise TributaryError(f"module {name} got no gradient in a captured step; is it part of the loss?")
        grads = self.capture.flatten(
            {name: example_gradient(deltas[name], batch.activations[name]) for name in self.capture.modules}
        )
        fisher_grads = None
        if self.fisher_seed is not None:
            if batch.fisher_deltas is None:
                raise TributaryError(
                    "a captured training forward had no sampled-label backward; is it part of the loss?"
                )
            deltas = batch.fisher_deltas
            fisher_grads = self.capture.flatten(
                {name: example_gradient(deltas[name], batch.activations[name]) for name in self.capture.modules}
            ).detach()
        return CapturedBatch(
            batch.rows,
            grads.detach(),
            batch.losses,
            batch.mask.sum(dim=1),
            batch.activations,
            deltas,
            batch.mask,
            fisher_grads,
        )


def training_log_softmax(loss: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    """The log-softmax of `logits` (B, T, V) that the training loss computed in the forward and autograd keeps for
    its backward, so that the capture does not compute it again: found where the loss is HF's cross-entropy of
    the logits themselves (log_softmax of a view of them, in their own dtype); None otherwise (a float64 model,
    whose loss HF computes on a float32 copy; a custom loss; a slice of the logits)."""
    node = getattr(loss, "grad_fn", None)
    for _ in range(4):  # the loss's own head: a division by the counted tokens, the nll, then the log-softmax
        if node is None or type(node).__name__ == "LogSoftmaxBackward0":
            break
        node = node.next_functions[0][0] if node.next_functions else None
    if node is None or type(node).__name__ != "LogSoftmaxBackward0":
        return None
    result = getattr(node, "_saved_result", None)  # autograd's own saved output: absent, the capture computes it
    if not isinstance(result, torch.Tensor):
        return None
    source = node.next_functions[0][0]
    while source is not None and source is not logits.grad_fn and type(source).__name__ in VIEW_NODES:
        source = source.next_functions[0][0]
    if source is not logits.grad_fn or result.dtype != logits.dtype or result.numel() != logits.numel():
        return None
    return result.view(logits.shape)


VIEW_NODES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


def loss_scale(
    logits: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, log_probs: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """(c, per-example summed losses) for a loss L = c Σ_i loss_i whose gradient with respect to `logits` is
    `grad`: c by least squares over the counted positions from ∂L/∂z_{t,y} = −c (1 − p_{t,y}). `log_probs`: the
    logits' log-softmax where the training loss computed it (`training_log_softmax`), used in their own dtype."""
    targets = next_token_labels(labels.to(logits.device))
    counted = targets != IGNORE
    safe = torch.where(counted, targets, torch.zeros_like(targets)).unsqueeze(-1)
    scored = logits.double() if logits.dtype == torch.float64 else logits.float()
    if log_probs is not None and log_probs.dtype == scored.dtype:
        log_p = torch.gather(log_probs, -1, safe).squeeze(-1).double()
    else:
        log_p = (torch.gather(scored, -1, safe) - torch.logsumexp(scored, dim=-1, keepdim=True)).squeeze(-1).double()
    one_minus_p = -torch.expm1(log_p)[counted]
    g = torch.gather(grad, -1, safe).squeeze(-1).double()[counted]
    losses = torch.where(counted, -log_p, torch.zeros_like(log_p)).sum(dim=1).float()
    denominator = float((one_minus_p * one_minus_p).sum())
    if denominator == 0.0:  # every counted token predicted with certainty: the gradient is zero whatever c is
        return 1.0, losses
    c = float((-g * one_minus_p).sum()) / denominator
    residual = float((g + c * one_minus_p).abs().max())
    if c <= 0 or residual > SCALE_TOLERANCE * float(g.abs().max()):
        raise TributaryError(
            "the training loss is not a scaled next-token cross-entropy of the batch's labels (its logits gradient "
            f"is not c·(softmax − one-hot), residual {residual:.2e}); capture needs the model's own causal-LM loss "
            "without label smoothing"
        )
    return c, losses
