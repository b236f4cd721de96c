"""Triton kernels of the three ops, with the signatures of ``kernels.reference``:

    quantize(x [N, dim], plan) -> (codes uint8 [N, code_bytes], norms float32 [N])
    dequantize(codes, norms, plan, dtype) -> [N, dim] dtype
    roundtrip(x, plan, dtype=float32) -> (x_hat [N, dim] dtype, sq_err float32 [N])

Importing this package raises ImportError where triton is not importable (``kernels.quantizer`` then
falls back to the torch reference). Kernels are defined at import time, so TRITON_INTERPRET=1 must be
set before the first import to run them on the CPU.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # a broken triton install can raise more than ImportError
    raise ImportError(f"kernels.triton needs an importable triton: {exc}") from exc

from kernels.triton._launch import fused, launch_batches
from kernels.triton.dequantize import dequantize
from kernels.triton.quantize import quantize
from kernels.triton.roundtrip import roundtrip

__all__ = ["dequantize", "launch_batches", "prepare", "quantize", "roundtrip"]


def prepare(plan) -> None:
    """Build the plan's derived forms that this plan's kernels read (before its ``op_tensors`` are taken)."""
    if fused(plan):
        plan.fused_params  # noqa: B018  (a cached property: building it is the point)
        plan.lane_sign_table  # noqa: B018  (and lane_signs)
        plan.search_grid  # noqa: B018  (reads the boundaries on the host: never inside a call or a capture)
    else:
        plan.mixing_matrix  # noqa: B018
