"""The seeded generator that makes every quantizer's rotation parameters.

docs/FORMAT.md specifies it to the bit so that another implementation, in any language, rebuilds the
same parameters from (variant, dim, seed). It is SplitMix64 used as a counter-based generator: the
k-th output (k = 0, 1, 2, ...) of a stream is ``mix64(state0 + (k + 1) * GOLDEN)`` (mod 2^64), so a
whole stream is one vectorised expression rather than a Python loop.

    state0  = (seed + GOLDEN * stream_tag) mod 2^64,  stream_tag = variant_id * 2^16 + dim
    mix64(z): z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
    uniform = ((u64 >> 11) + 0.5) * 2^-53                  in (0, 1), never 0 or 1
    normal pair from uniforms (u1, u2), Box-Muller in float64:
        r = sqrt(-2 ln u1);  n0 = r cos(2 pi u2);  n1 = r sin(2 pi u2)

Normals are consumed in order n0, n1 of output pairs (0, 1), (2, 3), ...
"""

from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1

def stream_state(variant_id: int, dim: int, seed: int) -> int:
    """The initial SplitMix64 state of the stream for (variant, dim, seed), as a Python int < 2^64;
    ``variant_id`` is the variant's stable id (``kernels.rotations.ROTATIONS[name].variant_id``)."""
    tag = variant_id * 65536 + dim
    return (seed + GOLDEN * tag) & _MASK64


def splitmix64(state0: int, count: int, start: int = 0) -> np.ndarray:
    """Outputs ``start .. start + count - 1`` of the SplitMix64 stream that begins at ``state0``.

    Returns uint64 [count]. numpy's uint64 arithmetic wraps modulo 2^64, which is exactly the
    generator's arithmetic.
    """
    k = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(state0) + k * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        z = z ^ (z >> np.uint64(31))
    return z


def uniforms(state0: int, count: int) -> np.ndarray:
    """float64 [count] in the open interval (0, 1): ((u64 >> 11) + 0.5) * 2^-53."""
    bits = splitmix64(state0, count) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) * (2.0**-53)


def normals(state0: int, count: int) -> np.ndarray:
    """float64 [count] standard normals by Box-Muller over consecutive pairs of uniforms."""
    pairs = (count + 1) // 2
    u = uniforms(state0, 2 * pairs).reshape(pairs, 2)
    radius = np.sqrt(-2.0 * np.log(u[:, 0]))
    angle = 2.0 * np.pi * u[:, 1]
    out = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)
    return out[:count]
