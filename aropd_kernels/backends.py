"""The per-row contract every backend implements, and the choice of backend.

A backend is a module with a function

    compute_rows(student, partial, full, row_temperature, active, grad_scale, grad_out, *,
                 lam, clip, beta, with_diagnostics, labels=None) -> RowResult

over row views:

- ``student``, ``partial``, ``full``: ``[B, T, V]`` views with unit stride in V and the same B and T
  (``rows.as_rows`` guarantees it); the two row strides are arbitrary and may differ between
  the three, so a ``logits[:, :-1]`` slice needs no copy. Row
  ``i`` is ``(i // T, i % T)``; every per-row tensor below is flat ``[N = B * T]`` in that order.
  float32, bfloat16 or float16, mixed freely (the reference also takes float64).
- ``full`` is None for one teacher: the target is then ``softmax(partial / T)`` itself (``lam`` and
  ``clip`` do not apply, and the two teacher diagnostics are 0). The kernels then read two inputs.
- ``row_temperature``: float32 ``[N]``, every entry > 0.
- ``active``: bool ``[N]``. Inactive rows get loss 0, diagnostics 0, gradient 0, and no other work.
- ``grad_scale``: float32 ``[N]`` or None. When given, ``grad_out`` (``[B, T, V]``, the student's dtype
  or float32, unit stride in V, possibly ``student`` itself for ``inplace_grad``) receives
  ``grad_scale[i] * dD_i / ds[i, v]`` on active rows and exact zeros on inactive rows.
- ``lam`` >= 0, ``clip`` > 0 (may be ``math.inf``), ``beta`` in [0, 1]: validated Python floats.
- ``labels``: int64 ``[N]`` or None; with ``with_diagnostics``, the last two diagnostics are the
  student's and the target's log-probability of token ``labels[i]`` when it lies in ``[0, V)``, and 0
  otherwise (a vocabulary shard holds only some labels) or without labels.

It returns the unweighted per-row divergence ``D_i`` (float32, float64 for float64 input) and, when
``with_diagnostics``, a float32 ``[N_DIAGNOSTICS, N]`` tensor (belief_shift, clipped_mass,
student_entropy, target_entropy, student_token_logprob, target_token_logprob). Validation,
flattening, weights and reductions live in ``rows.py``, never here. A backend that also runs on
vocabulary shards provides the stage functions of :mod:`aropd_kernels.shards`.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import NamedTuple

import torch

BACKENDS = ("auto", "triton", "native", "reference")
N_DIAGNOSTICS = 6  # rows of RowResult.diagnostics, in the order of functional.Diagnostics


class RowResult(NamedTuple):
    row_loss: torch.Tensor
    diagnostics: torch.Tensor | None


def _triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def native_unavailable_reason() -> str | None:
    """None when the native CPU kernel is built and loads, else why not."""
    try:
        native = importlib.import_module("aropd_kernels.native")
    except ImportError as error:
        return f"aropd_kernels.native cannot be imported ({error})"
    return None if native.available() else native.unavailable_reason()


def native_available() -> bool:
    return native_unavailable_reason() is None


def triton_unavailable_reason() -> str | None:
    """None when the Triton backend imports, else why not (triton missing, or too old)."""
    try:
        importlib.import_module("aropd_kernels.triton")
    except ImportError as error:
        return (f"aropd_kernels.triton cannot be imported ({error}); install triton >= 3.7.1 on Linux "
                "(torch's CUDA wheels bring it)")
    return None


def triton_available() -> bool:
    return triton_unavailable_reason() is None


@torch.compiler.assume_constant_result  # availability is fixed per process; keeps imports out of traces
def resolve(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str:
    """Name of the backend that will run, or ValueError saying why the requested one cannot."""
    if torch.float64 in dtypes:
        if backend not in ("auto", "reference"):
            raise ValueError(
                f"backend={backend!r} does not take float64 logits; cast them to float32 or use "
                "backend='reference' (float64 is meant for exact checks)."
            )
        return "reference"
    if backend == "auto":
        if device.type == "cuda":
            reason = triton_unavailable_reason()
            if reason is None:
                return "triton"
            _warn_reference_on_cuda(reason)
        if device.type == "cpu" and native_available():
            return "native"
        return "reference"
    if backend == "triton":
        reason = triton_unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend='triton' is unavailable: {reason}.")
        if device.type != "cuda" and not _triton_interpreter_enabled():
            raise ValueError(
                "backend='triton' needs CUDA tensors; move the logits to a GPU, use backend='auto', "
                "or set TRITON_INTERPRET=1 to run the kernels on CPU in the (slow) interpreter."
            )
        return "triton"
    if backend == "native":
        if device.type != "cpu":
            raise ValueError("backend='native' runs on CPU tensors only; use backend='auto' or 'triton' on CUDA.")
        reason = native_unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend='native' is not built: {reason}. Use backend='reference' or reinstall.")
        return "native"
    return "reference"


_warned_reference_on_cuda = False


def _warn_reference_on_cuda(reason: str) -> None:
    """Once per process: auto falls back to the reference on CUDA, which materializes N×V tensors."""
    global _warned_reference_on_cuda
    if _warned_reference_on_cuda:
        return
    _warned_reference_on_cuda = True
    warnings.warn(
        f"aropd_kernels: backend='auto' on CUDA tensors runs the pure-torch reference, which materializes "
        f"several N×V float32 tensors, because the Triton backend is unavailable: {reason}. Install the "
        "Triton that your torch build pins (torch's CUDA wheels bring it) to use the fused kernels.",
        RuntimeWarning, stacklevel=4,
    )


def compute_rows(name: str, *args, **kwargs) -> RowResult:
    module = importlib.import_module(f"aropd_kernels.{name}")
    return module.compute_rows(*args, **kwargs)
