"""Public entry point: validate, view as rows, dispatch to a backend, reduce.

Validation, reshaping, weights and reductions live in :mod:`aropd_kernels.rows`; backends see only
the per-row contract of :mod:`aropd_kernels.backends`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import backends, rows
from .ops import InplaceAnchoredResidualKL, anchored_residual_kl_op


class Diagnostics(NamedTuple):
    """Per-token float32 tensors of shape ``[...]``, 0 at skipped tokens, outside autograd."""

    belief_shift: torch.Tensor  # KL(q_F || q_P): how far the privileged trace moves the teacher
    clipped_mass: torch.Tensor  # full-teacher probability on tokens whose residual was clipped
    student_entropy: torch.Tensor  # -sum p log p
    target_entropy: torch.Tensor  # -sum q log q


def anchored_residual_kl(
    student_logits: torch.Tensor,
    partial_teacher_logits: torch.Tensor,
    full_teacher_logits: torch.Tensor,
    *,
    lam: float = 1.0,
    clip: float = 5.0,
    beta: float = 1.0,
    temperature: float | torch.Tensor = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    return_diagnostics: bool = False,
    inplace_grad: bool = False,
    backend: str = "auto",
):
    """Divergence between the student and the anchored residual target of AR-OPD (SPEC §1, §3).

    ``log q = log_softmax(la + lam * clamp(lf - la, -clip, clip))`` where ``la``, ``lf`` are the
    partial and full teachers' log-softmax at ``temperature``. ``beta`` picks the divergence:
    1 reverse KL(p || q) (default), 0 forward KL(q || p), in between TRL's generalized JSD.
    Gradients flow to ``student_logits`` only. Returns the loss, or ``(loss, Diagnostics)`` when
    ``return_diagnostics``. See docs/api.md for every argument.
    """
    tensors = (student_logits, partial_teacher_logits, full_teacher_logits)
    rows.check_logits(*tensors)
    rows.check_settings(lam, clip, beta, reduction, backend, num_items_in_batch)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    rows.check_inplace(student_logits, inplace_grad, compute_grad)
    batch_shape = student_logits.shape[:-1]
    plan = rows.plan_rows(batch_shape, student_logits.device, temperature=temperature, labels=labels,
                          ignore_index=ignore_index, mask=mask, weights=weights, reduction=reduction,
                          num_items_in_batch=num_items_in_batch)
    name = backends.resolve(backend, student_logits.device, tuple(t.dtype for t in tensors))

    rows_views = rows.as_rows(*tensors)
    settings = (float(lam), float(clip), float(beta), reduction != "none")
    if inplace_grad and compute_grad:
        loss, diagnostics = InplaceAnchoredResidualKL.apply(*rows_views, *plan, *settings, return_diagnostics, name)
        torch.autograd.graph.increment_version(student_logits)  # its storage now holds the gradient
    else:
        loss, diagnostics, _ = anchored_residual_kl_op(*rows_views, *plan, *settings, compute_grad,
                                                       return_diagnostics, name)
    return shaped_result(loss, diagnostics, batch_shape, reduction, return_diagnostics)


def shaped_result(loss: torch.Tensor, diagnostics: torch.Tensor, batch_shape: torch.Size, reduction: str,
                  return_diagnostics: bool):
    """The public result from an op's flat outputs: the loss (per token ``[...]`` for reduction='none'),
    and ``Diagnostics`` of per-token tensors when asked for."""
    if reduction == "none":
        loss = loss.view(batch_shape)
    if not return_diagnostics:
        return loss
    return loss, Diagnostics(*(d.view(batch_shape) for d in diagnostics.unbind(0)))


class AnchoredResidualKL(nn.Module):
    """Module form of :func:`anchored_residual_kl`; the constructor takes its keyword arguments."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, student_logits, partial_teacher_logits, full_teacher_logits, **overrides):
        return anchored_residual_kl(
            student_logits, partial_teacher_logits, full_teacher_logits, **{**self.kwargs, **overrides}
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
