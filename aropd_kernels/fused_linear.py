"""Fused linear: the distillation losses from hidden states and lm_head weights, never the N×V logits.

:func:`fused_linear_anchored_residual_kl` takes the last hidden states of the student and of the
teacher's two views, and the two lm_head weights; :func:`fused_linear_distillation_divergence` the
same with one teacher view. A chunk of rows at a time they compute the logits blocks from them
(matmuls into buffers reused across chunks), let the row kernel of the chosen backend
(:mod:`aropd_kernels.backends`) turn them into the rows' loss and the student logits' gradient, and
multiply that gradient straight into the gradients of the student's hidden states, weight and bias.
Only per-row results and those gradients outlive a chunk. The chunk loop knows nothing of the
divergence; the row kernels know nothing of matmuls. docs/fused_linear.md gives the memory formula.
With a process group the weights are vocabulary shards: :mod:`aropd_kernels.distributed` supplies the
row function of a shard and the sum of the hidden states' gradient over the ranks.

By default logits are computed in float32 (float64 for float64 inputs) from the hidden states and
weights as given, whatever their dtype: a bfloat16 logit would carry a rounding error of 0.4 % of its
size into the loss. Weights are upcast a vocabulary slab at a time into one reused buffer. With
``logits_dtype=torch.bfloat16`` (or float16), every tensor of that dtype, the matmuls run in it and the
logits are rounded to it, as the model's own lm_head in that dtype gives them; the weight and bias
gradients are still summed over the chunks in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from . import backends, functional, ops, rows
from .backends import N_DIAGNOSTICS, RowResult
from .functional import shaped_result

# Weights are upcast, and half-precision weight gradients accumulated, in vocabulary slabs of this many
# elements (16 MiB in float32): few matmul calls per pass over a weight, little memory beside it.
SLAB_ELEMENTS = 2**22
CHUNK_ROW_MULTIPLE = 16  # rows per chunk are a multiple of this: whole tiles for the matmuls
HALF_LOGITS_DTYPES = (torch.bfloat16, torch.float16)  # what logits_dtype= may name
HALF_LOGITS_ROWS_PER_HIDDEN = 2 / 3  # default rows per chunk over H with logits_dtype (see below)
# ... and with logits_dtype and accum_dtype=torch.bfloat16: the chunk's blocks take the gradient's own bytes
HALF_LOGITS_HALF_SUM_ROWS_PER_HIDDEN = 1 / 3


def default_chunk_rows(hidden_size: int, logits_dtype: torch.dtype | None = None,
                       sum_in_weight_dtype: bool = False) -> int:
    """Rows per chunk when ``chunk_size=None``, from the student's hidden size H, rounded down to a
    multiple of 16, at least 16.

    Float32 logits (``logits_dtype=None``): R = H/12. A chunk's three float32 logits blocks take 12·R·V
    bytes; with R = H/12 that is V·H bytes, a quarter of the float32 weight-gradient accumulator
    (4·V·H bytes), so the chunk never dominates the memory, for any vocabulary (R = 64 at H = 896, 288
    at H = 3584, 336 at H = 4096).

    Half-precision logits: R = 2H/3. The three half-precision blocks take 6·R·V bytes, again at most the
    accumulator's 4·V·H. Each chunk adds its weight gradient into the float32 accumulator, a pass over
    4·V·H bytes that costs as much as the matmuls of about H rows (measured on CPU), so chunks are
    longer here (R = 592 at H = 896, 2384 at H = 3584, 2720 at H = 4096).

    Half-precision logits with the weight gradient summed in bfloat16 (``accum_dtype=torch.bfloat16``):
    R = H/3. There is no float32 accumulator; the three blocks, 6·R·V bytes, are the 2·V·H bytes of the
    gradient itself (R = 288 at H = 896, 1184 at H = 3584, 1360 at H = 4096), and each chunk's sum is one
    in-place bfloat16 matmul, so short chunks cost little.
    """
    if logits_dtype is None:
        per_hidden = 1 / 12
    else:
        per_hidden = HALF_LOGITS_HALF_SUM_ROWS_PER_HIDDEN if sum_in_weight_dtype else HALF_LOGITS_ROWS_PER_HIDDEN
    rows = int(hidden_size * per_hidden) // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return max(CHUNK_ROW_MULTIPLE, rows)


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


ANCHORED_NAMES = ("student_hidden", "partial_teacher_hidden", "full_teacher_hidden")
ONE_TEACHER_NAMES = ("student_hidden", "teacher_hidden")


def check_inputs(student_hidden, student_weight, teacher_hiddens: tuple, teacher_weight, student_bias, teacher_bias,
                 names: tuple[str, ...] = ANCHORED_NAMES) -> None:
    """Types, shapes and devices of the tensors; teachers must not require grad. ``teacher_hiddens``: the
    teacher's views (partial and full, or the one teacher), named by ``names[1:]``."""
    named_hiddens = dict(zip(names[1:], teacher_hiddens))
    for name, tensor in {"student_hidden": student_hidden, "student_weight": student_weight, **named_hiddens,
                         "teacher_weight": teacher_weight}.items():
        if functional.is_dtensor(tensor):
            raise TypeError(f"{name} is a DTensor; pass this rank's local tensors (x.to_local()) with "
                            "process_group= (docs/distributed.md).")
    _check_hidden("student_hidden", student_hidden, "student_weight", student_weight)
    for name, hidden in named_hiddens.items():
        _check_hidden(name, hidden, "teacher_weight", teacher_weight)
    if len(teacher_hiddens) == 2 and teacher_hiddens[1].shape != teacher_hiddens[0].shape:
        raise ValueError(f"{names[2]} has shape {tuple(teacher_hiddens[1].shape)} but {names[1]} has "
                         f"{tuple(teacher_hiddens[0].shape)}; both views must be aligned to the same completion tokens.")
    batch_shape = student_hidden.shape[:-1]
    if teacher_hiddens[0].shape[:-1] != batch_shape:
        raise ValueError(
            f"the teacher hidden states have leading shape {tuple(teacher_hiddens[0].shape[:-1])} but student_hidden "
            f"has {tuple(batch_shape)}; align the teacher's hidden states to the student's completion tokens "
            "(see docs/integration.md). Only the last dimension, H, may differ."
        )
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_weight has V = {teacher_weight.shape[0]} rows but student_weight has {vocab}; "
                         "student and teacher must share the vocabulary (with process_group=, the same shard).")
    _check_bias("student_bias", student_bias, vocab)
    _check_bias("teacher_bias", teacher_bias, vocab)
    named = {"student_weight": student_weight, **named_hiddens, "teacher_weight": teacher_weight,
             "student_bias": student_bias, "teacher_bias": teacher_bias}
    for name, tensor in named.items():
        if tensor is not None and tensor.device != student_hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but student_hidden is on {student_hidden.device}; "
                             "move it with .to().")
    for name in (*named_hiddens, "teacher_weight", "teacher_bias"):
        if named[name] is not None:
            rows.refuse_teacher_grad(name, named[name])


