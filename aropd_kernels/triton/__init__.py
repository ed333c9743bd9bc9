"""Triton backend: fused anchored-residual divergence kernels (CUDA, or CPU under TRITON_INTERPRET=1).

Exposes :func:`compute_rows`, the per-row contract of :mod:`aropd_kernels.backends`, and the four shard
stages of :mod:`aropd_kernels.shards` (vocabulary-parallel calls).
"""

from .launch import compute_rows, shard_gradient, shard_mixture_sums, shard_normalizers, shard_target_sums

__all__ = ["compute_rows", "shard_gradient", "shard_mixture_sums", "shard_normalizers", "shard_target_sums"]
