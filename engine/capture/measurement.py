"""What is attributed on the query side: a function of the completion tokens' log-probabilities.

Each measurement is written as a loss (lower = the model likes the completion more), so that a
positive score always means the training example *supports* the query: removing it would raise
this loss. Training rows always use the summed loss (`per_example_loss`).

  logprob_sum   −Σ_t log p(y_t | y_<t, prompt)            (the default; the training loss itself)
  logprob_mean  −(1/T) Σ_t log p(y_t | …)                  (per-token average over the T completion tokens)
  margin        −Σ_t [z_{y_t} − logsumexp_{v≠y_t} z_v]      (negative logit margin of each completion token)
"""

from __future__ import annotations

import torch

from engine.capture.loss import per_example_loss
from engine.config.query_options import MEASUREMENTS
from engine.data.labels import IGNORE
from engine.errors import shown


def _margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted_logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    shifted_labels = labels[:, 1:]
    counted = shifted_labels != IGNORE
    safe_labels = torch.where(counted, shifted_labels, torch.zeros_like(shifted_labels))
    correct = torch.gather(shifted_logits, -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    others = shifted_logits.scatter(-1, safe_labels.unsqueeze(-1), float("-inf"))
    margin = correct - torch.logsumexp(others, dim=-1)
    return -(margin * counted).sum(dim=1)


def measurement_loss(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) per-example measurement, as a loss."""
    if name == "logprob_sum":
        return per_example_loss(logits, labels)
    if name == "logprob_mean":
        counts = (labels[:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
        return per_example_loss(logits, labels) / counts
    if name == "margin":
        return _margin_loss(logits, labels)
    # QueryOptions refuses an unknown name first, for every route; reaching here is a caller's bug
    raise ValueError(f"unknown measurement {shown(name)}; use one of {', '.join(MEASUREMENTS)}")