def check_logits_dtype(logits_dtype, named_tensors: dict) -> None:
    """``logits_dtype`` is None, or a half-precision dtype that every hidden state, weight and bias has."""
    if logits_dtype is None:
        return
    if not isinstance(logits_dtype, torch.dtype):
        raise TypeError(f"logits_dtype must be None or a torch.dtype, got {type(logits_dtype).__name__}.")
    if logits_dtype not in HALF_LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be None (float32 logits from the tensors as given), torch.bfloat16 "
                         f"or torch.float16, got {logits_dtype}.")
    for name, tensor in named_tensors.items():
        if tensor is not None and tensor.dtype != logits_dtype:
            raise ValueError(
                f"{name} has dtype {tensor.dtype} but logits_dtype={logits_dtype}: the matmuls run in logits_dtype "
                f"on the tensors as given, so every hidden state, weight and bias must be {logits_dtype}; cast "
                f"{name} with .to({logits_dtype}), or pass logits_dtype=None for float32 logits.")


def check_accum_dtype(accum_dtype, student_weight: torch.Tensor) -> None:
    """``accum_dtype`` is None or torch.float32 (the float32 sum), or torch.bfloat16 for a bfloat16
    ``student_weight`` (the sum kept in the gradient itself)."""
    if accum_dtype is None or accum_dtype == torch.float32:
        return
    if not isinstance(accum_dtype, torch.dtype):
        raise TypeError(f"accum_dtype must be None or a torch.dtype, got {type(accum_dtype).__name__}.")
    if accum_dtype != torch.bfloat16:
        raise ValueError(f"accum_dtype must be None or torch.float32 (the weight gradient summed in float32), or "
                         f"torch.bfloat16 for a bfloat16 student_weight, got {accum_dtype}.")
    if student_weight.dtype != torch.bfloat16:
        raise ValueError(f"accum_dtype=torch.bfloat16 sums the weight gradient in the bfloat16 gradient itself, but "
                         f"student_weight has dtype {student_weight.dtype}; pass accum_dtype=None (float32 sum).")


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

    def finish(self, logits: torch.Tensor, saved_tanh: torch.Tensor | None = None) -> None:
        """Applies the scale and the softcap, in place, to ``h Wᵀ + b``, one rounded operation at a time,
        as a model does; the softcap's tanh goes to ``saved_tanh`` too, when given, for :meth:`chain`."""
        if self.softcap is not None:
            logits.mul_(self.scale / self.softcap).tanh_()
            if saved_tanh is not None:
                saved_tanh.copy_(logits)
            logits.mul_(self.softcap)
        elif self.scale != 1.0:
            logits.mul_(self.scale)

    def chain(self, grad: torch.Tensor, saved_tanh: torch.Tensor | None) -> None:
        """Turns the gradient w.r.t. the logits into that w.r.t. ``h Wᵀ + b``, up to the factor ``scale``
        (which the matmuls apply), in place. The softcap's derivative 1 − tanh² is formed from the saved
        tanh, not from the logits: near saturation 1 − (logits / softcap)² would cancel the logits'
        rounding error into a large relative one (bfloat16 logits)."""
        if self.softcap is not None:
            torch.ops.aten.tanh_backward.grad_input(grad, saved_tanh, grad_input=grad)


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

    @property
    def in_place(self) -> bool:
        """Whether the weight is read as it is, in one slab (no upcast)."""
        return self._buffer is None

    def slab(self, start: int, end: int) -> torch.Tensor:
        if self._buffer is None:
            return self.weight[start:end]
        upcast = self._buffer[: end - start]
        upcast.copy_(self.weight[start:end])
        return upcast


