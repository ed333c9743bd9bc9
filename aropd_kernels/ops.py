"""``torch.ops.aropd.anchored_residual_kl``: the computation as a torch.library custom op.

The forward runs a backend's fused passes and, when the student requires grad, also writes the
student gradient, already multiplied by each row's weight and the reduction's normalizer
(``row_scale``). Backward therefore only multiplies by the incoming gradient: with the usual
``loss.backward()`` (incoming gradient exactly 1 on a scalar loss) it hands the stored gradient over
untouched, so no second N×V buffer is made. The fake implementation lets ``torch.compile`` trace it.
"""

from __future__ import annotations

import torch

from . import backends

N_DIAGNOSTICS = 4


def _loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.library.custom_op("aropd::anchored_residual_kl", mutates_args=())
def anchored_residual_kl_op(
    student: torch.Tensor,
    partial: torch.Tensor,
    full: torch.Tensor,
    row_temperature: torch.Tensor,
    active: torch.Tensor,
    row_scale: torch.Tensor,
    lam: float,
    clip: float,
    beta: float,
    reduce: bool,
    compute_grad: bool,
    with_diagnostics: bool,
    inplace_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, diagnostics, grad) for ``[B, T, V]`` views (see :mod:`aropd_kernels.backends`).

    ``loss`` is ``sum(row_scale * D)`` when ``reduce`` else ``row_scale * D`` per row. ``diagnostics``
    is ``[4, N]`` float32, or empty when not asked for. ``grad`` is the scaled student gradient, or an
    empty tensor when it is not computed or was written into ``student`` (``inplace_grad``).
    """
    grad_out = None
    if compute_grad:
        grad_out = student if inplace_grad else torch.empty(student.shape, dtype=student.dtype, device=student.device)
    result = backends.compute_rows(
        backend, student, partial, full, row_temperature, active,
        row_scale if compute_grad else None, grad_out,
        lam=lam, clip=clip, beta=beta, with_diagnostics=with_diagnostics,
    )
    scaled = result.row_loss * row_scale.to(result.row_loss.dtype)
    loss = scaled.sum() if reduce else scaled
    diagnostics = result.diagnostics if with_diagnostics else student.new_empty(0, dtype=torch.float32)
    grad = grad_out if compute_grad and not inplace_grad else student.new_empty(0)
    return loss, diagnostics, grad


@anchored_residual_kl_op.register_fake
def _(student, partial, full, row_temperature, active, row_scale, lam, clip, beta, reduce,
      compute_grad, with_diagnostics, inplace_grad, backend):
    n_rows = row_temperature.shape[0]
    loss = student.new_empty(() if reduce else (n_rows,), dtype=_loss_dtype(student, partial, full))
    diagnostics = student.new_empty((N_DIAGNOSTICS, n_rows) if with_diagnostics else (0,), dtype=torch.float32)
    grad = student.new_empty(student.shape if compute_grad and not inplace_grad else (0,))
    return loss, diagnostics, grad


def _setup_context(ctx, inputs, output):
    student = inputs[0]
    reduce, compute_grad, inplace_grad = inputs[9], inputs[10], inputs[12]
    ctx.reduce = reduce
    ctx.set_materialize_grads(False)
    # With inplace_grad the gradient lives in the student's storage; the caller bumps its version.
    ctx.gradient_in_student = student if compute_grad and inplace_grad else None
    ctx.save_for_backward(output[2])
    ctx.mark_non_differentiable(output[1], output[2])


class DoubleBackwardError(ValueError):
    """Raised when a second derivative is requested: the op stores a first-order gradient only."""


def _backward(ctx, grad_loss, _grad_diagnostics, _grad_grad):
    if torch.is_grad_enabled():
        raise DoubleBackwardError(
            "anchored_residual_kl does not support double backward (create_graph=True): its gradient "
            "is precomputed in the forward pass. Call backward without create_graph."
        )
    if grad_loss is None:
        return (None,) * 14
    (stored,) = ctx.saved_tensors
    gradient = ctx.gradient_in_student if ctx.gradient_in_student is not None else stored
    if ctx.reduce:
        if not torch.compiler.is_compiling() and bool(grad_loss == 1):
            student_grad = gradient  # the common loss.backward(): hand over the stored gradient as is
        else:
            student_grad = gradient * grad_loss.to(gradient.dtype)
    else:
        row_grad = grad_loss.to(gradient.dtype).view(gradient.shape[:-1] + (1,))
        student_grad = gradient * row_grad
    return (student_grad,) + (None,) * 13


anchored_residual_kl_op.register_autograd(_backward, setup_context=_setup_context)
