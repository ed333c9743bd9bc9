"""Launch of the Triton kernels: the per-row contract of :mod:`aropd_kernels.backends` and the shard
stages of :mod:`aropd_kernels.shards`."""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import triton

from .. import shards
from ..backends import N_DIAGNOSTICS, RowResult
from .kernels import (
    FORWARD_KL,
    JSD,
    REVERSE_KL,
    anchored_residual_rows_kernel,
    shard_gradient_kernel,
    shard_mixture_sums_kernel,
    shard_normalizers_kernel,
    shard_target_sums_kernel,
)

# Up to 2048 elements per block, 4 per thread up to 8 warps (8 per thread only in the widest block):
# enough loads in flight to stream a row while every sweep's per-lane accumulators stay in
# registers. The compile report holds each configuration to zero spills: ptxas spilled the 8-per-
# thread blocks of 512 and 1024 elements (2 and 4 warps), so those are not used.
MAX_BLOCK_V = 2048
MIN_BLOCK_V = 256
MAX_WARPS = 8
LANES_PER_WARP = 128

# Fused multiply-adds are on explicitly (Triton 3.10 changes the default); they only round less.
ENABLE_FP_FUSION = True
# Left to itself, ptxas trades registers for occupancy and then spills: with Triton 3.7.1 it held anchored
# 2048-lane kernels at 80 registers (8 bytes spilled) and the one-teacher reverse-KL gradient kernel at
# 1024 lanes at 48 (12 bytes); with 3.9.0 the anchored reverse-KL gradient kernel with diagnostics at 512
# lanes (bfloat16, sm_90) at 80 (28 bytes). An explicit limit at the hardware's maximum, on every block,
# turns that trade off (no kernel here needs more than about 200 registers).
MAX_REGISTERS = 255

# The kernels work in base 2: clip goes in as clip * log2(e), and the shard stages' logs are converted here.
LN_2, LOG2_E = math.log(2.0), math.log2(math.e)


class LaunchConfig(NamedTuple):
    block_v: int
    num_warps: int

    def compile_options(self) -> dict:
        """The launch's compile options, which the compile report compiles with too."""
        return {"num_warps": self.num_warps, "enable_fp_fusion": ENABLE_FP_FUSION, "maxnreg": MAX_REGISTERS}


def launch_config(vocab: int) -> LaunchConfig:
    """Block size and warps from V alone: a heuristic, never autotuned (the launch may write into
    the student's buffer, and an autotuner would re-run it on overwritten data)."""
    block_v = min(max(triton.next_power_of_2(vocab), MIN_BLOCK_V), MAX_BLOCK_V)
    return LaunchConfig(block_v, min(MAX_WARPS, block_v // LANES_PER_WARP))


def all_launch_configs() -> list[LaunchConfig]:
    """Every configuration :func:`launch_config` can return (for the compile report)."""
    configs, block_v = [], MIN_BLOCK_V
    while block_v <= MAX_BLOCK_V:
        configs.append(launch_config(block_v))
        block_v *= 2
    return configs


def divergence_kind(beta: float) -> int:
    """The kernel's constexpr branch: beta = 1 reverse KL, beta = 0 forward KL, in between JSD."""
    if beta == 1.0:
        return REVERSE_KL.value
    if beta == 0.0:
        return FORWARD_KL.value
    return JSD.value


def _inputs(student, partial, full) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...], bool]:
    """The kernels' three input pointers and their (batch, row) strides, and ONE_TEACHER: for one teacher
    the teacher stands in for the full teacher, which the kernels then never read."""
    one_teacher = full is None
    inputs = (student, partial, partial if one_teacher else full)
    return inputs, tuple(stride for x in inputs for stride in x.stride()[:2]), one_teacher


def _row_labels(labels: torch.Tensor | None, n_rows: int, device: torch.device) -> torch.Tensor:
    """The rows' labels for the kernels; without labels every row's is -1 (outside [0, V): log-probabilities 0)."""
    if labels is None:
        return torch.full((n_rows,), -1, dtype=torch.int64, device=device)
    return labels.contiguous()


def _launch(kernel, student: torch.Tensor, *args, **constexprs) -> None:
    """One program per row, with the launch configuration of V; on the logits' CUDA device (Triton
    launches on the current one)."""
    n_rows, _, vocab = _row_shape(student)
    config = launch_config(vocab)
    with torch.cuda.device(student.device) if student.is_cuda else contextlib.nullcontext():
        kernel[(n_rows,)](*args, **constexprs, BLOCK_V=config.block_v, **config.compile_options())


def _row_shape(student: torch.Tensor) -> tuple[int, int, int]:
    """(N, rows per batch, V) of a ``[B, T, V]`` view."""
    n_batch, rows_per_batch, vocab = student.shape
    return n_batch * rows_per_batch, rows_per_batch, vocab


