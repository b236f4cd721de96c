r"""Why a call that waits for its kernel cannot be timed at its kernel's time (BENCHMARKS.md §10).

    python -m bench.sync_floor

``triton.testing.do_bench`` flushes the L2 (a 256 MB ``zero_``) before each call: a call that returns before
its kernel ends hides its host time behind the flush, but a call that synchronizes has the GPU idle from its
kernel's end until its next command (do_bench's end event) arrives, and whatever host time before its launch
outlasts the flush is idle GPU time too. This prints, for identity and full at dim 128, float16, bits 3 and
N = 2^20: the flush's time; the raw launcher (setting the pinned bad-row flag, as the default call's kernel
does) alone, the default public call, and the launcher followed by one synchronize with a busy host delay of
d us before the launch; then the host time per call (N = 1, no synchronize in the loop: an enqueue rate, but for
the default call, which waits for its own kernel) of the launcher and the public calls.
"""

from __future__ import annotations

import time

import torch

import kernels.triton as kt
from bench.bench_api import host_us
from bench.bench_kernels import bench_median_us
from kernels import Quantizer

DELAYS_US = (0, 10, 20, 30, 40, 60)


def median_us(fn) -> float:
    return bench_median_us(fn, rep=40)


def delayed_then_synced(launch, delay_us: float, stream):
    def run():
        end = time.perf_counter() + delay_us * 1e-6
        while time.perf_counter() < end:
            pass
        launch()
        stream.synchronize()

    return run


def print_variant(variant: str, flag: torch.Tensor, stream) -> None:
    q = Quantizer(variant, 128, 3, seed=0, device="cuda")
    x = torch.randn(1 << 20, 128, device="cuda", dtype=torch.float16)
    packed = q.quantize(x)
    ops = {
        "quantize": (lambda: kt.quantize(x, q.plan, flag=flag), lambda: q.quantize(x)),
        "dequantize": (
            lambda: kt.dequantize(packed.codes, packed.norms, q.plan, torch.float16, flag=flag),
            lambda: q.dequantize(packed, torch.float16),
        ),
    }
    for op, (launch, public) in ops.items():
        delayed = " ".join(f"d{d} {median_us(delayed_then_synced(launch, d, stream)):7.1f}" for d in DELAYS_US)
        print(f"{variant:>8} {op:>10} raw {median_us(launch):7.1f} public {median_us(public):7.1f} | {delayed}")


def main() -> None:
    print(f"# sync_floor  card: {torch.cuda.get_device_name(0)}  torch {torch.__version__}")
    cache = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda")  # do_bench's flush buffer
    print(f"flush (zero_ of 256 MB): {median_us(cache.zero_):.1f} us")
    stream = torch.cuda.current_stream()
    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    print("variant op: raw launcher, default public call | launcher + synchronize after a host delay of d us")
    for variant in ("identity", "full"):
        print_variant(variant, flag, stream)
    q = Quantizer("identity", 128, 3, seed=0, device="cuda")
    one = torch.randn(1, 128, device="cuda", dtype=torch.float16)
    for name, fn in (
        ("launcher", lambda: kt.quantize(one, q.plan, flag=flag)),
        ("public check=False", lambda: q.quantize(one, check=False)),
        ("public default", lambda: q.quantize(one)),
    ):
        print(f"host us/call {name}: {host_us(fn, 300, sync_each=False):.1f}")


if __name__ == "__main__":
    main()