class WeightGradient:
    """Accumulator of a weight's gradient in the accumulation dtype (float32, or float64), by vocabulary
    slabs of ``SLAB_ELEMENTS``, or whole when it is stored in that dtype and formed in it.

    When the gradient is stored in another dtype (a bfloat16 weight's), each slab is its own tensor, so
    that converting them one by one into the result frees each as soon as it is copied. When each
    chunk's product is formed in a narrower dtype (half-precision logits), it lands in a reused
    slab-sized buffer and is added from there.

    ``in_weight_dtype`` (``accum_dtype=torch.bfloat16``): the sum is the bfloat16 gradient itself, each
    chunk's product added into it with one rounding per chunk; no float32 copy exists.
    """

    def __init__(self, weight: torch.Tensor, accumulate_dtype: torch.dtype, product_dtype: torch.dtype,
                 in_weight_dtype: bool = False):
        vocab, hidden = weight.shape
        self.stored_dtype = ops.gradient_dtype(weight.dtype)
        if in_weight_dtype:
            accumulate_dtype = self.stored_dtype
        self.shape = (vocab, hidden)
        whole = self.stored_dtype == accumulate_dtype and product_dtype == accumulate_dtype
        slab_rows = vocab if whole else max(1, SLAB_ELEMENTS // hidden)  # whole: one addmm_ per chunk
        self.slabs = [(start, min(start + slab_rows, vocab)) for start in range(0, vocab, slab_rows)]
        device = weight.device
        if self.stored_dtype == accumulate_dtype:
            self._whole = torch.zeros(vocab, hidden, dtype=accumulate_dtype, device=device)
            self._parts = [self._whole[start:end] for start, end in self.slabs]
        else:
            self._whole = None
            self._parts = [torch.zeros(end - start, hidden, dtype=accumulate_dtype, device=device)
                           for start, end in self.slabs]
        self._product = None
        if product_dtype != accumulate_dtype:
            self._product = torch.empty(min(slab_rows, vocab), hidden, dtype=product_dtype, device=device)

    def part(self, index: int) -> torch.Tensor:
        return self._parts[index]

    def add(self, grad: torch.Tensor, hidden: torch.Tensor, scale: float) -> None:
        """Adds ``scale · gradᵀ hidden`` for a chunk's ``grad`` ``[r, V]`` and ``hidden`` ``[r, H]``."""
        for part, (start, end) in zip(self._parts, self.slabs):
            grad_slab = grad[:, start:end].t()
            if self._product is None:
                part.addmm_(grad_slab, hidden, alpha=scale)
            else:
                part.add_(torch.mm(grad_slab, hidden, out=self._product[: end - start]), alpha=scale)

    def result(self) -> torch.Tensor:
        self._product = None
        if self._whole is not None:
            return self._whole
        result = torch.empty(self.shape, dtype=self.stored_dtype, device=self._parts[0].device)
        for index, (start, end) in enumerate(self.slabs):
            result[start:end].copy_(self._parts[index])
            self._parts[index] = None  # freed now, before the next slab lands in the result
        return result


class RowSettings(NamedTuple):
    """What the row step needs besides the logits: the plan's rows, the divergence's scalars, and the
    function that runs the per-row contract (None: :func:`aropd_kernels.backends.compute_rows`; a
    vocabulary shard's rows, which communicate, under a process group)."""

    row_temperature: torch.Tensor
    active: torch.Tensor
    row_scale: torch.Tensor
    labels: torch.Tensor | None  # int64 [N]: each row's label, for its log-probabilities; or None
    lam: float
    clip: float
    beta: float
    with_diagnostics: bool
    backend: str
    compute_rows: Callable[..., RowResult] | None = None


def row_step(student: torch.Tensor, teachers: tuple[torch.Tensor, ...], rows_slice: slice, settings: RowSettings,
             grad_out: torch.Tensor | None) -> RowResult:
    """The loss (and, into ``grad_out``, the scaled student gradient) of one chunk's ``[r, V]`` logits
    blocks: the per-row contract of :mod:`aropd_kernels.backends` on a ``[1, r, V]`` view. ``teachers``:
    the partial and full views' blocks, or the one teacher's."""
    grad_scale = settings.row_scale[rows_slice] if grad_out is not None else None
    labels = None if settings.labels is None else settings.labels[rows_slice]
    partial, full = teachers if len(teachers) == 2 else (teachers[0], None)
    compute_rows = settings.compute_rows or backends.compute_rows
    return compute_rows(
        settings.backend, student.unsqueeze(0), partial.unsqueeze(0), None if full is None else full.unsqueeze(0),
        settings.row_temperature[rows_slice], settings.active[rows_slice], grad_scale,
        None if grad_out is None else grad_out.unsqueeze(0),
        lam=settings.lam, clip=settings.clip, beta=settings.beta, with_diagnostics=settings.with_diagnostics,
        labels=labels,
    )


def project(hidden: torch.Tensor, weight: SlabbedWeight, bias: torch.Tensor | None, projection: Projection,
            out: torch.Tensor, saved_tanh: torch.Tensor | None = None) -> None:
    """``out[m] = projection(hidden[m] Wᵀ + b)``: ``hidden`` ``[M, H]`` and ``out`` ``[M, V]`` in the logits'
    dtype (``saved_tanh``: see :meth:`Projection.finish`)."""
    for start, end in weight.slabs:
        slab = weight.slab(start, end)
        if bias is None:
            torch.mm(hidden, slab.t(), out=out[:, start:end])
        else:
            torch.addmm(bias[start:end], hidden, slab.t(), out=out[:, start:end])
    projection.finish(out, saved_tanh)


def teacher_logits(hiddens: tuple[torch.Tensor, ...], weight: SlabbedWeight, bias: torch.Tensor | None,
                   projection: Projection, stacked: torch.Tensor | None, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The teacher's logits blocks for one or more views of the same rows, into ``out``. With a ``stacked``
    buffer (float32 logits), one matmul per weight slab: the views' hidden states ``[r, H_t]`` are upcast
    into it, stacked. Without (half-precision logits), one matmul per view on its hidden states as given,
    so that each view's logits are those of the lm_head on its own rows."""
    n_rows = hiddens[0].shape[0]
    if stacked is None:
        blocks = tuple(out[index * n_rows:(index + 1) * n_rows] for index in range(len(hiddens)))
        for hidden, block in zip(hiddens, blocks):
            project(hidden, weight, bias, projection, block)
        return blocks
    stacked = stacked[: len(hiddens) * n_rows]
    for index, hidden in enumerate(hiddens):
        stacked[index * n_rows:(index + 1) * n_rows].copy_(hidden)
    block = out[: len(hiddens) * n_rows]
    project(stacked, weight, bias, projection, block)
    return tuple(block[index * n_rows:(index + 1) * n_rows] for index in range(len(hiddens)))


class StudentGradients:
    """Where a chunk's student-logits gradient goes: the hidden-state rows, and the weight and bias
    accumulators; each is None when its tensor does not require grad. ``reduce_hidden`` (or None) sums a
    chunk's float32 hidden-state gradient in place over the ranks that hold the other vocabulary shards."""

    def __init__(self, hidden: torch.Tensor | None, weight: WeightGradient | None, bias: torch.Tensor | None,
                 hidden_accumulator: torch.Tensor | None, reduce_hidden: Callable[[torch.Tensor], None] | None):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self._hidden_accumulator = hidden_accumulator  # [chunk rows, H] in the accumulation dtype
        self._reduce_hidden = reduce_hidden

    def add_chunk(self, grad: torch.Tensor, hidden: torch.Tensor, weight: SlabbedWeight, rows_slice: slice,
                  scale: float) -> None:
        """``grad`` ``[r, V]`` is the gradient w.r.t. ``hidden Wᵀ + b`` divided by ``scale``, in the logits'
        dtype, as are ``hidden`` and the weight's slabs: the matmuls run in it, the sums in the
        accumulators' dtype."""
        if self.hidden is not None:
            accumulator = self._hidden_accumulator[: grad.shape[0]]
            if weight.in_place and grad.dtype != accumulator.dtype:  # half-precision logits: one matmul
                accumulator.copy_(torch.mm(grad, weight.weight)).mul_(scale)
            else:
                accumulator.zero_()
                for start, end in weight.slabs:
                    accumulator.addmm_(grad[:, start:end], weight.slab(start, end), alpha=scale)
            if self._reduce_hidden is not None:
                self._reduce_hidden(accumulator)  # in the accumulation dtype: rounded once, after the sum
            self.hidden[rows_slice].copy_(accumulator)
        if self.weight is not None:
            self.weight.add(grad, hidden, scale)
        if self.bias is not None:
            self.bias.add_(grad.sum(0, dtype=self.bias.dtype), alpha=scale)


def chunks_with_active_rows(active: torch.Tensor, chunk_rows: int) -> list[bool]:
    """For each chunk of ``chunk_rows`` rows, whether any of its rows counts (one transfer to the host)."""
    flags = active.cpu()
    return [bool(flags[start:start + chunk_rows].any()) for start in range(0, flags.shape[0], chunk_rows)]


class ChunkBuffers:
    """The buffers of one chunk, allocated once per call and reused by every chunk: the student's logits
    (which receive their gradient in place), the softcap's tanh of them (``saved_tanh``, with a softcap
    and gradients), the teacher's blocks (one per view), and the hidden states upcast to the logits' dtype (the teacher's
    stacked, when ``stack_teacher``)."""

    def __init__(self, rows: int, student_hidden: torch.Tensor, teacher_views: int, teacher_size: int, vocab: int,
                 compute: torch.dtype, save_tanh: bool, stack_teacher: bool):
        def empty(*shape):
            return torch.empty(shape, dtype=compute, device=student_hidden.device)

        self.student_logits = empty(rows, vocab)
        self.teacher_logits = empty(teacher_views * rows, vocab)
        self.teacher_hidden = empty(teacher_views * rows, teacher_size) if stack_teacher else None
        self.student_hidden = empty(rows, student_hidden.shape[1]) if student_hidden.dtype != compute else None
        self.saved_tanh = empty(rows, vocab) if save_tanh else None

    def hidden(self, student_hidden: torch.Tensor) -> torch.Tensor:
        """The chunk's student hidden states in the compute dtype."""
        if self.student_hidden is None:
            return student_hidden
        upcast = self.student_hidden[: student_hidden.shape[0]]
        upcast.copy_(student_hidden)
        return upcast


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The accumulation dtype: float64 when any input is float64 (exact checks), float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def gradient_unit(row_scale: torch.Tensor) -> float:
    """The power of two nearest below the largest |row scale| (1 when all are 0 or one is not finite).

    With half-precision logits the row kernel writes the logits' gradient in half precision; formed at
    ``row_scale / unit``, its entries keep float16's precision where ``row_scale`` (e.g. 1/N) would push
    the small ones below float16's range. The matmuls multiply ``unit`` back in float32.
    """
    largest = row_scale.abs().max().item() if row_scale.numel() else 0.0
    return 2.0 ** math.floor(math.log2(largest)) if 0 < largest < math.inf else 1.0


def chunk_loop(student_hidden, student_weight, student_bias, teacher_hiddens: tuple[torch.Tensor, ...],
               teacher_weight, teacher_bias, projection: Projection, chunk_rows: int, settings: RowSettings,
               needs_grad: tuple[bool, bool, bool], reduce_hidden: Callable[[torch.Tensor], None] | None = None,
               half_logits: bool = False, sum_in_weight_dtype: bool = False):
    """(row losses [N], diagnostics [N_DIAGNOSTICS, N] or None, hidden, weight and bias gradients or None).

    The hidden states are ``[N, H]``; ``teacher_hiddens`` are the teacher's views (two, or one). Chunks
    without an active row are skipped: no matmul, loss 0, gradient 0. ``half_logits``: the logits and
    the matmuls are in the dtype of every input (bfloat16 or float16), the sums in float32.
    ``sum_in_weight_dtype``: the weight gradient is summed in its own bfloat16 (``accum_dtype=``).
    """
    n_rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    accumulate = compute_dtype(student_hidden, student_weight, student_bias, *teacher_hiddens, teacher_weight,
                               teacher_bias)
    logits = student_hidden.dtype if half_logits else accumulate
    device = student_hidden.device
    row_loss = torch.zeros(n_rows, dtype=accumulate, device=device)
    diagnostics = (torch.zeros(N_DIAGNOSTICS, n_rows, dtype=torch.float32, device=device)
                   if settings.with_diagnostics else None)
    student_w, teacher_w = SlabbedWeight(student_weight, logits), SlabbedWeight(teacher_weight, logits)
    student_b, teacher_b = (None if b is None else b.to(logits) for b in (student_bias, teacher_bias))
    rows_per_chunk = min(chunk_rows, max(n_rows, 1))
    gradients = StudentGradients(
        hidden=(torch.zeros(student_hidden.shape, dtype=ops.gradient_dtype(student_hidden.dtype), device=device)
                if needs_grad[0] else None),
        weight=WeightGradient(student_weight, accumulate, logits, sum_in_weight_dtype) if needs_grad[1] else None,
        bias=torch.zeros(vocab, dtype=accumulate, device=device) if needs_grad[2] else None,
        hidden_accumulator=(torch.empty(rows_per_chunk, student_hidden.shape[1], dtype=accumulate, device=device)
                            if needs_grad[0] else None),
        reduce_hidden=reduce_hidden,
    )
    compute_grad = any(needs_grad)
    grad_scale = projection.scale
    if compute_grad and half_logits:
        unit = gradient_unit(settings.row_scale[settings.active])
        settings = settings._replace(row_scale=settings.row_scale / unit)
        grad_scale *= unit
    active_chunks = chunks_with_active_rows(settings.active, rows_per_chunk)
    buffers = None
    if any(active_chunks):
        buffers = ChunkBuffers(rows_per_chunk, student_hidden, len(teacher_hiddens), teacher_weight.shape[1], vocab,
                               logits, save_tanh=compute_grad and projection.softcap is not None,
                               stack_teacher=not half_logits)
    for index, start in enumerate(range(0, n_rows, rows_per_chunk)):
        if not active_chunks[index]:
            continue
        rows_slice = slice(start, min(start + rows_per_chunk, n_rows))
        count = rows_slice.stop - start
        hidden = buffers.hidden(student_hidden[rows_slice])
        student = buffers.student_logits[:count]
        saved_tanh = None if buffers.saved_tanh is None else buffers.saved_tanh[:count]
        project(hidden, student_w, student_b, projection, student, saved_tanh)
        teachers = teacher_logits(tuple(h[rows_slice] for h in teacher_hiddens), teacher_w, teacher_b, projection,
                                  buffers.teacher_hidden, buffers.teacher_logits)
        grad = student if compute_grad else None  # the row kernel writes the gradient over the logits
        result = row_step(student, teachers, rows_slice, settings, grad)
        row_loss[rows_slice] = result.row_loss
        if diagnostics is not None:
            diagnostics[:, rows_slice] = result.diagnostics
        if compute_grad:
            projection.chain(grad, saved_tanh)
            gradients.add_chunk(grad, hidden, student_w, rows_slice, grad_scale)
    del buffers, student_w, teacher_w  # freed before the weight gradient is converted
    weight_grad = None if gradients.weight is None else gradients.weight.result()
    bias_grad = None if gradients.bias is None else gradients.bias.to(ops.gradient_dtype(student_bias.dtype))
    return row_loss, diagnostics, gradients.hidden, weight_grad, bias_grad


# --- under autograd ----------------------------------------------------------------------------------


def fused_linear_outputs(student_hidden, student_weight, student_bias, teacher_hidden, full_hidden, teacher_weight,
                         teacher_bias, row_temperature, active, row_scale, labels, logit_scale, logit_softcap,
                         chunk_rows, half_logits, sum_in_weight_dtype, lam, clip, beta, reduce, grad_hidden,
                         grad_weight, grad_bias, with_diagnostics, backend, compute_rows=None, reduce_hidden=None):
    """The computation of :func:`fused_linear_op` (its arguments, then the two hooks of a vocabulary shard:
    the per-row contract's function and the hidden-state gradient's sum over ranks)."""
    settings = RowSettings(row_temperature, active, row_scale, labels, lam, clip, beta, with_diagnostics, backend,
                           compute_rows)
    teacher_hiddens = (teacher_hidden,) if full_hidden is None else (teacher_hidden, full_hidden)
    row_loss, diagnostics, *gradients = chunk_loop(
        student_hidden, student_weight, student_bias, teacher_hiddens, teacher_weight, teacher_bias,
        Projection(logit_scale, logit_softcap), chunk_rows, settings, (grad_hidden, grad_weight, grad_bias),
        reduce_hidden, half_logits, sum_in_weight_dtype)
    return (ops.scaled_loss(row_loss, row_scale, reduce),
            student_hidden.new_empty(0, dtype=torch.float32) if diagnostics is None else diagnostics,
            *(student_hidden.new_empty(0) if gradient is None else gradient for gradient in gradients))


@torch.library.custom_op("aropd::fused_linear_anchored_residual_kl", mutates_args=())
def fused_linear_op(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    full_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    row_temperature: torch.Tensor,
    active: torch.Tensor,
    row_scale: torch.Tensor,
    labels: torch.Tensor | None,
    logit_scale: float,
    logit_softcap: float | None,
    chunk_rows: int,
    half_logits: bool,
    sum_in_weight_dtype: bool,
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
    states. ``teacher_hidden`` is the partial view, or the one teacher when ``full_hidden`` is None.
    ``half_logits``: logits and matmuls in the inputs' one dtype (``logits_dtype=``), else float32.
    ``sum_in_weight_dtype``: the weight gradient summed in its bfloat16 (``accum_dtype=``), else float32.
    ``loss`` is ``sum(row_scale * D)`` when ``reduce`` else ``row_scale * D`` per row; each gradient is
    that of ``sum(row_scale * D)``, in :func:`ops.gradient_dtype` of its tensor, or an empty tensor when
    not asked for; so are the diagnostics."""
    return fused_linear_outputs(
        student_hidden, student_weight, student_bias, teacher_hidden, full_hidden, teacher_weight, teacher_bias,
        row_temperature, active, row_scale, labels, logit_scale, logit_softcap, chunk_rows, half_logits,
        sum_in_weight_dtype, lam, clip, beta, reduce, grad_hidden, grad_weight, grad_bias, with_diagnostics, backend)


@fused_linear_op.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, full_hidden, teacher_weight, teacher_bias,
      row_temperature, active, row_scale, labels, logit_scale, logit_softcap, chunk_rows, half_logits,
      sum_in_weight_dtype, lam, clip, beta, reduce, grad_hidden, grad_weight, grad_bias, with_diagnostics, backend):
    n_rows = student_hidden.shape[0]
    compute = compute_dtype(student_hidden, student_weight, student_bias, teacher_hidden, full_hidden,
                            teacher_weight, teacher_bias)

    def gradient(wanted, tensor):
        if not wanted:
            return student_hidden.new_empty(0)
        return tensor.new_empty(tensor.shape, dtype=ops.gradient_dtype(tensor.dtype))

    return (student_hidden.new_empty(() if reduce else (n_rows,), dtype=compute),
            student_hidden.new_empty((N_DIAGNOSTICS, n_rows) if with_diagnostics else (0,), dtype=torch.float32),
            gradient(grad_hidden, student_hidden), gradient(grad_weight, student_weight),
            gradient(grad_bias, student_bias))


_N_OP_INPUTS = 25
_STUDENT_INPUTS = (0, 1, 2)  # student_hidden, student_weight, student_bias: the inputs gradients go to
_RECOMPUTE_TENSORS = slice(0, 10)  # the tensors up to row_scale (the labels serve the diagnostics only)
_SETTINGS, _REDUCE, _WANTED, _BACKEND = slice(11, 19), 19, slice(20, 23), 24


def _setup_context(ctx, inputs, output):
    ctx.reduce = inputs[_REDUCE]
    ctx.computed = inputs[_WANTED]  # grad_hidden, grad_weight, grad_bias
    ctx.dtypes = tuple(None if inputs[i] is None else inputs[i].dtype for i in _STUDENT_INPUTS)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.run = fused_linear_op  # what backward reruns; the eager twin runs its own
    if ctx.reduce:  # the gradients were computed in the forward pass; backward scales them
        ctx.save_for_backward(*output[2:])
        return
    # per-token losses: each row's incoming gradient enters the weight gradient, so backward reruns the loop
    ctx.save_for_backward(*inputs[_RECOMPUTE_TENSORS])
    ctx.settings = (*inputs[_SETTINGS], inputs[_BACKEND])


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
    (student_hidden, student_weight, student_bias, teacher_hidden, full_hidden, teacher_weight, teacher_bias,
     row_temperature, active, row_scale) = ctx.saved_tensors
    logit_scale, logit_softcap, chunk_rows, half_logits, sum_in_weight_dtype, lam, clip, beta, backend = ctx.settings
    scale = row_scale * grad_loss.to(torch.float32)
    wanted = [ctx.needs_input_grad[i] for i in _STUDENT_INPUTS]
    _, _, *stored = ctx.run(
        student_hidden, student_weight, student_bias, teacher_hidden, full_hidden, teacher_weight, teacher_bias,
        row_temperature, active & (scale != 0), scale, None, logit_scale, logit_softcap, chunk_rows, half_logits,
        sum_in_weight_dtype, lam, clip, beta, True, wanted[0], wanted[1], wanted[2] and student_bias is not None, False,
        backend)
    return [gradient.to(dtype) if want else None for gradient, want, dtype in zip(stored, wanted, ctx.dtypes)]


fused_linear_op.register_autograd(_backward, setup_context=_setup_context)


class EagerFusedLinear(torch.autograd.Function):
    """:func:`fused_linear_op` under a plain autograd.Function, eager only, for a vocabulary shard: its
    rows function and hidden-state reduction communicate, which a ``torch.library`` op cannot take as
    arguments. The same outputs and backward rules; ``apply`` takes the op's arguments, then
    ``compute_rows`` and ``reduce_hidden`` (see :func:`fused_linear_outputs`)."""

    @staticmethod
    def forward(ctx, *arguments):
        *inputs, compute_rows, reduce_hidden = arguments
        run = functools.partial(fused_linear_outputs, compute_rows=compute_rows, reduce_hidden=reduce_hidden)
        output = run(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.run = run
        return output

    @staticmethod
    def backward(ctx, grad_loss, *grad_outputs):
        return _backward(ctx, grad_loss) + (None, None)


# --- the public entry points ----------------------------------------------------------------------------


class LinearCall(NamedTuple):
    """A validated call: the op's arguments in parts, and what shaping its results needs."""

    tensors: tuple  # student hidden [N, H_s], weight, bias; teacher hidden [N, H_t], full [N, H_t] or None, weight, bias
    plan: rows.RowPlan
    projection: tuple[float, float | None]  # logit_scale, logit_softcap
    chunk_rows: int
    logits_dtype: torch.dtype  # of the logits blocks: the logits_dtype keyword, or float32 (float64)
    sum_in_weight_dtype: bool  # accum_dtype=torch.bfloat16: the weight gradient summed in bfloat16
    settings: tuple[float, float, float, bool]  # lam, clip, beta, reduce
    stored_gradients: tuple[bool, bool, bool]  # hidden, weight, bias: computed in the forward pass
    return_diagnostics: bool
    backend: str  # resolved
    batch_shape: torch.Size
    with_labels: bool

    def op_arguments(self) -> tuple:
        lam, clip, beta, reduce = self.settings
        half_logits = self.logits_dtype in HALF_LOGITS_DTYPES
        return (*self.tensors, *self.plan, *self.projection, self.chunk_rows, half_logits, self.sum_in_weight_dtype,
                lam, clip, beta, reduce, *self.stored_gradients, self.return_diagnostics, self.backend)


def prepare_call(student_hidden, student_weight, teacher_hiddens: tuple, teacher_weight, names, *, student_bias,
                 teacher_bias, logit_scale, logit_softcap, chunk_size, logits_dtype, accum_dtype, lam, clip, beta,
                 temperature, labels,
                 ignore_index, mask, weights, reduction, num_items_in_batch, return_diagnostics, backend,
                 whole_vocabulary: bool = True) -> LinearCall:
    """Validates every argument (before any matmul or kernel) and plans the rows.

    ``whole_vocabulary=False``: the weights are a vocabulary shard, whose labels are checked by the
    caller once the whole vocabulary is known.
    """
    check_inputs(student_hidden, student_weight, teacher_hiddens, teacher_weight, student_bias, teacher_bias, names)
    rows.check_settings(lam, clip, beta, reduction, backend, num_items_in_batch)
    check_projection(logit_scale, logit_softcap, chunk_size)
    check_logits_dtype(logits_dtype, {"student_hidden": student_hidden, "student_weight": student_weight,
                                      **dict(zip(names[1:], teacher_hiddens)), "teacher_weight": teacher_weight,
                                      "student_bias": student_bias, "teacher_bias": teacher_bias})
    check_accum_dtype(accum_dtype, student_weight)
    sum_in_weight_dtype = accum_dtype == torch.bfloat16
    batch_shape, vocab = student_hidden.shape[:-1], student_weight.shape[0]
    device = student_hidden.device
    label_vocab = vocab if return_diagnostics and whole_vocabulary else None
    plan = rows.plan_rows(batch_shape, device, temperature=temperature, labels=labels, ignore_index=ignore_index,
                          mask=mask, weights=weights, reduction=reduction, num_items_in_batch=num_items_in_batch,
                          label_vocab=label_vocab)
    blocks_dtype = logits_dtype or compute_dtype(student_hidden, student_weight, *teacher_hiddens, teacher_weight,
                                                 student_bias, teacher_bias)
    name = backends.resolve(backend, device, (blocks_dtype,))
    if chunk_size is None:
        chunk_size = (batch_shape.numel() if name == "reference"
                      else default_chunk_rows(student_hidden.shape[-1], logits_dtype, sum_in_weight_dtype))
    reduce = reduction != "none"
    grad_enabled = torch.is_grad_enabled()
    wants = [grad_enabled and t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)]
    flat = [h.reshape(-1, h.shape[-1]) for h in (student_hidden, *teacher_hiddens)]
    tensors = (flat[0], student_weight, student_bias, flat[1], flat[2] if len(flat) == 3 else None, teacher_weight,
               teacher_bias)
    return LinearCall(
        tensors, plan, (float(logit_scale), None if logit_softcap is None else float(logit_softcap)),
        max(chunk_size, 1), blocks_dtype, sum_in_weight_dtype, (float(lam), float(clip), float(beta), reduce),
        tuple(reduce and want for want in wants),  # per-token losses: gradients are computed in backward
        return_diagnostics, name, batch_shape, labels is not None)


def run_call(call: LinearCall, compute_rows=None, reduce_hidden=None):
    """The loss and the diagnostics (a Diagnostics, or None) of a prepared call, shaped for the caller.

    ``compute_rows`` and ``reduce_hidden`` are a vocabulary shard's hooks (:func:`fused_linear_outputs`);
    that path runs eagerly.
    """
    if compute_rows is None and reduce_hidden is None:
        loss, diagnostics, *_ = fused_linear_op(*call.op_arguments())
    else:
        loss, diagnostics, *_ = EagerFusedLinear.apply(*call.op_arguments(), compute_rows, reduce_hidden)
    return shaped_result(loss, diagnostics, call.batch_shape, reduce=call.settings[3],
                         return_diagnostics=call.return_diagnostics, one_teacher=call.tensors[4] is None,
                         with_labels=call.with_labels)


def _fused_linear(student_hidden, student_weight, teacher_hiddens, teacher_weight, names, *, process_group,
                  reduce_hidden_grad, **keywords):
    """Both entry points: validate, plan the rows, run the op, shape the results; an lm_head split along
    the vocabulary across ranks goes to :mod:`aropd_kernels.distributed`."""
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}.")
    if process_group is not None:
        from . import distributed  # the only module that calls torch.distributed

        loss, diagnostics = distributed.sharded_fused_linear(
            student_hidden, student_weight, teacher_hiddens, teacher_weight, names, process_group,
            reduce_hidden_grad, **keywords)
    else:
        loss, diagnostics = run_call(prepare_call(student_hidden, student_weight, teacher_hiddens, teacher_weight,
                                                  names, **keywords))
    return loss if diagnostics is None else (loss, diagnostics)


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
    logits_dtype: torch.dtype | None = None,
    accum_dtype: torch.dtype | None = None,
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
    process_group=None,
    reduce_hidden_grad: bool = True,
):
    """:func:`aropd_kernels.anchored_residual_kl` of the logits
    ``softcap · tanh(scale · (h Wᵀ + b) / softcap)`` (``scale · (h Wᵀ + b)`` without a softcap), computed
    a chunk of rows at a time from the hidden states ``[..., H]`` and lm_head weights ``[V, H]``, so that
    no N×V tensor is ever held.

    The teacher's two views share ``teacher_weight`` and ``teacher_bias``; its hidden size may differ from
    the student's. Gradients go to ``student_hidden``, ``student_weight`` and ``student_bias``, whichever
    require grad. ``chunk_size`` is the number of rows per chunk (None: :func:`default_chunk_rows`).
    ``logits_dtype``: None computes the logits in float32 from the tensors as given; ``torch.bfloat16`` or
    ``torch.float16``, the dtype of every hidden state, weight and bias, runs the matmuls in it and
    rounds the logits to it, as ``F.linear`` in that dtype (the model's own logits) does, each chunk's
    rows at a time; the weight and bias gradients are still summed in float32.
    ``accum_dtype``: None (or ``torch.float32``) sums the weight gradient over the chunks in float32 and
    rounds it once; ``torch.bfloat16`` (a bfloat16 ``student_weight``) sums it in the bfloat16 gradient
    itself, one rounding per chunk, and saves the 4·V·H bytes of the float32 sum.
    ``process_group``: the weights and biases are this rank's contiguous vocabulary shard ``[V_r, H]``
    (hidden states replicated); ``reduce_hidden_grad`` sums the hidden states' gradient over the group
    (False: each rank keeps its shard's part, for a column-parallel layer that reduces it).
    Every other keyword is that of ``anchored_residual_kl``. See docs/fused_linear.md.
    """
    return _fused_linear(
        student_hidden, student_weight, (partial_teacher_hidden, full_teacher_hidden), teacher_weight, ANCHORED_NAMES,
        student_bias=student_bias, teacher_bias=teacher_bias, logit_scale=logit_scale, logit_softcap=logit_softcap,
        chunk_size=chunk_size, logits_dtype=logits_dtype, accum_dtype=accum_dtype, lam=lam, clip=clip, beta=beta,
        temperature=temperature, labels=labels,
        ignore_index=ignore_index, mask=mask, weights=weights, reduction=reduction,
        num_items_in_batch=num_items_in_batch, return_diagnostics=return_diagnostics, backend=backend,
        process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)


