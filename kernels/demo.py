"""A short demo: quantize random unit vectors with every variant and print the error beside METHOD.md's.

    python -m kernels.demo
"""

from __future__ import annotations

import torch

from kernels import VARIANTS, Quantizer
from kernels.codebook import lloyd_max


def main(n: int = 16384, dim: int = 128) -> None:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    x = x / x.norm(dim=-1, keepdim=True)
    print(f"E||x - x_hat||^2 on {n} random unit vectors, d = {dim} (theory: exact-law Lloyd-Max)")
    print("| variant | " + " | ".join(f"{b} bit" for b in (1, 2, 3, 4)) + " |")
    print("| --- |" + " ---: |" * 4)
    print("| theory | " + " | ".join(f"{lloyd_max(dim, b).vector_distortion:.5f}" for b in (1, 2, 3, 4)) + " |")
    for variant in VARIANTS:
        errors = []
        for bits in (1, 2, 3, 4):
            _, sq_err = Quantizer(variant, dim, bits, seed=0).roundtrip(x)
            errors.append(f"{sq_err.mean().item():.5f}")
        print(f"| {variant} | " + " | ".join(errors) + " |")
    q = Quantizer("full", dim, 3, seed=0)
    packed = q.quantize(x.half())
    ratio = x.half().numel() * 2 / packed.nbytes
    print(f"\n{q}\nfloat16 input {n * dim * 2} bytes -> {packed.nbytes} bytes stored (x{ratio:.2f})")


if __name__ == "__main__":
    main()
