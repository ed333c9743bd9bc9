"""Fused linear: the AR-OPD loss from hidden states and lm_head weights, never the N×V logits.

:func:`fused_linear_anchored_residual_kl` takes the last hidden states of the student and of the
teacher's two views, and the two lm_head weights. A chunk of rows at a time it computes the three
logits blocks from them (matmuls into buffers reused across chunks), lets the row kernel of the chosen
backend (:mod:`aropd_kernels.backends`) turn them into the rows' loss and the student logits' gradient,
and multiplies that gradient straight into the gradients of the student's hidden states, weight and
bias. Only per-row results and those gradients outlive a chunk. The chunk loop knows nothing of the
divergence; the row kernels know nothing of matmuls. docs/fused_linear.md gives the memory formula.

Logits are computed in float32 (float64 for float64 inputs) from the hidden states and weights as
given, whatever their dtype: a bfloat16 logit would carry a rounding error of 0.4 % of its size into
the loss. Weights are upcast a vocabulary slab at a time into one reused buffer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import backends, ops, rows
from .backends import N_DIAGNOSTICS, RowResult
from .functional import shaped_result

# Weights are upcast, and half-precision weight gradients accumulated, in vocabulary slabs of this many
# elements (16 MiB in float32): few matmul calls per pass over a weight, little memory beside it.
SLAB_ELEMENTS = 2**22
CHUNK_ROW_MULTIPLE = 16  # rows per chunk are a multiple of this: whole tiles for the matmuls


def default_chunk_rows(hidden_size: int) -> int:
    """Rows per chunk when ``chunk_size=None``: the student's hidden size H over 12, rounded down to a
    multiple of 16, at least 16.

    A chunk's three float32 logits blocks take 12·R·V bytes; with R = H/12 that is V·H bytes, a quarter of
    the float32 weight-gradient accumulator (4·V·H bytes), so the chunk never dominates the memory, for
    any vocabulary (R = 64 at H = 896, 288 at H = 3584, 336 at H = 4096). Every chunk reads the weights
    and the accumulator once more: larger chunks do fewer, larger matmuls, at 12·V bytes per row.
    """
    return max(CHUNK_ROW_MULTIPLE, hidden_size // 12 // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)


# --- validation: every check runs before any kernel ----------------------------------------------


def _check_hidden(name: str, hidden, weight_name: str, weight) -> None:
    rows.check_float_tensor(name, hidden, "hidden states")
    rows.check_float_tensor(weight_name, weight, "weights")
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}.")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{weight_name} must have shape [V, H] with V >= 1 (an lm_head weight), "
                         f"got {tuple(weight.shape)}.")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} has shape {tuple(weight.shape)}: its H = {weight.shape[1]} must match the last "
            f"dimension of {name}, {hidden.shape[-1]}; pass the lm_head weight [V, H] of that model."
        )


def _check_bias(name: str, bias, vocab: int) -> None:
    if bias is None:
        return
    rows.check_float_tensor(name, bias, "biases")
    if bias.shape != (vocab,):
        raise ValueError(f"{name} must have shape [V] = ({vocab},), got {tuple(bias.shape)}.")


def check_inputs(student_hidden, student_weight, partial_hidden, full_hidden, teacher_weight, student_bias,
                 teacher_bias) -> None:
    """Types, shapes and devices of the tensors; teachers must not require grad."""
    _check_hidden("student_hidden", student_hidden, "student_weight", student_weight)
    _check_hidden("partial_teacher_hidden", partial_hidden, "teacher_weight", teacher_weight)
    _check_hidden("full_teacher_hidden", full_hidden, "teacher_weight", teacher_weight)
    if full_hidden.shape != partial_hidden.shape:
        raise ValueError(f"full_teacher_hidden has shape {tuple(full_hidden.shape)} but partial_teacher_hidden has "
                         f"{tuple(partial_hidden.shape)}; both views must be aligned to the same completion tokens.")
    batch_shape = student_hidden.shape[:-1]
    if partial_hidden.shape[:-1] != batch_shape:
        raise ValueError(
            f"the teacher hidden states have leading shape {tuple(partial_hidden.shape[:-1])} but student_hidden has "
            f"{tuple(batch_shape)}; align the teacher's hidden states to the student's completion tokens "
            "(see docs/integration.md). Only the last dimension, H, may differ."
        )
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_weight has V = {teacher_weight.shape[0]} rows but student_weight has {vocab}; "
                         "student and teacher must share the vocabulary.")
    _check_bias("student_bias", student_bias, vocab)
    _check_bias("teacher_bias", teacher_bias, vocab)
    named = {"student_weight": student_weight, "partial_teacher_hidden": partial_hidden,
             "full_teacher_hidden": full_hidden, "teacher_weight": teacher_weight, "student_bias": student_bias,
             "teacher_bias": teacher_bias}
    for name, tensor in named.items():
        if tensor is not None and tensor.device != student_hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but student_hidden is on {student_hidden.device}; "
                             "move it with .to().")
    for name in ("partial_teacher_hidden", "full_teacher_hidden", "teacher_weight", "teacher_bias"):
        if named[name] is not None:
            rows.refuse_teacher_grad(name, named[name])


def check_projection(logit_scale, logit_softcap, chunk_size) -> None:
    rows.check_real("logit_scale", logit_scale, "a finite number > 0", lambda x: rows.is_finite(x) and x > 0)
    if logit_softcap is not None:
        rows.check_real("logit_softcap", logit_softcap, "None (no softcap) or a finite number > 0",
                        lambda x: rows.is_finite(x) and x > 0)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size must be None or an int, got {type(chunk_size).__name__}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None (chosen from the hidden size) or an int >= 1, got {chunk_size}.")


# --- the chunk loop ---------------------------------------------------------------------------------


class Projection(NamedTuple):
    """logits = softcap · tanh(scale · (h Wᵀ + b) / softcap), or scale · (h Wᵀ + b) without a softcap."""

    scale: float
    softcap: float | None

    def finish(self, logits: torch.Tensor) -> None:
        """Applies the scale and the softcap, in place, to ``h Wᵀ + b``."""
        if self.softcap is not None:
            logits.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap)
        elif self.scale != 1.0:
            logits.mul_(self.scale)

    def chain(self, grad: torch.Tensor, logits: torch.Tensor) -> None:
        """Turns the gradient w.r.t. the logits into that w.r.t. ``h Wᵀ + b``, up to the factor ``scale``
        (which the matmuls apply). The softcap's derivative is 1 − (logits / softcap)²; ``logits`` is
        overwritten."""
        if self.softcap is not None:
            grad.mul_(logits.div_(self.softcap).square_().neg_().add_(1.0))


class SlabbedWeight:
    """A weight ``[V, H]`` read by vocabulary slabs in the compute dtype: a weight of another dtype is
    upcast slab by slab into one reused buffer; one of the compute dtype is read in place, in one slab."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype):
        self.weight = weight
        vocab, hidden = weight.shape
        slab_rows = vocab if weight.dtype == compute_dtype else max(1, SLAB_ELEMENTS // hidden)
        self.slabs = [(start, min(start + slab_rows, vocab)) for start in range(0, vocab, slab_rows)]
        self._buffer = None
        if weight.dtype != compute_dtype:
            self._buffer = torch.empty(min(slab_rows, vocab), hidden, dtype=compute_dtype, device=weight.device)

    def slab(self, start: int, end: int) -> torch.Tensor:
        if self._buffer is None:
            return self.weight[start:end]
        upcast = self._buffer[: end - start]
        upcast.copy_(self.weight[start:end])
        return upcast


class WeightGradient:
    """Accumulator of a weight's gradient in the compute dtype, by the slabs of :class:`SlabbedWeight`.

    When the gradient is stored in another dtype (a bfloat16 weight's), each slab is its own tensor, so
    that converting them one by one into the result frees each as soon as it is copied.
    """

    def __init__(self, weight: SlabbedWeight, compute_dtype: torch.dtype):
        vocab, hidden = weight.weight.shape
        self.stored_dtype = ops.gradient_dtype(weight.weight.dtype)
        self.shape = (vocab, hidden)
        self.slabs = weight.slabs
        device = weight.weight.device
        if self.stored_dtype == compute_dtype:
            self._whole = torch.zeros(vocab, hidden, dtype=compute_dtype, device=device)
            self._parts = [self._whole[start:end] for start, end in self.slabs]
        else:
            self._whole = None
            self._parts = [torch.zeros(end - start, hidden, dtype=compute_dtype, device=device)
                           for start, end in self.slabs]

    def part(self, index: int) -> torch.Tensor:
        return self._parts[index]

    def result(self) -> torch.Tensor:
        if self._whole is not None:
            return self._whole
        result = torch.empty(self.shape, dtype=self.stored_dtype, device=self._parts[0].device)
        for index, (start, end) in enumerate(self.slabs):
            result[start:end].copy_(self._parts[index])
            self._parts[index] = None  # freed now, before the next slab lands in the result
        return result


class RowSettings(NamedTuple):
    """What the row step needs besides the logits: the plan's rows and the divergence's scalars."""

    row_temperature: torch.Tensor
    active: torch.Tensor
    row_scale: torch.Tensor
    lam: float
    clip: float
    beta: float
    with_diagnostics: bool
    backend: str


def row_step(student: torch.Tensor, partial: torch.Tensor, full: torch.Tensor, rows_slice: slice,
             settings: RowSettings, grad_out: torch.Tensor | None) -> RowResult:
    """The loss (and, into ``grad_out``, the scaled student gradient) of one chunk's ``[r, V]`` logits
    blocks: the per-row contract of :mod:`aropd_kernels.backends` on a ``[1, r, V]`` view."""
    grad_scale = settings.row_scale[rows_slice] if grad_out is not None else None
    return backends.compute_rows(
        settings.backend, student.unsqueeze(0), partial.unsqueeze(0), full.unsqueeze(0),
        settings.row_temperature[rows_slice], settings.active[rows_slice], grad_scale,
        None if grad_out is None else grad_out.unsqueeze(0),
        lam=settings.lam, clip=settings.clip, beta=settings.beta, with_diagnostics=settings.with_diagnostics,
    )


def project(hidden: torch.Tensor, weight: SlabbedWeight, bias: torch.Tensor | None, projection: Projection,
            out: torch.Tensor) -> None:
    """``out[m] = projection(hidden[m] Wᵀ + b)``: ``hidden`` ``[M, H]`` and ``out`` ``[M, V]`` in the compute dtype."""
    for start, end in weight.slabs:
        slab = weight.slab(start, end)
        if bias is None:
            torch.mm(hidden, slab.t(), out=out[:, start:end])
        else:
            torch.addmm(bias[start:end], hidden, slab.t(), out=out[:, start:end])
    projection.finish(out)


def teacher_logits(hiddens: tuple[torch.Tensor, ...], weight: SlabbedWeight, bias: torch.Tensor | None,
                   projection: Projection, stacked: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The teacher's logits blocks for one or more views of the same rows, in one matmul per weight slab:
    the views' hidden states ``[r, H_t]`` are stacked into ``stacked`` and projected into ``out``."""
    n_rows = hiddens[0].shape[0]
    stacked = stacked[: len(hiddens) * n_rows]
    for index, hidden in enumerate(hiddens):
        stacked[index * n_rows:(index + 1) * n_rows].copy_(hidden)
    block = out[: len(hiddens) * n_rows]
    project(stacked, weight, bias, projection, block)
    return tuple(block[index * n_rows:(index + 1) * n_rows] for index in range(len(hiddens)))


class StudentGradients:
    """Where a chunk's student-logits gradient goes: the hidden-state rows, and the weight and bias
    accumulators; each is None when its tensor does not require grad."""

    def __init__(self, hidden: torch.Tensor | None, weight: WeightGradient | None, bias: torch.Tensor | None,
                 hidden_accumulator: torch.Tensor | None):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self._hidden_accumulator = hidden_accumulator  # [chunk rows, H] in the compute dtype

    def add_chunk(self, grad: torch.Tensor, hidden: torch.Tensor, weight: SlabbedWeight, rows_slice: slice,
                  scale: float) -> None:
        """``grad`` ``[r, V]`` is the gradient w.r.t. ``hidden Wᵀ + b`` divided by ``scale``."""
        accumulator = None
        if self.hidden is not None:
            accumulator = self._hidden_accumulator[: grad.shape[0]]
            accumulator.zero_()
        for index, (start, end) in enumerate(weight.slabs):
            grad_slab = grad[:, start:end]
            if accumulator is not None:
                accumulator.addmm_(grad_slab, weight.slab(start, end), alpha=scale)
            if self.weight is not None:
                self.weight.part(index).addmm_(grad_slab.t(), hidden, alpha=scale)
        if accumulator is not None:
            self.hidden[rows_slice].copy_(accumulator)
        if self.bias is not None:
            self.bias.add_(grad.sum(0), alpha=scale)


def chunks_with_active_rows(active: torch.Tensor, chunk_rows: int) -> list[bool]:
    """For each chunk of ``chunk_rows`` rows, whether any of its rows counts (one transfer to the host)."""
    flags = active.cpu()
    return [bool(flags[start:start + chunk_rows].any()) for start in range(0, flags.shape[0], chunk_rows)]


class ChunkBuffers:
    """The buffers of one chunk, allocated once per call and reused by every chunk: the student's logits
    (which receive their gradient in place, unless the softcap's derivative needs them, then ``grad``),
    the teacher's two blocks, and the hidden states upcast to the compute dtype."""

    def __init__(self, rows: int, student_hidden: torch.Tensor, teacher_size: int, vocab: int,
                 compute: torch.dtype, separate_grad: bool):
        def empty(*shape):
            return torch.empty(shape, dtype=compute, device=student_hidden.device)

        self.student_logits = empty(rows, vocab)
        self.teacher_logits = empty(2 * rows, vocab)
        self.teacher_hidden = empty(2 * rows, teacher_size)
        self.student_hidden = empty(rows, student_hidden.shape[1]) if student_hidden.dtype != compute else None
        self.grad = empty(rows, vocab) if separate_grad else None

    def hidden(self, student_hidden: torch.Tensor) -> torch.Tensor:
        """The chunk's student hidden states in the compute dtype."""
        if self.student_hidden is None:
            return student_hidden
        upcast = self.student_hidden[: student_hidden.shape[0]]
        upcast.copy_(student_hidden)
        return upcast


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (exact checks), float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def chunk_loop(student_hidden, student_weight, student_bias, partial_hidden, full_hidden, teacher_weight,
               teacher_bias, projection: Projection, chunk_rows: int, settings: RowSettings,
               needs_grad: tuple[bool, bool, bool]):
    """(row losses [N], diagnostics [N_DIAGNOSTICS, N] or None, hidden, weight and bias gradients or None).

    The hidden states are ``[N, H]``. Chunks without an active row are skipped: no matmul, loss 0,
    gradient 0.
    """
    n_rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    compute = compute_dtype(student_hidden, student_weight, student_bias, partial_hidden, full_hidden,
                            teacher_weight, teacher_bias)
    device = student_hidden.device
    row_loss = torch.zeros(n_rows, dtype=compute, device=device)
    diagnostics = (torch.zeros(N_DIAGNOSTICS, n_rows, dtype=torch.float32, device=device)
                   if settings.with_diagnostics else None)
    student_w, teacher_w = SlabbedWeight(student_weight, compute), SlabbedWeight(teacher_weight, compute)
    student_b, teacher_b = (None if b is None else b.to(compute) for b in (student_bias, teacher_bias))
    rows_per_chunk = min(chunk_rows, max(n_rows, 1))
    gradients = StudentGradients(
        hidden=(torch.zeros(student_hidden.shape, dtype=ops.gradient_dtype(student_hidden.dtype), device=device)
                if needs_grad[0] else None),
        weight=WeightGradient(student_w, compute) if needs_grad[1] else None,
        bias=torch.zeros(vocab, dtype=compute, device=device) if needs_grad[2] else None,
        hidden_accumulator=(torch.empty(rows_per_chunk, student_hidden.shape[1], dtype=compute, device=device)
                            if needs_grad[0] else None),
    )
    compute_grad = any(needs_grad)
    active_chunks = chunks_with_active_rows(settings.active, rows_per_chunk)
    buffers = None
    if any(active_chunks):
        buffers = ChunkBuffers(rows_per_chunk, student_hidden, teacher_weight.shape[1], vocab, compute,
                               separate_grad=compute_grad and projection.softcap is not None)
    for index, start in enumerate(range(0, n_rows, rows_per_chunk)):
        if not active_chunks[index]:
            continue
        rows_slice = slice(start, min(start + rows_per_chunk, n_rows))
        count = rows_slice.stop - start
        hidden = buffers.hidden(student_hidden[rows_slice])
        student = buffers.student_logits[:count]
        project(hidden, student_w, student_b, projection, student)
        partial, full = teacher_logits((partial_hidden[rows_slice], full_hidden[rows_slice]), teacher_w, teacher_b,
                                       projection, buffers.teacher_hidden, buffers.teacher_logits)
        grad = None
        if compute_grad:
            grad = student if buffers.grad is None else buffers.grad[:count]
        result = row_step(student, partial, full, rows_slice, settings, grad)
        row_loss[rows_slice] = result.row_loss
        if diagnostics is not None:
            diagnostics[:, rows_slice] = result.diagnostics
        if compute_grad:
            projection.chain(grad, student)
            gradients.add_chunk(grad, hidden, student_w, rows_slice, projection.scale)
    del buffers, student_w, teacher_w  # freed before the weight gradient is converted
    weight_grad = None if gradients.weight is None else gradients.weight.result()
    bias_grad = None if gradients.bias is None else gradients.bias.to(ops.gradient_dtype(student_bias.dtype))
    return row_loss, diagnostics, gradients.hidden, weight_grad, bias_grad


# --- under autograd ----------------------------------------------------------------------------------


@torch.library.custom_op("aropd::fused_linear_anchored_residual_kl", mutates_args=())
def fused_linear_op(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    partial_hidden: torch.Tensor,
    full_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    row_temperature: torch.Tensor,
    active: torch.Tensor,
    row_scale: torch.Tensor,
    logit_scale: float,
    logit_softcap: float | None,
    chunk_rows: int,
    lam: float,
    clip: float,
    beta: float,
    reduce: bool,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    with_diagnostics: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, diagnostics, hidden gradient, weight gradient, bias gradient) for ``[N, H]`` hidden
    states. ``loss`` is ``sum(row_scale * D)`` when ``reduce`` else ``row_scale * D`` per row; each
    gradient is that of ``sum(row_scale * D)``, in :func:`ops.gradient_dtype` of its tensor, or an empty
    tensor when not asked for; so are the diagnostics."""
    settings = RowSettings(row_temperature, active, row_scale, lam, clip, beta, with_diagnostics, backend)
    row_loss, diagnostics, *gradients = chunk_loop(
        student_hidden, student_weight, student_bias, partial_hidden, full_hidden, teacher_weight, teacher_bias,
        Projection(logit_scale, logit_softcap), chunk_rows, settings, (grad_hidden, grad_weight, grad_bias))
    return (ops.scaled_loss(row_loss, row_scale, reduce),
            student_hidden.new_empty(0, dtype=torch.float32) if diagnostics is None else diagnostics,
            *(student_hidden.new_empty(0) if gradient is None else gradient for gradient in gradients))


@fused_linear_op.register_fake
def _(student_hidden, student_weight, student_bias, partial_hidden, full_hidden, teacher_weight, teacher_bias,
      row_temperature, active, row_scale, logit_scale, logit_softcap, chunk_rows, lam, clip, beta, reduce,
      grad_hidden, grad_weight, grad_bias, with_diagnostics, backend):
    n_rows = student_hidden.shape[0]
    compute = compute_dtype(student_hidden, student_weight, student_bias, partial_hidden, full_hidden,
                            teacher_weight, teacher_bias)

    def gradient(wanted, tensor):
        if not wanted:
            return student_hidden.new_empty(0)
        return tensor.new_empty(tensor.shape, dtype=ops.gradient_dtype(tensor.dtype))

    return (student_hidden.new_empty(() if reduce else (n_rows,), dtype=compute),
            student_hidden.new_empty((N_DIAGNOSTICS, n_rows) if with_diagnostics else (0,), dtype=torch.float32),
            gradient(grad_hidden, student_hidden), gradient(grad_weight, student_weight),
            gradient(grad_bias, student_bias))


_N_OP_INPUTS = 22
_STUDENT_INPUTS = (0, 1, 2)  # student_hidden, student_weight, student_bias: the inputs gradients go to


def _setup_context(ctx, inputs, output):
    ctx.reduce = inputs[16]
    ctx.computed = inputs[17:20]  # grad_hidden, grad_weight, grad_bias
    ctx.dtypes = tuple(None if inputs[i] is None else inputs[i].dtype for i in _STUDENT_INPUTS)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    if ctx.reduce:  # the gradients were computed in the forward pass; backward scales them
        ctx.save_for_backward(*output[2:])
        return
    # per-token losses: each row's incoming gradient enters the weight gradient, so backward reruns the loop
    ctx.save_for_backward(*inputs[:10])
    ctx.settings = inputs[10:16] + inputs[21:22]


def _backward(ctx, grad_loss, *_grad_outputs):
    if grad_loss is None:
        return (None,) * _N_OP_INPUTS
    if ctx.reduce:
        gradients = [ops.incoming_gradient_applied(stored, grad_loss, True, dtype) if computed else None
                     for stored, computed, dtype in zip(ctx.saved_tensors, ctx.computed, ctx.dtypes)]
    else:
        gradients = _recomputed_gradients(ctx, grad_loss)
    return (*gradients,) + (None,) * (_N_OP_INPUTS - 3)


def _recomputed_gradients(ctx, grad_loss):
    """The gradients of ``sum(grad_loss * row_scale * D)``: the loop again, the incoming gradient folded
    into each row's scale (rows whose scale is 0 are skipped)."""
    ops.refuse_double_backward()
    (student_hidden, student_weight, student_bias, partial_hidden, full_hidden, teacher_weight, teacher_bias,
     row_temperature, active, row_scale) = ctx.saved_tensors
    logit_scale, logit_softcap, chunk_rows, lam, clip, beta, backend = ctx.settings
    scale = row_scale * grad_loss.to(torch.float32)
    wanted = [ctx.needs_input_grad[i] for i in _STUDENT_INPUTS]
    _, _, *stored = fused_linear_op(
        student_hidden, student_weight, student_bias, partial_hidden, full_hidden, teacher_weight, teacher_bias,
        row_temperature, active & (scale != 0), scale, logit_scale, logit_softcap, chunk_rows, lam, clip, beta,
        True, wanted[0], wanted[1], wanted[2] and student_bias is not None, False, backend)
    return [gradient.to(dtype) if want else None for gradient, want, dtype in zip(stored, wanted, ctx.dtypes)]


fused_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --- the public entry point -----------------------------------------------------------------------------


def fused_linear_anchored_residual_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    partial_teacher_hidden: torch.Tensor,
    full_teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    chunk_size: int | None = None,
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
    backend: str = "auto",
):
    """:func:`aropd_kernels.anchored_residual_kl` of the logits
    ``softcap · tanh(scale · (h Wᵀ + b) / softcap)`` (``scale · (h Wᵀ + b)`` without a softcap), computed
    a chunk of rows at a time from the hidden states ``[..., H]`` and lm_head weights ``[V, H]``, so that
    no N×V tensor is ever held.

    The teacher's two views share ``teacher_weight`` and ``teacher_bias``; its hidden size may differ from
    the student's. Gradients go to ``student_hidden``, ``student_weight`` and ``student_bias``, whichever
    require grad. ``chunk_size`` is the number of rows per chunk (None: :func:`default_chunk_rows`).
    Every other keyword is that of ``anchored_residual_kl``. See docs/fused_linear.md.
    """
    check_inputs(student_hidden, student_weight, partial_teacher_hidden, full_teacher_hidden, teacher_weight,
                 student_bias, teacher_bias)
    rows.check_settings(lam, clip, beta, reduction, backend, num_items_in_batch)
    check_projection(logit_scale, logit_softcap, chunk_size)
    batch_shape = student_hidden.shape[:-1]
    device = student_hidden.device
    plan = rows.plan_rows(batch_shape, device, temperature=temperature, labels=labels, ignore_index=ignore_index,
                          mask=mask, weights=weights, reduction=reduction, num_items_in_batch=num_items_in_batch)
    logits_dtype = compute_dtype(student_hidden, student_weight, partial_teacher_hidden, full_teacher_hidden,
                                 teacher_weight, student_bias, teacher_bias)
    name = backends.resolve(backend, device, (logits_dtype,))
    if chunk_size is None:
        chunk_size = batch_shape.numel() if name == "reference" else default_chunk_rows(student_hidden.shape[-1])

    reduce = reduction != "none"
    grad_enabled = torch.is_grad_enabled()
    wants = [grad_enabled and t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)]
    stored = [reduce and want for want in wants]  # per-token losses: gradients are computed in backward
    loss, diagnostics, *_ = fused_linear_op(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
        partial_teacher_hidden.reshape(-1, partial_teacher_hidden.shape[-1]),
        full_teacher_hidden.reshape(-1, full_teacher_hidden.shape[-1]), teacher_weight, teacher_bias,
        *plan[:3], float(logit_scale), None if logit_softcap is None else float(logit_softcap), max(chunk_size, 1),
        float(lam), float(clip), float(beta), reduce, *stored, return_diagnostics, name)
    loss, diagnostics = shaped_result(loss, diagnostics, batch_shape, reduce=reduce,
                                      return_diagnostics=return_diagnostics, one_teacher=False, with_labels=False)
    return loss if diagnostics is None else (loss, diagnostics)


class FusedLinearAnchoredResidualKL(nn.Module):
    """Module form of :func:`fused_linear_anchored_residual_kl`; the constructor takes its keyword arguments."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, student_hidden, student_weight, partial_teacher_hidden, full_teacher_hidden, teacher_weight,
                **overrides):
        return fused_linear_anchored_residual_kl(student_hidden, student_weight, partial_teacher_hidden,
                                                 full_teacher_hidden, teacher_weight, **{**self.kwargs, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
