"""From the public keywords to what a backend sees: validation, per-row plan, row views.

Every entry point (:mod:`aropd_kernels.functional`, :mod:`aropd_kernels.fused_linear`) validates its
inputs here, before any kernel runs, and derives the same per-row tensors from the same keywords:
which rows count, their temperature, and each row's share of the reduced loss.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch

from . import backends

REDUCTIONS = ("none", "sum", "batchmean", "seq_mean")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class RowPlan(NamedTuple):
    """The per-row tensors of the backend contract (:mod:`aropd_kernels.backends`), flat ``[N]``, in
    the order the ops take them."""

    row_temperature: torch.Tensor  # float32, > 0
    active: torch.Tensor  # bool: rows that count
    row_scale: torch.Tensor  # float32: weight times the reduction's normalizer; 0 on skipped rows
    token_labels: torch.Tensor | None  # int64: the label of each active row, for its log-probabilities


def plan_rows(batch_shape: torch.Size, device: torch.device, *, temperature, labels, ignore_index, mask, weights,
              reduction: str, num_items_in_batch, label_vocab: int | None = None) -> RowPlan:
    """Validates the per-token keywords against ``batch_shape`` and derives the rows' plan.

    Call :func:`check_settings` first (it validates ``reduction`` and ``num_items_in_batch``).
    ``label_vocab``: the vocabulary size V when the labels' log-probabilities are wanted; the labels of
    active rows must then lie in ``[0, V)``.
    """
    if reduction == "seq_mean" and len(batch_shape) != 2:
        raise ValueError(
            f"reduction='seq_mean' needs a batch of sequences, [B, T, V] logits (or [B, T, H] hidden states), "
            f"got leading shape {tuple(batch_shape)}; reshape to [batch, sequence, ...] or use reduction='batchmean'."
        )
    active = _active_rows(labels, ignore_index, mask, batch_shape, device)
    row_temperature = _row_temperature(temperature, batch_shape, device)
    row_weights = _row_weights(weights, batch_shape, device)
    row_scale = _row_scale(reduction, row_weights, active, batch_shape, num_items_in_batch)
    token_labels = None
    if labels is not None and label_vocab is not None:
        token_labels = row_labels(labels, active, label_vocab, device)
    return RowPlan(row_temperature, active, row_scale, token_labels)


def row_labels(labels: torch.Tensor, active: torch.Tensor, vocab: int, device) -> torch.Tensor:
    """int64 [N]: each active row's label (checked to lie in [0, V)), -1 on skipped rows."""
    flat = labels.to(device=device, dtype=torch.int64).reshape(-1)
    if not torch.compiler.is_compiling():
        outside = active & ((flat < 0) | (flat >= vocab))
        if bool(outside.any()):
            raise ValueError(
                f"labels must lie in [0, {vocab}) (the vocabulary) or equal ignore_index; found "
                f"{flat[outside][0].item()} on a counted token. Set such tokens to ignore_index or mask them."
            )
    return torch.where(active, flat, torch.full_like(flat, -1))


# --- validation: every check runs before any kernel ----------------------------------------------

ANCHORED_NAMES = ("student_logits", "partial_teacher_logits", "full_teacher_logits")
ONE_TEACHER_NAMES = ("student_logits", "teacher_logits")


def check_float_tensor(name: str, tensor, kind: str) -> None:
    """TypeError unless ``tensor`` is a tensor of a dtype the kernels take; ``kind`` names what it holds."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.dtype not in LOGIT_DTYPES:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}; {kind} must be float32, bfloat16 or float16 "
            "(float64 for reference checks). Cast with .float()."
        )


def refuse_teacher_grad(name: str, tensor: torch.Tensor) -> None:
    if tensor.requires_grad:
        raise ValueError(
            f"{name} requires grad, but teachers are constants here: pass {name}.detach() or "
            "compute the teacher under torch.no_grad()."
        )


def check_logits(tensors: tuple[torch.Tensor, ...], names: tuple[str, ...] = ANCHORED_NAMES) -> None:
    """The student and its teachers: tensors of logits dtypes, one shape and device; teachers constant."""
    for name, tensor in zip(names, tensors):
        check_float_tensor(name, tensor, "logits")
        if tensor.dim() == 0 or tensor.shape[-1] == 0:
            raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(tensor.shape)}.")
    student = tensors[0]
    for name, tensor in zip(names[1:], tensors[1:]):
        if tensor.shape != student.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but student_logits has {tuple(student.shape)}; "
                "align the teacher's logits to the student's completion tokens (see docs/integration.md)."
            )
        if tensor.device != student.device:
            raise ValueError(f"{name} is on {tensor.device} but student_logits is on {student.device}; move it with .to().")
        refuse_teacher_grad(name, tensor)


def _is_number(value) -> bool:
    """A real number; under ``torch.compile(dynamic=True)`` Python floats arrive as symbolic ones."""
    return not isinstance(value, bool) and isinstance(value, (Real, torch.SymFloat, torch.SymInt))


def is_finite(value) -> bool:
    """math.isfinite for plain and symbolic numbers (NaN fails the first comparison)."""
    return value == value and -math.inf < value < math.inf


def check_real(name: str, value, condition: str, ok) -> None:
    """TypeError unless ``value`` is a number; ValueError unless ``ok(value)``."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}.")
    if not ok(value):
        raise ValueError(f"{name} must be {condition}, got {value!r}.")


