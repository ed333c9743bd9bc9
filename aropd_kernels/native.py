"""The native CPU backend: the per-row contract of :mod:`aropd_kernels.backends` in C++ (csrc/).

The pybind11 module ``aropd_kernels._native`` is built by setup.py without torch headers: it takes
addresses, shapes, strides in elements and dtype codes. This file checks the tensors, allocates the
outputs and passes them on. When the module was not built, :func:`available` is False and
:func:`unavailable_reason` says why (the build writes the reason next to the package).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .backends import N_DIAGNOSTICS, RowResult

try:
    from . import _native
except ImportError as error:
    _native = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

_BUILD_STATUS = Path(__file__).with_name("_native_build.txt")


def available() -> bool:
    """True when the compiled kernel can be imported."""
    return _native is not None


def unavailable_reason() -> str | None:
    """Why the kernel is missing (the build's own record when there is one), or None when it is built."""
    if _native is not None:
        return None
    if _BUILD_STATUS.exists():
        return _BUILD_STATUS.read_text(encoding="utf-8").strip()
    return f"aropd_kernels._native cannot be imported ({_IMPORT_ERROR}); reinstall with `pip install .`"


def instruction_set() -> str:
    """The instruction set the kernel dispatches to on this CPU: 'x86-64-v4', 'x86-64-v3' or 'baseline'."""
    return _module().instruction_set()


def instruction_sets() -> list[str]:
    """Every instruction set this CPU can run the kernel with, best (the one in use) first."""
    return list(_module().instruction_sets())


def _select_instruction_set(name: str) -> None:
    """Test and benchmark hook: run the kernel's copy for ``name`` (one of :func:`instruction_sets`) from now on."""
    if not _module().select_instruction_set(name):
        raise ValueError(f"this CPU cannot run instruction set {name!r}; it can run {instruction_sets()}.")


def _module():
    if _native is None:
        raise RuntimeError(f"the native CPU kernel is not available: {unavailable_reason()}")
    return _native


def _dtype_code(tensor: torch.Tensor, name: str) -> int:
    codes = {torch.float32: _native.FLOAT32, torch.bfloat16: _native.BFLOAT16, torch.float16: _native.FLOAT16}
    if tensor.dtype not in codes:
        raise TypeError(f"native backend: {name} must be float32, bfloat16 or float16, got {tensor.dtype}.")
    return codes[tensor.dtype]


def _view(tensor: torch.Tensor | None, name: str, shape: torch.Size) -> tuple[int, int, int, int]:
    """(address, dtype code, batch stride, sequence stride) of a [B, T, V] CPU view; zeros for None.

    Every view of one call has the student's shape ``[B, T, V]`` (the contract of backends.py); only
    the strides of B and T may differ between them.
    """
    if tensor is None:
        return (0, 0, 0, 0)
    if tensor.device.type != "cpu":
        raise ValueError(f"native backend: {name} must be a CPU tensor, got {tensor.device}.")
    if tensor.shape != shape:
        raise ValueError(f"native backend: {name} must be a [B, T, V] view of the student's shape {tuple(shape)}, "
                         f"got {tuple(tensor.shape)}.")
    if shape[2] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"native backend: {name} needs unit stride in V; pass .contiguous().")
    return (tensor.data_ptr(), _dtype_code(tensor, name), tensor.stride(0), tensor.stride(1))


