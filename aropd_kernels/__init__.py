"""Fused anchored-residual divergence kernels for privileged on-policy distillation (AR-OPD)."""

from .functional import AnchoredResidualKL, Diagnostics, anchored_residual_kl
from .ops import DoubleBackwardError
from .reference import anchored_residual_target

__all__ = [
    "AnchoredResidualKL",
    "Diagnostics",
    "DoubleBackwardError",
    "anchored_residual_kl",
    "anchored_residual_target",
]
__version__ = "0.1.0"
