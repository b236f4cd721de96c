"""KV-cache quantization recipes: what a transformer's cached keys and values go through, head vector by
head vector (torch only; the transformers cache in ``kernels.hf`` stores what this module makes).

A recipe (``KVCacheConfig``) names the rotation variant and bits for keys and for values, how many of the
most recent tokens (``window``) and of the first tokens (``sink``) stay in full precision, the layers
that are not quantized at all, the dtype the per-vector norms are stored in, and whether keys are
*smoothed* before quantization:

    k' = (k - mean) * scale           mean, scale float32 [kv_heads, head_dim], calibrated per layer
    codes, norm = quantize(k')        the library's Quantizer, one head vector (head_dim values) at a time
    k_hat = dequantize(codes, norm) / scale + mean

Why smoothing (docs/EVALUATION.md, the ablation): post-RoPE keys of a decoder LLM carry a large
per-channel offset shared by all tokens, and a few outlier channels. The offset costs quantization error
for nothing: subtracting it shrinks the norm that the error scales with, and adding it back restores the
key exactly (it also cancels in softmax: q.mean is the same for every key of a query). The scale
balances channels between the keys' spread and the queries' magnitude, scale_c = sqrt(rms(q_c) / std(k_c))
normalized to unit RMS, which minimizes the expected error of q.k for an isotropic quantization error.
Both come from ``KeyCalibration`` (``kernels.hf.calibrate_keys`` runs a model on a little text).

>>> import torch
>>> from kernels.kv_cache import KVCacheConfig, KVCodec
>>> codec = KVCodec(KVCacheConfig(key_bits=4, value_bits=3), head_dim=64, num_layers=2, num_kv_heads=3)
>>> keys = torch.randn(1, 3, 10, 64)                 # [batch, kv_heads, tokens, head_dim]
>>> codes = codec.encode(0, "key", keys)
>>> codes.codes.shape, codes.codes.dtype, codes.norms.dtype
(torch.Size([1, 3, 10, 32]), torch.uint8, torch.float16)
>>> codec.decode(0, "key", codes, torch.float32).shape
torch.Size([1, 3, 10, 64])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from kernels.packing import packed_bytes
from kernels.quantizer import Packed, Quantizer
from kernels.rotations import ROTATIONS, VARIANTS

Kind = Literal["key", "value"]
Tier = Literal["main", "window"]
NORM_DTYPES = {"float16": torch.float16, "float32": torch.float32}
FULL_PRECISION_BITS = 16  # a token kept in the model's 16-bit dtype (what a serving cache holds)


@dataclass(frozen=True)
class KVCacheConfig:
    """One KV-cache quantization recipe (see the module docstring).

    key_variant / value_variant: a ``kernels.VARIANTS`` rotation; key_bits / value_bits: 1..8;
    window: the most recent tokens kept at ``window_bits`` (as transformers' ``residual_length``; 0: none);
    window_bits: 16 keeps the window in the model's dtype; 1..8 stores it as codes of that many bits (same
    variants), and a token leaving the window is re-quantized from that reconstruction at the low bits;
    sink: the first tokens of the sequence kept in full precision (attention sinks); full_precision_layers:
    layer indices not quantized; norm_dtype: float16 | float32 (the library's ``Packed`` keeps float32);
    smooth_keys: subtract the calibrated key mean and balance channels (needs a ``KeyCalibration``);
    seed: the quantizers' seed (keys use seed, values seed + 1, so their rotations differ).
    """

    key_variant: str = "hadamard"
    key_bits: int = 4
    value_variant: str = "hadamard"
    value_bits: int = 4
    window: int = 0
    window_bits: int = FULL_PRECISION_BITS
    sink: int = 0
    full_precision_layers: tuple[int, ...] = ()
    norm_dtype: str = "float16"
    smooth_keys: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("key_variant", "value_variant"):
            if getattr(self, name) not in VARIANTS:
                raise ValueError(f"{name} must be one of {', '.join(VARIANTS)}; got {getattr(self, name)!r}")
        for name in ("key_bits", "value_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
                raise ValueError(f"{name} must be an integer from 1 to 8; got {value!r}")
        if self.window_bits != FULL_PRECISION_BITS and (
            isinstance(self.window_bits, bool)
            or not isinstance(self.window_bits, int)
            or not 1 <= self.window_bits <= 8
        ):
            raise ValueError(f"window_bits must be 16 (exact) or an integer from 1 to 8; got {self.window_bits!r}")
        for name in ("window", "sink"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
        if self.norm_dtype not in NORM_DTYPES:
            raise ValueError(f"norm_dtype must be one of {', '.join(NORM_DTYPES)}; got {self.norm_dtype!r}")
        object.__setattr__(self, "full_precision_layers", tuple(sorted(set(self.full_precision_layers))))

    def with_(self, **changes) -> KVCacheConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def bits(self, kind: Kind, tier: Tier = "main") -> int:
        if tier == "window":
            return self.window_bits
        return self.key_bits if kind == "key" else self.value_bits

    @property
    def exact_window(self) -> bool:
        """True when the window holds tokens in the model's dtype rather than as codes."""
        return self.window_bits == FULL_PRECISION_BITS

    def variant(self, kind: Kind) -> str:
        return self.key_variant if kind == "key" else self.value_variant

    def stored_bits_per_coordinate(
        self, head_dim: int, tokens: int, num_layers: int, exact_bits: int = FULL_PRECISION_BITS
    ) -> float:
        """Bits stored per cached coordinate, averaged over keys and values, layers and ``tokens`` tokens
        of one sequence: packed codes, norms, and the full-precision sink, window and layers counted, an
        exact coordinate at ``exact_bits`` (16: a float16/bfloat16 model's cache)."""
        sink = min(tokens, self.sink)
        window = min(tokens - sink, self.window)
        quantized_tokens = tokens - sink - window
        norm_bits = 8 * NORM_DTYPES[self.norm_dtype].itemsize
        exact_bits = head_dim * exact_bits

        def coded_bits(kind: Kind, tier: Tier) -> int:
            if tier == "window" and self.exact_window:
                return exact_bits
            coded = ROTATIONS[self.variant(kind)].coded_dim(head_dim)
            return packed_bytes(coded, self.bits(kind, tier)) * 8 + norm_bits

        # A quantized layer stores the same for every layer; the full-precision ones store exact tokens.
        quantized_layer = sum(
            sink * exact_bits + window * coded_bits(kind, "window") + quantized_tokens * coded_bits(kind, "main")
            for kind in ("key", "value")
        )
        exact_layers = sum(1 for layer in range(num_layers) if layer in self.full_precision_layers)
        total = (num_layers - exact_layers) * quantized_layer + exact_layers * 2 * tokens * exact_bits
        return total / (2 * num_layers * tokens * head_dim)


@dataclass
class KeyCalibration:
    """Per layer, the key smoothing: ``mean`` and ``scale``, float32 [kv_heads, head_dim] each."""

    mean: list[torch.Tensor]
    scale: list[torch.Tensor]

    @classmethod
    def from_statistics(
        cls, key_mean: list[torch.Tensor], key_std: list[torch.Tensor], query_rms: list[torch.Tensor]
    ) -> KeyCalibration:
        """From per-layer key channel means and standard deviations and the RMS of the queries that read
        each KV head (all float [kv_heads, head_dim]): scale = sqrt(query_rms / key_std), unit RMS a head."""
        scales = []
        for std, q_rms in zip(key_std, query_rms, strict=True):
            scale = (q_rms.float().clamp_min(1e-6) / std.float().clamp_min(1e-6)).sqrt()
            scales.append(scale / scale.square().mean(-1, keepdim=True).sqrt())
        return cls(mean=[m.float() for m in key_mean], scale=scales)

    def to(self, device: torch.device | str) -> KeyCalibration:
        return KeyCalibration([m.to(device) for m in self.mean], [s.to(device) for s in self.scale])


@dataclass(frozen=True)
class HeadCodes:
    """The codes of a block of head vectors: codes uint8 [..., code_bytes], norms [...] in the recipe's
    norm dtype. ``nbytes`` is what they occupy."""

    codes: torch.Tensor
    norms: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.norms.numel() * self.norms.element_size()


@dataclass
class KVCodec:
    """The quantizers of one cache recipe for a model geometry: ``encode``/``decode`` head vectors
    [..., kv_heads, tokens, head_dim] of one layer, keys or values, on ``device``."""

    config: KVCacheConfig
    head_dim: int
    num_layers: int
    num_kv_heads: int
    device: torch.device | str = "cpu"
    calibration: KeyCalibration | None = None
    backend: str = "auto"
    _quantizers: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.config.smooth_keys:
            if self.calibration is None:
                raise ValueError("smooth_keys needs a KeyCalibration (kernels.hf.calibrate_keys makes one)")
            if len(self.calibration.mean) != self.num_layers:
                raise ValueError(
                    f"the calibration has {len(self.calibration.mean)} layers; the model has {self.num_layers}"
                )
            self.calibration = self.calibration.to(self.device)
        bad = [layer for layer in self.config.full_precision_layers if not 0 <= layer < self.num_layers]
        if bad:
            raise ValueError(f"full_precision_layers {bad} are outside 0..{self.num_layers - 1}")

    def quantized(self, layer: int) -> bool:
        """False for the layers the recipe keeps in full precision."""
        return layer not in self.config.full_precision_layers

    def quantizer(self, kind: Kind, tier: Tier = "main") -> Quantizer:
        """The Quantizer of keys or values in the main store or the (coded) window."""
        if (kind, tier) not in self._quantizers:
            seed = self.config.seed + (0 if kind == "key" else 1)
            self._quantizers[kind, tier] = Quantizer(
                self.config.variant(kind),
                self.head_dim,
                self.config.bits(kind, tier),
                seed=seed,
                device=self.device,
                backend=self.backend,
            )
        return self._quantizers[kind, tier]

    def _smoothing(self, layer: int, kind: Kind) -> tuple[torch.Tensor, torch.Tensor] | None:
        if kind != "key" or not self.config.smooth_keys:
            return None
        # [kv_heads, head_dim] broadcast over [..., kv_heads, tokens, head_dim]
        return self.calibration.mean[layer][:, None, :], self.calibration.scale[layer][:, None, :]

    def encode(self, layer: int, kind: Kind, x: torch.Tensor, tier: Tier = "main") -> HeadCodes:
        """x [..., kv_heads, tokens, head_dim] (float16/bfloat16/float32) -> HeadCodes with codes
        [..., kv_heads, tokens, code_bytes] and norms [..., kv_heads, tokens]."""
        smoothing = self._smoothing(layer, kind)
        if smoothing is not None:
            mean, scale = smoothing
            x = (x.float() - mean) * scale
        packed = self.quantizer(kind, tier).quantize(x)
        return HeadCodes(codes=packed.codes, norms=packed.norms.to(NORM_DTYPES[self.config.norm_dtype]))

    def decode(self, layer: int, kind: Kind, codes: HeadCodes, dtype: torch.dtype, tier: Tier = "main") -> torch.Tensor:
        """HeadCodes -> head vectors [..., kv_heads, tokens, head_dim] in ``dtype``."""
        q = self.quantizer(kind, tier)
        packed = Packed(codes=codes.codes, norms=codes.norms.float(), **q.descriptor())
        smoothing = self._smoothing(layer, kind)
        if smoothing is None:
            return q.dequantize(packed, dtype)
        mean, scale = smoothing
        return (q.dequantize(packed) / scale + mean).to(dtype)

    def stored_bits_per_coordinate(self, tokens: int) -> float:
        """``KVCacheConfig.stored_bits_per_coordinate`` for this model's geometry."""
        return self.config.stored_bits_per_coordinate(self.head_dim, tokens, self.num_layers)

    def roundtrip(self, layer: int, kind: Kind, x: torch.Tensor, tier: Tier = "main") -> torch.Tensor:
        """decode(encode(x)) in x's dtype; x itself for a full-precision layer or an exact window."""
        if not self.quantized(layer) or x.shape[-2] == 0 or (tier == "window" and self.config.exact_window):
            return x
        return self.decode(layer, kind, self.encode(layer, kind, x, tier), x.dtype, tier)

    def window_and_main(self, layer: int, kind: Kind, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a token reads of x while it is in the window and after it left it (re-quantized from the
        window's reconstruction, as the cache does), both in x's dtype."""
        windowed = self.roundtrip(layer, kind, x, "window")
        return windowed, self.roundtrip(layer, kind, windowed)


def _preset(key_bits: int, value_bits: int, window: int) -> KVCacheConfig:
    return KVCacheConfig(
        key_variant="hadamard",
        key_bits=key_bits,
        value_variant="hadamard",
        value_bits=value_bits,
        window=window,
        window_bits=8,
        sink=1,
        norm_dtype="float16",
        smooth_keys=True,
    )


# The recipes ``bench/eval_llm.py --search`` chose on development text (the calibration half) as the
# lowest perplexity within 4.5, 3.5 and 2.5 stored bits per coordinate on SmolLM2-135M at 512 tokens,
# everything counted. On the held-out text (docs/EVALUATION.md, NVIDIA H200 run, 3 seeds): +0.40%,
# +1.95% and +16.5% perplexity at 4.34, 3.46 and 2.46 bits, against +7.6%, +36% and +237% for
# hadamard + Lloyd-Max at 4.5, 3.5 and 2.5 bits. At contexts longer than 512 the window costs less.
PRESETS: dict[str, KVCacheConfig] = {
    "kv-4.5": _preset(4, 3, window=64),
    "kv-3.5": _preset(3, 2, window=64),
    "kv-2.5": _preset(2, 2, window=16),
}
