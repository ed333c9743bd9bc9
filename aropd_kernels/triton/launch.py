"""Launch of the Triton kernels under the per-row contract of :mod:`aropd_kernels.backends`."""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import triton

from ..backends import N_DIAGNOSTICS, RowResult
from .kernels import FORWARD_KL, JSD, REVERSE_KL, anchored_residual_rows_kernel

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
# In the widest block ptxas, left to itself, trades registers for occupancy: with Triton 3.7.1's code it
# held 33 of the 120 specializations at 80 registers (three blocks of 256 threads per SM) and spilled
# 8 bytes in three of them. An explicit limit at the hardware's maximum turns that trade off; the
# narrower blocks never spilled and keep ptxas's own choice.
WIDEST_BLOCK_MAX_REGISTERS = 255


class LaunchConfig(NamedTuple):
    block_v: int
    num_warps: int

    def compile_options(self) -> dict:
        """The launch's compile options, which the compile report compiles with too."""
        max_registers = WIDEST_BLOCK_MAX_REGISTERS if self.block_v == MAX_BLOCK_V else None
        return {"num_warps": self.num_warps, "enable_fp_fusion": ENABLE_FP_FUSION, "maxnreg": max_registers}


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


def compute_rows(
    student: torch.Tensor,
    partial: torch.Tensor,
    full: torch.Tensor,
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
    """The per-row contract of :func:`aropd_kernels.backends.compute_rows`, one program per row."""
    if full is None or labels is not None:
        raise NotImplementedError("one teacher and token log-probabilities: not yet in this backend")
    n_batch, rows_per_batch, vocab = student.shape
    n_rows = n_batch * rows_per_batch
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    diagnostics = (torch.zeros(N_DIAGNOSTICS, n_rows, dtype=torch.float32, device=student.device)
                   if with_diagnostics else None)
    if n_rows == 0:
        return RowResult(row_loss, diagnostics)
    write_grad = grad_scale is not None
    row_temperature, active = row_temperature.contiguous(), active.contiguous()  # indexed by row number
    grad_scale = grad_scale.contiguous() if write_grad else row_temperature
    config = launch_config(vocab)
    divergence = divergence_kind(beta)
    # Triton launches on the current CUDA device: make it the logits' device.
    with torch.cuda.device(student.device) if student.is_cuda else contextlib.nullcontext():
        anchored_residual_rows_kernel[(n_rows,)](
            student, partial, full, grad_out if write_grad else student,
            row_temperature, active, grad_scale,
            row_loss, diagnostics if with_diagnostics else row_loss,
            n_rows, rows_per_batch, vocab,
            *student.stride()[:2], *partial.stride()[:2], *full.stride()[:2],
            *(grad_out.stride()[:2] if write_grad else student.stride()[:2]),
            lam, clip * math.log2(math.e), beta,
            DIVERGENCE=divergence, WITH_DIAGNOSTICS=with_diagnostics, WRITE_GRAD=write_grad,
            BLOCK_V=config.block_v, **config.compile_options(),
        )
    return RowResult(row_loss, diagnostics)
