"""IsoQuant: block-rotation vector quantizers (quaternion 4-D blocks, planar pairs) and their baselines.

The public API is ``Quantizer`` and ``Packed``; see ``kernels.quantizer``. Nothing here imports Triton,
so the package works on machines without a GPU.
"""

from kernels.quantizer import FORMAT_VERSION, INPUT_DTYPES, MAX_BITS, MAX_DIM, MIN_BITS, MIN_DIM, Packed, Quantizer
from kernels.rotations import VARIANTS

__all__ = [
    "FORMAT_VERSION", "INPUT_DTYPES", "MAX_BITS", "MAX_DIM", "MIN_BITS", "MIN_DIM", "Packed", "Quantizer", "VARIANTS",
]
