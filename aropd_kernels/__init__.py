"""Fused anchored-residual divergence kernels for privileged on-policy distillation (AR-OPD)."""

from .functional import (
    AnchoredResidualKL,
    Diagnostics,
    DistillationDivergence,
    anchored_residual_kl,
    distillation_divergence,
)
from .fused_linear import FusedLinearAnchoredResidualKL, fused_linear_anchored_residual_kl
from .ops import DoubleBackwardError
from .reference import anchored_residual_target

__all__ = [
    "AnchoredResidualKL",
    "Diagnostics",
    "DistillationDivergence",
    "DoubleBackwardError",
    "FusedLinearAnchoredResidualKL",
    "anchored_residual_kl",
    "anchored_residual_target",
    "distillation_divergence",
    "fused_linear_anchored_residual_kl",
]
__version__ = "0.1.0"
