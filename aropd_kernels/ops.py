"""The computation under autograd: a torch.library custom op, and its in-place twin.

The forward runs a backend's fused passes and, when the student requires grad, also writes the
student gradient, already multiplied by each row's weight and the reduction's normalizer
(``row_scale``). Backward therefore only multiplies by the incoming gradient: with the usual
``loss.backward()`` (incoming gradient exactly 1 on a scalar loss) it hands the stored gradient over
untouched, so no second N×V buffer is made. Any other incoming gradient is applied in float32 and
rounded once to the student's dtype.

``torch.ops.aropd.anchored_residual_kl`` (no mutation; a fake implementation lets ``torch.compile``
trace it) returns a new gradient buffer. :class:`EagerAnchoredResidualKL` (eager only) is the same
computation for what the op cannot declare: writing the gradient into the student's own storage
(``inplace_grad``), and rows whose vocabulary is split across ranks (its rows function communicates).
"""

from __future__ import annotations

import torch

from . import backends


class DoubleBackwardError(ValueError):
    """Raised when a second derivative is requested: the op stores a first-order gradient only."""


def _loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gradient_dtype(student_dtype: torch.dtype) -> torch.dtype:
    """dtype in which the forward pass stores the student gradient.

    The student's own dtype, except float16: a float16 gradient rounded in the forward pass, before a
    ``GradScaler`` multiplies it by the loss scale in backward, would flush its small entries (below
    6e-8) to zero. It is kept in float32 and rounded to float16 once, in backward, after the scale.
    """
    return torch.float32 if student_dtype == torch.float16 else student_dtype


def _run(student, partial, full, row_temperature, active, row_scale, labels, lam, clip, beta, reduce,
         with_diagnostics, backend, grad_out, compute_rows=backends.compute_rows):
    """(loss, diagnostics) of the backend's passes; the scaled gradient goes to ``grad_out`` when given.

    ``compute_rows`` has the signature of :func:`aropd_kernels.backends.compute_rows` (the backend's
    name first): that function for a single process, a vocabulary-parallel one for a shard.
    """
    result = compute_rows(
        backend, student, partial, full, row_temperature, active,
        row_scale if grad_out is not None else None, grad_out,
        lam=lam, clip=clip, beta=beta, with_diagnostics=with_diagnostics, labels=labels,
    )
    diagnostics = result.diagnostics if with_diagnostics else student.new_empty(0, dtype=torch.float32)
    return scaled_loss(result.row_loss, row_scale, reduce), diagnostics


def scaled_loss(row_loss: torch.Tensor, row_scale: torch.Tensor, reduce: bool) -> torch.Tensor:
    """``sum(row_scale * D)``, or ``row_scale * D`` per row when not ``reduce``."""
    scaled = row_loss * row_scale.to(row_loss.dtype)
    return scaled.sum() if reduce else scaled


@torch.library.custom_op("aropd::anchored_residual_kl", mutates_args=())
def anchored_residual_kl_op(
    student: torch.Tensor,
    partial: torch.Tensor,
    full: torch.Tensor | None,
    row_temperature: torch.Tensor,
    active: torch.Tensor,
    row_scale: torch.Tensor,
    labels: torch.Tensor | None,
    lam: float,
    clip: float,
    beta: float,
    reduce: bool,
    compute_grad: bool,
    with_diagnostics: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, diagnostics, grad) for ``[B, T, V]`` views (see :mod:`aropd_kernels.backends`;
    ``full`` is None for one teacher, ``labels`` per row or None).

    ``loss`` is ``sum(row_scale * D)`` when ``reduce`` else ``row_scale * D`` per row. ``diagnostics``
    is ``[N_DIAGNOSTICS, N]`` float32, or empty when not asked for. ``grad`` is the scaled student
    gradient in :func:`gradient_dtype`, or an empty tensor when it is not computed.
    """
    grad = (torch.empty(student.shape, dtype=gradient_dtype(student.dtype), device=student.device)
            if compute_grad else student.new_empty(0))
    loss, diagnostics = _run(student, partial, full, row_temperature, active, row_scale, labels, lam, clip, beta,
                             reduce, with_diagnostics, backend, grad if compute_grad else None)
    return loss, diagnostics, grad


@anchored_residual_kl_op.register_fake
def _(student, partial, full, row_temperature, active, row_scale, labels, lam, clip, beta, reduce, compute_grad,
      with_diagnostics, backend):
    n_rows = row_temperature.shape[0]
    inputs = (student, partial) if full is None else (student, partial, full)
    loss = student.new_empty(() if reduce else (n_rows,), dtype=_loss_dtype(*inputs))
    diagnostics = student.new_empty((backends.N_DIAGNOSTICS, n_rows) if with_diagnostics else (0,),
                                    dtype=torch.float32)
    grad = student.new_empty(student.shape if compute_grad else (0,),
                             dtype=gradient_dtype(student.dtype) if compute_grad else student.dtype)
    return loss, diagnostics, grad


def scale_gradient(gradient: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``gradient * factor`` (broadcast) computed in float32 and rounded once to ``dtype``.

    Rounding ``factor`` to a half-precision gradient's dtype first would bias every entry (1/3 in
    bfloat16 is 0.3340). ``factor`` gets as many dimensions as ``gradient``, so that type promotion
    runs the product in float32; the result is written straight into a new ``dtype`` buffer.
    """
    factor = factor.to(torch.float32)
    factor = factor.reshape(factor.shape + (1,) * (gradient.dim() - factor.dim()))
    if torch.compiler.is_compiling():
        return (gradient.to(torch.float32) * factor).to(dtype)
    return torch.mul(gradient, factor, out=torch.empty(gradient.shape, dtype=dtype, device=gradient.device))