def compute_rows(
    student: torch.Tensor,
    partial: torch.Tensor,
    full: torch.Tensor | None,
    row_temperature: torch.Tensor,
    active: torch.Tensor,
    grad_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    *,
    lam: float,
    clip: float,
    beta: float,
    with_diagnostics: bool,
    labels: torch.Tensor | None = None,
) -> RowResult:
    """The per-row contract of :func:`aropd_kernels.backends.compute_rows`, one program per row with
    every sweep fused (the shard stages below are the same sweeps, one launch each)."""
    n_rows, rows_per_batch, vocab = _row_shape(student)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    diagnostics = (torch.empty(N_DIAGNOSTICS, n_rows, dtype=torch.float32, device=student.device)
                   if with_diagnostics else None)
    if n_rows == 0:
        return RowResult(row_loss, diagnostics)
    write_grad = grad_scale is not None
    row_temperature, active = row_temperature.contiguous(), active.contiguous()  # indexed by row number
    inputs, strides, one_teacher = _inputs(student, partial, full)
    _launch(anchored_residual_rows_kernel, student,
            *inputs, grad_out if write_grad else student,
            row_temperature, active, grad_scale.contiguous() if write_grad else row_temperature,
            _row_labels(labels, n_rows, student.device),
            row_loss, diagnostics if with_diagnostics else row_loss,
            n_rows, rows_per_batch, vocab,
            *strides, *(grad_out.stride()[:2] if write_grad else student.stride()[:2]),
            lam, clip * LOG2_E, beta,
            DIVERGENCE=divergence_kind(beta), WITH_DIAGNOSTICS=with_diagnostics, WRITE_GRAD=write_grad,
            ONE_TEACHER=one_teacher)
    return RowResult(row_loss, diagnostics)


# --- the shard stages of aropd_kernels/shards.py (layouts there) ------------------------------------------


# Rows of the shards' float64 tensors that are logs or sums of logs: the kernels write and read them in
# base 2, and the launch converts them here, in float64 with float64 constants (inside a kernel ln 2 is a
# float32 constant, 3e-9 off: more than float64 statistics should lose).
_LOG_TARGET_SUMS = (shards.Z_MAX, shards.Z_LOG_SUM, shards.WEIGHTED_TARGET_GAP, shards.WEIGHTED_TARGET_LOGIT,
                    shards.STUDENT_GAP, shards.BELIEF_SHIFT, shards.STUDENT_LOG_STUDENT, shards.STUDENT_TOKEN,
                    shards.TARGET_TOKEN_LOGIT)


def shard_normalizers(student, partial, full, row_temperature, active) -> torch.Tensor:
    """float32 ``[n_inputs, 2, N]``: each input's max and natural log-sum over this shard."""
    n_rows, rows_per_batch, vocab = _row_shape(student)
    inputs, strides, one_teacher = _inputs(student, partial, full)
    normalizers = torch.empty(2 if one_teacher else 3, 2, n_rows, dtype=torch.float32, device=student.device)
    if n_rows:
        _launch(shard_normalizers_kernel, student, *inputs, row_temperature.contiguous(), active.contiguous(),
                normalizers, n_rows, rows_per_batch, vocab, *strides, ONE_TEACHER=one_teacher)
    return normalizers


def shard_target_sums(student, partial, full, row_temperature, active, normalizers, labels, *, lam, clip, beta,
                      with_diagnostics) -> torch.Tensor:
    """float64 ``[N_TARGET_SUMS, N]``: this shard's sums given the combined normalizers."""
    n_rows, rows_per_batch, vocab = _row_shape(student)
    inputs, strides, one_teacher = _inputs(student, partial, full)
    sums = torch.zeros(shards.N_TARGET_SUMS, n_rows, dtype=torch.float64, device=student.device)
    if n_rows:
        _launch(shard_target_sums_kernel, student, *inputs, row_temperature.contiguous(), active.contiguous(),
                normalizers.contiguous(), _row_labels(labels, n_rows, student.device), sums,
                n_rows, rows_per_batch, vocab, *strides, lam, clip * LOG2_E,
                DIVERGENCE=divergence_kind(beta), WITH_DIAGNOSTICS=with_diagnostics, ONE_TEACHER=one_teacher)
        sums[list(_LOG_TARGET_SUMS)] *= LN_2
    return sums


def shard_mixture_sums(student, partial, full, row_temperature, active, normalizers, terms, *, lam, clip,
                       beta) -> torch.Tensor:
    """float64 ``[2, N]``: KL(q || m) and KL(p || m) over this shard's tokens (JSD)."""
    n_rows, rows_per_batch, vocab = _row_shape(student)
    inputs, strides, one_teacher = _inputs(student, partial, full)
    mixture = torch.empty(2, n_rows, dtype=torch.float64, device=student.device)
    if n_rows:
        _launch(shard_mixture_sums_kernel, student, *inputs, row_temperature.contiguous(), active.contiguous(),
                normalizers.contiguous(), terms * LOG2_E, mixture, n_rows, rows_per_batch, vocab, *strides,
                lam, clip * LOG2_E, beta, ONE_TEACHER=one_teacher)
        mixture *= LN_2
    return mixture


def shard_gradient(student, partial, full, row_temperature, active, normalizers, terms, grad_scale, grad_out, *,
                   lam, clip, beta) -> None:
    """Writes this shard's columns of the scaled gradient into ``grad_out`` (zeros at skipped rows)."""
    n_rows, rows_per_batch, vocab = _row_shape(student)
    if n_rows == 0:
        return
    inputs, strides, one_teacher = _inputs(student, partial, full)
    _launch(shard_gradient_kernel, student, *inputs, grad_out, row_temperature.contiguous(), active.contiguous(),
            grad_scale.contiguous(), normalizers.contiguous(), terms * LOG2_E, n_rows, rows_per_batch, vocab,
            *strides, *grad_out.stride()[:2], lam, clip * LOG2_E, beta,
            DIVERGENCE=divergence_kind(beta), ONE_TEACHER=one_teacher)
