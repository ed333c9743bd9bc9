"""Triton backend: fused anchored-residual divergence kernels (CUDA, or CPU under TRITON_INTERPRET=1).

Exposes :func:`compute_rows`, the per-row contract of :mod:`aropd_kernels.backends`.
"""

from .launch import compute_rows

__all__ = ["compute_rows"]