def fused_linear_distillation_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    chunk_size: int | None = None,
    logits_dtype: torch.dtype | None = None,
    accum_dtype: torch.dtype | None = None,
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
    process_group=None,
    reduce_hidden_grad: bool = True,
):
    """:func:`aropd_kernels.distillation_divergence` (one teacher, ``q = softmax(teacher logits / T)``) of
    the logits of the student's and the teacher's hidden states and lm_head weights, computed a chunk of
    rows at a time as in :func:`fused_linear_anchored_residual_kl`: one teacher matmul and two logits
    blocks per chunk. Every keyword is that function's, less ``lam`` and ``clip``.
    """
    return _fused_linear(
        student_hidden, student_weight, (teacher_hidden,), teacher_weight, ONE_TEACHER_NAMES,
        student_bias=student_bias, teacher_bias=teacher_bias, logit_scale=logit_scale, logit_softcap=logit_softcap,
        chunk_size=chunk_size, logits_dtype=logits_dtype, accum_dtype=accum_dtype, lam=0.0, clip=math.inf, beta=beta,
        temperature=temperature, labels=labels,
        ignore_index=ignore_index, mask=mask, weights=weights, reduction=reduction,
        num_items_in_batch=num_items_in_batch, return_diagnostics=return_diagnostics, backend=backend,
        process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)


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


class FusedLinearDistillationDivergence(FusedLinearAnchoredResidualKL):
    """Module form of :func:`fused_linear_distillation_divergence`; the constructor takes its keyword arguments."""

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, **overrides):
        return fused_linear_distillation_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                    **{**self.kwargs, **overrides})
