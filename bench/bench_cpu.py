"""CPU throughput of the torch reference: quantize and dequantize 65,536 x 128 float32 vectors at 3 bits.

Prints one table: every variant's median time, vectors/s and input MB/s, and the ratio to one
elementwise pass of torch over the same tensor (``x * 2``: the cheapest op that reads and writes it),
measured in the same run.

    python bench/bench_cpu.py [--n 65536] [--dim 128] [--bits 3] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.host import cpu_name  # noqa: E402
from kernels import VARIANTS, Quantizer  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: codebook caches, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    x = torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(0))
    elementwise = median_seconds(lambda: x * 2, args.repeats)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{datetime.date.today()}, commit {commit}")
    print(f"# N={args.n}, dim={args.dim}, bits={args.bits}, float32; elementwise pass (x * 2): "
          f"{elementwise * 1e3:.2f} ms")
    print("| variant | op | median ms | Mvectors/s | input MB/s | x elementwise pass |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    mb = x.numel() * x.element_size() / 1e6
    for variant in VARIANTS:
        q = Quantizer(variant, args.dim, args.bits, seed=0, backend="torch")
        packed = q.quantize(x)
        ops = (("quantize", lambda q=q: q.quantize(x)), ("dequantize", lambda q=q, p=packed: q.dequantize(p)))
        for op, fn in ops:
            seconds = median_seconds(fn, args.repeats)
            print(f"| {variant} | {op} | {seconds * 1e3:.1f} | {args.n / seconds / 1e6:.2f} | "
                  f"{mb / seconds:.0f} | {seconds / elementwise:.1f} |")


if __name__ == "__main__":
    main()