def _per_row(tensor: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape or tensor.device.type != "cpu":
        raise ValueError(f"native backend: {name} must be a CPU {dtype} tensor of shape {shape}, "
                         f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}.")
    return tensor.contiguous()


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


class _Rows:
    """The checked inputs of one call: the row views and the per-row tensors every stage takes."""

    def __init__(self, student, partial, full, row_temperature, active):
        self.module = _module()
        if student.dim() != 3:
            raise ValueError(f"native backend: student must be a [B, T, V] view, got shape {tuple(student.shape)}.")
        n_batch, self.seq, self.vocab = student.shape
        self.n_rows = n_batch * self.seq
        self.student = student
        self.n_inputs = 2 if full is None else 3
        self.views = [_view(t, name, student.shape)
                      for t, name in ((student, "student"), (partial, "partial"), (full, "full"))]
        self.temperature = _per_row(row_temperature, "row_temperature", torch.float32, (self.n_rows,))
        self.active = _per_row(active, "active", torch.bool, (self.n_rows,))

    def labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        return None if labels is None else _per_row(labels, "labels", torch.int64, (self.n_rows,))

    def normalizers(self, normalizers: torch.Tensor) -> torch.Tensor:
        return _per_row(normalizers, "normalizers", torch.float32, (self.n_inputs, 2, self.n_rows))

    def terms(self, terms: torch.Tensor) -> torch.Tensor:
        return _per_row(terms, "terms", torch.float64, (len(self.module.TERM_ROWS), self.n_rows))

    def gradient(self, grad_scale: torch.Tensor | None, grad_out: torch.Tensor | None) -> torch.Tensor | None:
        """The checked grad_scale, for a gradient into grad_out (both None: no gradient)."""
        if (grad_scale is None) != (grad_out is None):
            raise ValueError("native backend: grad_scale and grad_out are given together or not at all.")
        if grad_out is None:
            return None
        if grad_out.dtype not in (self.student.dtype, torch.float32):
            raise TypeError(f"native backend: grad_out must be float32 or the student's dtype {self.student.dtype}, "
                            f"got {grad_out.dtype}.")
        _view(grad_out, "grad_out", self.student.shape)
        return _per_row(grad_scale, "grad_scale", torch.float32, (self.n_rows,))

    def run(self, stage: str, *, grad_scale=None, grad_out=None, labels=None, with_diagnostics=False, row_loss=None,
            diagnostics=None, normalizers=None, target_sums=None, terms=None, mixture_sums=None, lam=0.0,
            clip=math.inf, beta=1.0) -> None:
        if self.n_rows == 0:
            return
        self.module.run_rows(
            self.module.STAGES[stage], *self.views, _view(grad_out, "grad_out", self.student.shape),
            self.n_rows, self.seq, self.vocab, self.temperature.data_ptr(), self.active.data_ptr(), _address(grad_scale),
            _address(labels), with_diagnostics, _address(row_loss), _address(diagnostics), _address(normalizers),
            _address(target_sums), _address(terms), _address(mixture_sums), float(lam), float(clip), float(beta),
            torch.get_num_threads())


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
    """The per-row contract of :func:`aropd_kernels.backends.compute_rows`, in C++ with OpenMP: every
    pass of a row in one call, its normalizers and sums kept in the row."""
    rows = _Rows(student, partial, full, row_temperature, active)
    grad_scale = rows.gradient(grad_scale, grad_out)
    row_loss = torch.empty(rows.n_rows, dtype=torch.float32)
    diagnostics = torch.empty(N_DIAGNOSTICS, rows.n_rows, dtype=torch.float32) if with_diagnostics else None
    rows.run("fused", grad_scale=grad_scale, grad_out=grad_out, labels=rows.labels(labels),
             with_diagnostics=with_diagnostics, row_loss=row_loss, diagnostics=diagnostics, lam=lam, clip=clip,
             beta=beta)
    return RowResult(row_loss, diagnostics)


# --- the shard stages of aropd_kernels.shards, over the same passes -----------------------------------


def shard_normalizers(student, partial, full, row_temperature, active) -> torch.Tensor:
    """Per input, the raw logits' max and log sum exp((x - max) / T) over this shard: float32
    ``[n_inputs, 2, N]`` (see :mod:`aropd_kernels.shards`)."""
    rows = _Rows(student, partial, full, row_temperature, active)
    normalizers = torch.empty(rows.n_inputs, 2, rows.n_rows, dtype=torch.float32)
    rows.run("normalizers", normalizers=normalizers)
    return normalizers


def shard_target_sums(student, partial, full, row_temperature, active, normalizers, labels, *, lam, clip, beta,
                      with_diagnostics) -> torch.Tensor:
    """The shard's sums of :mod:`aropd_kernels.shards` (rows named there), float64, given the combined
    normalizers; ``labels`` are shard-local."""
    rows = _Rows(student, partial, full, row_temperature, active)
    target_sums = torch.empty(len(rows.module.TARGET_SUM_ROWS), rows.n_rows, dtype=torch.float64)
    rows.run("target_sums", labels=rows.labels(labels), with_diagnostics=with_diagnostics,
             normalizers=rows.normalizers(normalizers), target_sums=target_sums, lam=lam, clip=clip, beta=beta)
    return target_sums


def shard_mixture_sums(student, partial, full, row_temperature, active, normalizers, terms, *, lam, clip,
                       beta) -> torch.Tensor:
    """KL(q || m) and KL(p || m) over the shard's tokens (JSD, 0 < beta < 1), float64 ``[2, N]``."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"native backend: the mixture sums are JSD's (0 < beta < 1), got beta={beta}.")
    rows = _Rows(student, partial, full, row_temperature, active)
    mixture_sums = torch.empty(2, rows.n_rows, dtype=torch.float64)
    rows.run("mixture_sums", normalizers=rows.normalizers(normalizers), terms=rows.terms(terms),
             mixture_sums=mixture_sums, lam=lam, clip=clip, beta=beta)
    return mixture_sums


def shard_gradient(student, partial, full, row_temperature, active, normalizers, terms, grad_scale, grad_out, *,
                   lam, clip, beta) -> None:
    """Writes the shard's columns of grad_scale / T * dD/ds into ``grad_out`` (zeros at skipped rows)."""
    rows = _Rows(student, partial, full, row_temperature, active)
    grad_scale = rows.gradient(grad_scale, grad_out)
    rows.run("gradient", grad_scale=grad_scale, grad_out=grad_out, normalizers=rows.normalizers(normalizers),
             terms=rows.terms(terms), lam=lam, clip=clip, beta=beta)
