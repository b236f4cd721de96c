"""IsoQuant: block-rotation vector quantizers (quaternion 4-D blocks, planar pairs) and their baselines.

The public API is ``Quantizer`` and ``Packed``; see ``kernels.quantizer``. KV-cache recipes and presets:
``kernels.kv_cache``; the transformers cache: ``kernels.hf`` (optional extra ``hf``). Nothing here imports Triton,
so the package works on machines without a GPU.
"""

from kernels.errors import QuantizerError
from kernels.kv_cache import PRESETS as KV_CACHE_PRESETS
from kernels.kv_cache import KVCacheConfig
from kernels.quantizer import FORMAT_VERSION, INPUT_DTYPES, MAX_BITS, MAX_DIM, MIN_BITS, MIN_DIM, Packed, Quantizer
from kernels.rotations import VARIANTS

__all__ = [
    "FORMAT_VERSION", "INPUT_DTYPES", "KV_CACHE_PRESETS", "KVCacheConfig", "MAX_BITS", "MAX_DIM", "MIN_BITS", "MIN_DIM",
    "Packed", "Quantizer", "QuantizerError", "VARIANTS",
]