def check_settings(lam, clip, beta, reduction, backend, num_items_in_batch) -> None:
    check_real("lam", lam, "a finite number >= 0 (1.0 is the paper's default)", lambda x: is_finite(x) and x >= 0)
    check_real("clip", clip, "> 0 (math.inf disables clipping; 5.0 is the paper's default)", lambda x: x > 0)
    check_real("beta", beta, "in [0, 1] (1 reverse KL, 0 forward KL, between: JSD)", lambda x: 0 <= x <= 1)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}.")
    if num_items_in_batch is not None:
        _check_num_items(num_items_in_batch, reduction)


def _check_num_items(num_items_in_batch, reduction: str) -> None:
    if reduction not in ("batchmean", "seq_mean"):
        raise ValueError(
            f"num_items_in_batch only applies to reduction='batchmean' (tokens) or 'seq_mean' (sequences), "
            f"got reduction={reduction!r}; drop it or switch the reduction."
        )
    counted = "tokens" if reduction == "batchmean" else "sequences"
    condition = f"a finite number > 0 (the number of {counted} in the whole batch)"
    if not isinstance(num_items_in_batch, torch.Tensor):
        check_real("num_items_in_batch", num_items_in_batch, condition, lambda x: is_finite(x) and x > 0)
        return
    if num_items_in_batch.numel() != 1:
        raise ValueError("num_items_in_batch must be a number or a one-element tensor.")
    if num_items_in_batch.requires_grad:
        raise ValueError("num_items_in_batch must not require grad; pass num_items_in_batch.detach().")
    if not torch.compiler.is_compiling() and not bool(
            (torch.isfinite(num_items_in_batch) & (num_items_in_batch > 0)).all()):
        raise ValueError(f"num_items_in_batch must be {condition}, got {num_items_in_batch.item()!r}.")


def check_inplace(student: torch.Tensor, inplace_grad: bool, compute_grad: bool) -> None:
    if not inplace_grad:
        return
    if student.is_leaf and student.requires_grad:
        raise ValueError(
            "inplace_grad=True would overwrite a leaf tensor that requires grad; use it on logits "
            "produced by the model (a non-leaf), or set inplace_grad=False."
        )
    base = student._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise ValueError(
            "inplace_grad=True would overwrite a leaf tensor that requires grad: student_logits is a view "
            "of one (e.g. leaf[:, :-1]); use it on logits produced by the model (a non-leaf), or set "
            "inplace_grad=False."
        )
    if not compute_grad:
        return
    if torch.compiler.is_compiling():
        raise ValueError("inplace_grad=True is eager-only; set inplace_grad=False under torch.compile.")
    if student.dtype == torch.float16:
        raise ValueError(
            "inplace_grad=True with float16 logits would round the gradient to float16 in the forward pass, "
            "before a GradScaler's loss scale, flushing entries below 6e-8 to zero; set inplace_grad=False "
            "(the gradient is then kept in float32 until backward) or use bfloat16 logits."
        )


def check_per_token(name: str, tensor, batch_shape, dtypes: str, ok, fix: str = "") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(batch_shape)}, got {type(tensor).__name__}.")
    if tensor.shape != batch_shape:
        raise ValueError(
            f"{name} must have the logits' shape without the vocabulary dimension, {tuple(batch_shape)}, "
            f"got {tuple(tensor.shape)}."
        )
    if not ok(tensor.dtype):
        raise TypeError(f"{name} must be a {dtypes} tensor, got {tensor.dtype}{fix}.")


