"""Make Triton's CPU interpreter round float32 -> bfloat16 to nearest even, as the GPU does.

Under TRITON_INTERPRET=1, Triton (3.7.1 and 3.9.0 alike) converts float32 to bfloat16 by dropping
the low 16 bits (round toward zero), while compiled kernels use ``cvt.rn.bf16.f32`` (round to
nearest even). A bfloat16 gradient from the interpreter would then be up to one unit in the last
place off instead of half of one, and fail the gradient rule (docs/api.md) for reasons the GPU never
shows. ``tests/conftest.py`` installs this patch of the interpreter's float truncation, for that one
conversion, when the interpreter is on; the package itself never changes Triton.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

_BF16_QUIET_NAN_BIT = 0x0040


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 ``values``, rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding_bias = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = ((bits + rounding_bias) >> np.uint32(16)).astype(np.uint16)
    # A NaN whose payload sits only in the low bits would round to inf: keep it a NaN.
    quiet_nan = ((bits >> np.uint32(16)) | np.uint32(_BF16_QUIET_NAN_BIT)).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded)


def install() -> None:
    """Route the interpreter's float32 -> bfloat16 truncation through :func:`float32_to_bfloat16_bits`."""
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_fp_trunc, "rounds_bfloat16_to_nearest", False):
        return
    truncate = builder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(float32_to_bfloat16_bits(src.data), tl.bfloat16)
        return truncate(self, src, dst_type)

    create_fp_trunc.rounds_bfloat16_to_nearest = True
    builder.create_fp_trunc = create_fp_trunc
