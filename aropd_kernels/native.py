"""The native CPU backend: the per-row contract of :mod:`aropd_kernels.backends` in C++ (csrc/).

The pybind11 module ``aropd_kernels._native`` is built by setup.py without torch headers: it takes
addresses, shapes, strides in elements and dtype codes. This file checks the tensors, allocates the
outputs and passes them on. When the module was not built, :func:`available` is False and
:func:`unavailable_reason` says why (the build writes the reason next to the package).
"""

from __future__ import annotations

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


def _per_row(tensor: torch.Tensor, name: str, dtype: torch.dtype, n_rows: int) -> torch.Tensor:
    if tensor.dtype != dtype or tensor.shape != (n_rows,) or tensor.device.type != "cpu":
        raise ValueError(f"native backend: {name} must be a CPU {dtype} tensor of shape ({n_rows},), "
                         f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}.")
    return tensor.contiguous()


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
    """The per-row contract of :func:`aropd_kernels.backends.compute_rows`, in C++ with OpenMP."""
    if full is None or labels is not None:
        raise NotImplementedError("one teacher and token log-probabilities: not yet in this backend")
    module = _module()
    if student.dim() != 3:
        raise ValueError(f"native backend: student must be a [B, T, V] view, got shape {tuple(student.shape)}.")
    n_batch, seq, vocab = student.shape
    n_rows = n_batch * seq
    views = [_view(t, n, student.shape) for t, n in ((student, "student"), (partial, "partial"), (full, "full"))]
    temperature = _per_row(row_temperature, "row_temperature", torch.float32, n_rows)
    active = _per_row(active, "active", torch.bool, n_rows)
    row_loss = torch.empty(n_rows, dtype=torch.float32)
    diagnostics = torch.zeros(N_DIAGNOSTICS, n_rows, dtype=torch.float32) if with_diagnostics else None
    if (grad_scale is None) != (grad_out is None):
        raise ValueError("native backend: grad_scale and grad_out are given together or not at all.")
    if grad_out is not None:
        if grad_out.dtype not in (student.dtype, torch.float32):
            raise TypeError(f"native backend: grad_out must be float32 or the student's dtype {student.dtype}, "
                            f"got {grad_out.dtype}.")
        grad_scale = _per_row(grad_scale, "grad_scale", torch.float32, n_rows)
    grad_view = _view(grad_out, "grad_out", student.shape)
    if n_rows == 0:
        return RowResult(row_loss, diagnostics)
    module.compute_rows(
        *views, grad_view, n_rows, seq, vocab,
        temperature.data_ptr(), active.data_ptr(), 0 if grad_scale is None else grad_scale.data_ptr(),
        row_loss.data_ptr(), 0 if diagnostics is None else diagnostics.data_ptr(),
        float(lam), float(clip), float(beta), torch.get_num_threads(),
    )
    return RowResult(row_loss, diagnostics)