def _active_rows(labels, ignore_index, mask, batch_shape, device) -> torch.Tensor:
    """bool [N]: rows that count. labels == ignore_index and mask == False are skipped."""
    active = torch.ones(batch_shape.numel(), dtype=torch.bool, device=device)
    if labels is not None:
        check_per_token("labels", labels, batch_shape, "integer",
                         lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool)
        active &= labels.to(device).reshape(-1) != ignore_index
    if mask is not None:
        check_per_token("mask", mask, batch_shape, "bool", lambda d: d == torch.bool,
                         fix=" (an integer attention mask: pass mask.bool())")
        active &= mask.to(device).reshape(-1)
    return active


def _row_temperature(temperature, batch_shape, device) -> torch.Tensor:
    n_rows = batch_shape.numel()
    if isinstance(temperature, torch.Tensor):
        check_per_token("temperature", temperature, batch_shape, "floating", lambda d: d.is_floating_point)
        if temperature.requires_grad:
            raise ValueError("temperature must not require grad; pass temperature.detach().")
        if not torch.compiler.is_compiling() and not bool(((temperature > 0) & torch.isfinite(temperature)).all()):
            raise ValueError("temperature must be > 0 and finite for every token; found entries <= 0, inf or NaN.")
        return temperature.detach().to(device=device, dtype=torch.float32).reshape(n_rows)
    check_real("temperature", temperature, "> 0 and finite", lambda x: is_finite(x) and x > 0)
    return torch.full((n_rows,), float(temperature), dtype=torch.float32, device=device)


def _row_weights(weights, batch_shape, device) -> torch.Tensor | None:
    if weights is None:
        return None
    check_per_token("weights", weights, batch_shape, "floating", lambda d: d.is_floating_point)
    if weights.requires_grad:
        raise ValueError(
            "weights requires grad, but gradients flow to the student logits only: pass weights.detach() "
            "(to learn per-token weights, multiply the reduction='none' loss by them instead)."
        )
    return weights.detach().to(device=device, dtype=torch.float32).reshape(-1)


# --- rows and reductions ---------------------------------------------------------------------------


def _row_groups(logits: torch.Tensor) -> list[int]:
    """Leading dimensions where a new group starts: within a group dimensions merge without a copy."""
    starts, group_stride = [], None  # stride of the group's innermost dimension of size > 1
    for dim in range(logits.dim() - 1):
        size, stride = logits.shape[dim], logits.stride(dim)
        if size == 1:
            continue
        if group_stride is None or group_stride != stride * size:
            starts.append(dim)
        group_stride = stride
    return starts


def as_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The same [B, T, V] view of every tensor (unit stride in V), copying only where none exists.

    All three must share B and T, since a kernel maps row i to (i // T, i % T) in each of them.
    """
    tensors = [t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in tensors]
    vocab, batch_shape = tensors[0].shape[-1], tensors[0].shape[:-1]
    # a boundary between leading dimensions survives if any tensor cannot merge across it
    boundaries = sorted({start for t in tensors for start in _row_groups(t)} - {0})
    if len(boundaries) > 1:  # no common [B, T] view: copy
        tensors = [t.contiguous() for t in tensors]
        boundaries = []
    split = boundaries[0] if boundaries else 0
    rows_shape = (math.prod(batch_shape[:split]), math.prod(batch_shape[split:]))
    return [t.reshape(*rows_shape, vocab) for t in tensors]


def _global_count(num_items_in_batch, local_count: torch.Tensor) -> torch.Tensor | float:
    """The reduction's denominator: ``num_items_in_batch`` when given (the count over every micro-batch
    and rank), else the count of this call."""
    if num_items_in_batch is None:
        return local_count
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(device=local_count.device, dtype=torch.float32).reshape(())
    return float(num_items_in_batch)


def _row_scale(reduction, row_weights, active, batch_shape, num_items_in_batch) -> torch.Tensor:
    """Per-row factor turning D_i into its share of the loss: weight times the reduction's normalizer."""
    scale = active.to(torch.float32)
    if row_weights is not None:
        scale = scale * row_weights
    if reduction == "batchmean":
        tokens = active.sum().clamp(min=1)
        scale = scale / _global_count(num_items_in_batch, tokens)
    elif reduction == "seq_mean":
        n_sequences, seq_len = batch_shape[0], batch_shape[1]
        tokens_per_sequence = active.view(n_sequences, seq_len).sum(-1, keepdim=True)
        sequences = (tokens_per_sequence > 0).sum().clamp(min=1)  # sequences without an active token are skipped
        scale = scale.view(n_sequences, seq_len) / tokens_per_sequence.clamp(min=1)
        scale = (scale / _global_count(num_items_in_batch, sequences)).reshape(-1)
    return scale
