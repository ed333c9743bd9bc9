"""Triton backend: fused anchored-residual divergence kernels (CUDA, or CPU under TRITON_INTERPRET=1).

Exposes :func:`compute_rows`, the per-row contract of :mod:`aropd_kernels.backends`.
"""

from ..backends import _triton_interpreter_enabled
from .launch import compute_rows

if _triton_interpreter_enabled():
    from . import interpreter_rounding

    interpreter_rounding.install()

__all__ = ["compute_rows"]
