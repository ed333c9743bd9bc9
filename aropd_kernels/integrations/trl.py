"""TRL's ``GKDTrainer.generalized_jsd_loss`` signature on the one-teacher kernels.

``generalized_jsd_loss`` takes the arguments of trl 1.16's static method and returns its numbers,
computed by :func:`aropd_kernels.distillation_divergence`, which never materializes the per-vocabulary
terms. This module does not import trl. docs/integration.md shows the drop-in ``GKDTrainer`` subclass.
"""

from __future__ import annotations

import torch

from .. import rows
from ..functional import distillation_divergence

TRL_IGNORE_INDEX = -100  # the label TRL's function skips; it has no ignore_index argument
TRL_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    inplace_grad: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """TRL's generalized JSD loss between student and teacher logits ``[..., V]``, value and gradient.

    ``beta``: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), in between the
    generalized JSD (TRL's default 0.5). Both logits are divided by ``temperature``. Tokens whose
    ``labels`` equal -100 are skipped. The reduction follows TRL:

    - ``num_items_in_batch`` given: the sum over counted tokens divided by it, whatever ``reduction``.
    - ``"batchmean"``: the sum over the number of counted tokens (at least 1) with ``labels``; without
      them, over the size of the first dimension (the batch size B of ``[B, T, V]`` logits).
    - ``"sum"``: the sum.
    - ``"mean"``: the sum over the number of per-vocabulary terms, counted tokens times V. Where TRL
      returns NaN (no counted token: the mean of nothing) this returns 0, as its ``"batchmean"`` does.
    - ``"none"``: TRL returns the per-vocabulary terms ``[..., V]`` (``[n_counted, V]`` with labels),
      which this package never materializes. This returns their sums over V, the per-token
      divergences: ``[...]``, or ``[n_counted]`` (the counted tokens in order) with ``labels``.
      Their sum equals the sum of TRL's result.

    The loss is float32 whatever the logits' dtype (TRL's has the logits' dtype and, for bfloat16
    logits, bfloat16 softmaxes); the gradient has the student logits' dtype. Keyword-only extras:
    ``inplace_grad`` and ``backend``, as in :func:`aropd_kernels.distillation_divergence`.
    """
    if reduction not in TRL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {TRL_REDUCTIONS} (TRL's names), got {reduction!r}.")
    rows.check_logits((student_logits, teacher_logits), rows.ONE_TEACHER_NAMES)  # before their shapes are read
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of token ids (-100 to skip), got {type(labels).__name__}.")
    divergence = dict(beta=beta, temperature=temperature, labels=labels, ignore_index=TRL_IGNORE_INDEX,
                      inplace_grad=inplace_grad, backend=backend)
    if num_items_in_batch is None:
        if reduction == "sum":
            return distillation_divergence(student_logits, teacher_logits, reduction="sum", **divergence)
        if reduction == "none":
            per_token = distillation_divergence(student_logits, teacher_logits, reduction="none", **divergence)
            return per_token if labels is None else per_token[labels != TRL_IGNORE_INDEX]
        num_items_in_batch = _trl_denominator(reduction, student_logits, labels)
    return distillation_divergence(student_logits, teacher_logits, reduction="batchmean",
                                   num_items_in_batch=num_items_in_batch, **divergence)


def _trl_denominator(reduction: str, student_logits: torch.Tensor, labels: torch.Tensor | None):
    """What TRL's "batchmean" or "mean" divides the sum by, handed over as ``num_items_in_batch`` so that
    it is folded into the gradient pass; None where it is the package's own batchmean count (the
    counted tokens, at least 1)."""
    if reduction == "batchmean":
        return None if labels is not None else max(student_logits.shape[0], 1)
    vocab = student_logits.shape[-1]  # "mean": over every per-vocabulary term
    if labels is None:
        return max(student_logits.numel(), 1)
    return (labels != TRL_IGNORE_INDEX).sum().clamp(min=1).to(student_logits.device) * vocab