def incoming_gradient_applied(gradient: torch.Tensor, grad_loss: torch.Tensor, reduce: bool,
                              dtype: torch.dtype) -> torch.Tensor:
    """The stored gradient of ``sum(row_scale * D)`` (or per row, ``reduce=False``) times the incoming
    gradient, in ``dtype``, as a new tensor; or, for an incoming gradient of exactly 1, ``gradient``
    itself.

    Handed over, the stored gradient belongs to autograd: ``.grad`` may take it over and later
    accumulate into it in place, as may the sum of two branches. That is only safe when the graph is
    freed after this backward; with ``retain_graph=True`` a later backward needs it intact, so a new
    tensor is returned then.
    """
    refuse_double_backward()
    if reduce:
        if (not torch.compiler.is_compiling() and gradient.dtype == dtype and not _graph_is_kept()
                and bool(grad_loss == 1)):
            return gradient
        return scale_gradient(gradient, grad_loss.reshape(()), dtype)
    return scale_gradient(gradient, grad_loss.reshape(gradient.shape[:-1]), dtype)


def refuse_double_backward() -> None:
    """Raised from inside a backward that was asked to build a graph (``create_graph=True``)."""
    if torch.is_grad_enabled():
        raise DoubleBackwardError(
            "aropd_kernels does not support double backward (create_graph=True): the gradient is "
            "precomputed in the forward pass. Call backward without create_graph."
        )


def _graph_is_kept() -> bool:
    """True when the running backward keeps the graph (``retain_graph=True``); True when unknown."""
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):  # a torch without the query, or no backward running
        return True


def _setup_context(ctx, inputs, output):
    ctx.reduce = inputs[10]
    ctx.student_dtype = inputs[0].dtype
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, _grad_diagnostics, _grad_grad):
    if grad_loss is None:
        return (None,) * 14
    student_grad = incoming_gradient_applied(ctx.saved_tensors[0], grad_loss, ctx.reduce, ctx.student_dtype)
    return (student_grad,) + (None,) * 13


anchored_residual_kl_op.register_autograd(_backward, setup_context=_setup_context)


class EagerAnchoredResidualKL(torch.autograd.Function):
    """The op's computation under a plain autograd.Function, eager only, for what a mutation-free
    ``torch.library`` op cannot declare:

    - ``inplace``: the gradient overwrites the student logits. The caller bumps the student's version
      counter, so that any other saved use of the overwritten logits fails loudly in backward.
    - ``compute_rows`` other than :func:`aropd_kernels.backends.compute_rows`: a vocabulary shard's rows,
      whose passes call collectives (:mod:`aropd_kernels.distributed`).

    Backward follows the op's rules (:func:`incoming_gradient_applied`).
    """

    @staticmethod
    def forward(ctx, student, partial, full, row_temperature, active, row_scale, labels, lam, clip, beta, reduce,
                compute_grad, with_diagnostics, backend, inplace, compute_rows):
        grad_out = None
        if compute_grad:
            grad_out = student if inplace else torch.empty(
                student.shape, dtype=gradient_dtype(student.dtype), device=student.device)
        loss, diagnostics = _run(student, partial, full, row_temperature, active, row_scale, labels, lam, clip,
                                 beta, reduce, with_diagnostics, backend, grad_out, compute_rows)
        ctx.reduce = reduce
        ctx.student_dtype = student.dtype
        ctx.gradient = grad_out  # not save_for_backward: an in-place gradient's version is bumped after this
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(diagnostics)
        return loss, diagnostics

    @staticmethod
    def backward(ctx, grad_loss, _grad_diagnostics):
        student_grad = None
        if grad_loss is not None and ctx.gradient is not None:
            student_grad = incoming_gradient_applied(ctx.gradient, grad_loss, ctx.reduce, ctx.student_dtype)
        return (student_grad,) + (None,) * 15
