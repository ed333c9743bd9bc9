"""Fused anchored-residual divergence kernels for privileged on-policy distillation (AR-OPD)."""

from .functional import AnchoredResidualKL, Diagnostics, anchored_residual_kl
from .fused_linear import FusedLinearAnchoredResidualKL, fused_linear_anchored_residual_kl
from .ops import DoubleBackwardError
from .reference import anchored_residual_target

__all__ = [
    "AnchoredResidualKL",
    "Diagnostics",
    "DoubleBackwardError",
    "FusedLinearAnchoredResidualKL",
    "anchored_residual_kl",
    "anchored_residual_target",
    "fused_linear_anchored_residual_kl",
]
__version__ = "0.1.0"
