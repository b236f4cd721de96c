"""Where a small library call's time goes on a GPU: the host time (median of 2,000 calls, us) of a sync, of
the host-device copies, of ``Quantizer.quantize`` with and without its check, and of the library row of
bench/bench_service.py (copies in and out included). Full, dim 128, 3 bits, float16, one vector; the main
thread, nothing else on the GPU.

    python bench/library_phases.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import Quantizer  # noqa: E402


def median_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    device = torch.device("cuda")
    q = Quantizer("full", 128, 3, 0, device=device)
    x = torch.randn(1, 128).half()
    pinned = x.pin_memory()
    xd = x.to(device)

    def events() -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        q.quantize(xd, check=False)
        end.record()
        end.synchronize()
        start.elapsed_time(end)

    def library_row() -> None:  # bench_service's lib_quantize
        packed = q.quantize(x.to(device))
        packed.codes.cpu(), packed.norms.cpu()

    rows = {
        "synchronize": torch.cuda.synchronize,
        "copy in (pageable) + sync": lambda: (x.to(device), torch.cuda.synchronize()),
        "copy in (pinned) + sync": lambda: (pinned.to(device, non_blocking=True), torch.cuda.synchronize()),
        "quantize check=False + sync": lambda: (q.quantize(xd, check=False), torch.cuda.synchronize()),
        "quantize (default check)": lambda: q.quantize(xd),
        "quantize check=False, codes .cpu()": lambda: q.quantize(xd, check=False).codes.cpu(),
        "quantize between two timing events": events,
        "bench_service library row": library_row,
    }
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}; host us, median of 2,000")
    for name, fn in rows.items():
        print(f"{name:40s} {median_us(fn):8.1f}")


if __name__ == "__main__":
    main()
