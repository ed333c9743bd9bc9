"""Public entry point: validate, view as rows, dispatch to a backend, reduce.

Validation, reshaping, weights and reductions live in :mod:`aropd_kernels.rows`; backends see only
the per-row contract of :mod:`aropd_kernels.backends`.
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch
from torch import nn

from . import backends, rows
from .ops import EagerAnchoredResidualKL, anchored_residual_kl_op


class Diagnostics(NamedTuple):
    """Per-token float32 tensors of shape ``[...]``, 0 at skipped tokens, outside autograd; None where
    they do not apply (the two teacher fields for one teacher, the two token fields without labels)."""

    belief_shift: torch.Tensor | None  # KL(q_F || q_P): how far the privileged trace moves the teacher
    clipped_mass: torch.Tensor | None  # full-teacher probability on tokens whose residual was clipped
    student_entropy: torch.Tensor  # -sum p log p
    target_entropy: torch.Tensor  # -sum q log q
    student_token_logprob: torch.Tensor | None  # log p(label)
    target_token_logprob: torch.Tensor | None  # log q(label)


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
    process_group=None,
):
    """Divergence between the student and the anchored residual target of AR-OPD.

    ``log q = log_softmax(la + lam * clamp(lf - la, -clip, clip))`` where ``la``, ``lf`` are the
    partial and full teachers' log-softmax at ``temperature``. ``beta`` picks the divergence:
    1 reverse KL(p || q) (default), 0 forward KL(q || p), in between TRL's generalized JSD.
    Gradients flow to ``student_logits`` only. Returns the loss, or ``(loss, Diagnostics)`` when
    ``return_diagnostics``. See docs/api.md for every argument.

    ``process_group``: each rank passes its contiguous vocabulary shard ``[..., V_r]`` of the three
    logits (DTensors placed ``Shard(-1)`` bring their mesh's group); every rank gets the whole
    vocabulary's results and its shard of the gradient (docs/distributed.md).
    """
    return _divergence(
        (student_logits, partial_teacher_logits, full_teacher_logits), rows.ANCHORED_NAMES, lam=lam, clip=clip,
        beta=beta, temperature=temperature, labels=labels, ignore_index=ignore_index, mask=mask, weights=weights,
        reduction=reduction, num_items_in_batch=num_items_in_batch, return_diagnostics=return_diagnostics,
        inplace_grad=inplace_grad, backend=backend, process_group=process_group)


def distillation_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
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
    process_group=None,
):
    """Divergence between the student and one teacher, ``q = softmax(teacher_logits / temperature)``:
    on-policy distillation, GKD, self-distillation.

    The same ``beta`` convention (1 reverse KL, 0 forward KL, between TRL's generalized JSD), keywords,
    reductions and rules as :func:`anchored_residual_kl`; the kernels read two inputs instead of three.
    Diagnostics carry the entropies and, with ``labels``, the labels' log-probabilities.
    ``process_group`` splits the vocabulary across ranks as in :func:`anchored_residual_kl`.
    """
    return _divergence(
        (student_logits, teacher_logits), rows.ONE_TEACHER_NAMES, lam=0.0, clip=math.inf, beta=beta,
        temperature=temperature, labels=labels, ignore_index=ignore_index, mask=mask, weights=weights,
        reduction=reduction, num_items_in_batch=num_items_in_batch, return_diagnostics=return_diagnostics,
        inplace_grad=inplace_grad, backend=backend, process_group=process_group)


class PreparedCall(NamedTuple):
    """A validated call: what the op takes, and what shaping its results needs."""

    student_logits: torch.Tensor  # as passed: inplace_grad bumps its version
    views: tuple  # student, teacher, full (None for one teacher): [B, T, V] row views
    plan: rows.RowPlan
    settings: tuple  # lam, clip, beta, reduce: the op's scalar arguments
    compute_grad: bool
    return_diagnostics: bool
    inplace_grad: bool
    backend: str  # resolved
    batch_shape: torch.Size
    with_labels: bool


def prepare_call(tensors, names, *, lam, clip, beta, temperature, labels, ignore_index, mask, weights, reduction,
                 num_items_in_batch, return_diagnostics, inplace_grad, backend,
                 whole_vocabulary: bool = True) -> PreparedCall:
    """Validates every argument (before any kernel runs) and plans the rows.

    ``whole_vocabulary=False``: the logits are a vocabulary shard, whose labels are not checked here
    against its own V but by the caller, once the whole vocabulary is known.
    """
    student_logits = tensors[0]
    rows.check_logits(tensors, names)
    rows.check_settings(lam, clip, beta, reduction, backend, num_items_in_batch)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    rows.check_inplace(student_logits, inplace_grad, compute_grad)
    batch_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    label_vocab = vocab if return_diagnostics and whole_vocabulary else None
    plan = rows.plan_rows(batch_shape, student_logits.device, temperature=temperature, labels=labels,
                          ignore_index=ignore_index, mask=mask, weights=weights, reduction=reduction,
                          num_items_in_batch=num_items_in_batch, label_vocab=label_vocab)
    name = backends.resolve(backend, student_logits.device, tuple(t.dtype for t in tensors))
    views = rows.as_rows(*tensors)
    views = tuple(views) if len(views) == 3 else (*views, None)
    settings = (float(lam), float(clip), float(beta), reduction != "none")
    return PreparedCall(student_logits, views, plan, settings, compute_grad, return_diagnostics, inplace_grad, name,
                        batch_shape, labels is not None)


def run_call(call: PreparedCall, compute_rows=None):
    """The loss and the diagnostics (a Diagnostics, or None) of a prepared call, shaped for the caller.

    ``compute_rows`` (the signature of :func:`aropd_kernels.backends.compute_rows`) replaces the
    single-process rows, as a vocabulary shard does; that path, like ``inplace_grad``, runs eagerly.
    """
    student, teacher, full = call.views
    arguments = (student, teacher, full, *call.plan, *call.settings, call.compute_grad, call.return_diagnostics,
                 call.backend)
    inplace = call.inplace_grad and call.compute_grad
    if compute_rows is None and not inplace:
        loss, diagnostics, _ = anchored_residual_kl_op(*arguments)
    else:
        loss, diagnostics = EagerAnchoredResidualKL.apply(*arguments, inplace, compute_rows or backends.compute_rows)
        if inplace:
            torch.autograd.graph.increment_version(call.student_logits)  # its storage now holds the gradient
    *_, reduce = call.settings
    return shaped_result(loss, diagnostics, call.batch_shape, reduce=reduce,
                         return_diagnostics=call.return_diagnostics, one_teacher=full is None,
                         with_labels=call.with_labels)


def shaped_result(loss: torch.Tensor, diagnostics: torch.Tensor, batch_shape: torch.Size, *, reduce: bool,
                  return_diagnostics: bool, one_teacher: bool, with_labels: bool):
    """(loss, Diagnostics or None) from an op's flat outputs: the loss per token ``[...]`` when not
    reduced, and the diagnostics as per-token tensors when asked for."""
    if not reduce:  # reduction="none"
        loss = loss.view(batch_shape)
    if not return_diagnostics:
        return loss, None
    return loss, _diagnostics(diagnostics, batch_shape, one_teacher=one_teacher, with_labels=with_labels)


def _divergence(tensors, names, *, process_group, **keywords):
    """Both entry points: validate, plan the rows, run the op, shape the results; a vocabulary split
    across ranks (a process group, or DTensor inputs) goes to :mod:`aropd_kernels.distributed`."""
    if process_group is not None or any(is_dtensor(t) for t in tensors):
        from . import distributed  # the only module that calls torch.distributed

        loss, diagnostics = distributed.sharded_divergence(tensors, names, process_group, **keywords)
    else:
        call = prepare_call(tensors, names, **keywords)
        loss, diagnostics = run_call(call)
    return loss if diagnostics is None else (loss, diagnostics)


def is_dtensor(tensor) -> bool:
    """A torch.distributed.tensor.DTensor (none exists unless that module was imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _diagnostics(diagnostics: torch.Tensor, batch_shape, *, one_teacher: bool, with_labels: bool) -> Diagnostics:
    fields = [d.view(batch_shape) for d in diagnostics.unbind(0)]
    if one_teacher:
        fields[0] = fields[1] = None
    if not with_labels:
        fields[4] = fields[5] = None
    return Diagnostics(*fields)


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


class DistillationDivergence(AnchoredResidualKL):
    """Module form of :func:`distillation_divergence`; the constructor takes its keyword arguments."""

    def forward(self, student_logits, teacher_logits, **overrides):
        return distillation_divergence(student_logits, teacher_logits, **{**self.kwargs, **overrides})
