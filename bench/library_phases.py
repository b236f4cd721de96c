"""Where a small library call's time goes on a GPU: the host time (median of 2,000 calls, us) of a sync, of
the host-device copies, of ``Quantizer.quantize`` with and without its check, and of the library row of
bench/bench_service.py (copies in and out included; also one call after a pause, as bench_service
interleaves its paths). Full, dim 128, 3 bits, float16, one vector. Each row runs in the main thread and in
a worker thread (as the service's engine and bench_service's library rows run it), first with nothing else
on the GPU, then with a second process holding a CUDA context on it and idle (as the service's process is
during bench_service's library rows).

    python bench/library_phases.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import Quantizer  # noqa: E402


def median_us(fn, calls: int = 2000, pause_s: float = 0.0) -> float:
    for _ in range(50):
        fn()
    times = []
    for _ in range(calls):
        if pause_s:
            time.sleep(pause_s)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    device = torch.device("cuda", torch.cuda.current_device())  # (set_device needs an index)
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

    # Each row: median_us's arguments (the call, and for the last row fewer calls, each after a pause).
    rows = {
        "synchronize": (torch.cuda.synchronize,),
        "copy in (pageable) + sync": (lambda: (x.to(device), torch.cuda.synchronize()),),
        "copy in (pinned) + sync": (lambda: (pinned.to(device, non_blocking=True), torch.cuda.synchronize()),),
        "quantize check=False + sync": (lambda: (q.quantize(xd, check=False), torch.cuda.synchronize()),),
        "quantize (default check)": (lambda: q.quantize(xd),),
        "quantize check=False, codes .cpu()": (lambda: q.quantize(xd, check=False).codes.cpu(),),
        "quantize between two timing events": (events,),
        "bench_service library row": (library_row,),
        # bench_service interleaves its paths, so its library row is one call after other work, not back to back
        "the same, each after a 2 ms pause": (library_row, 500, 0.002),
    }
    worker = ThreadPoolExecutor(max_workers=1)
    worker.submit(torch.cuda.set_device, device).result()

    def table(title: str) -> None:
        print(f"\n{title}\n| call | main thread | worker thread |\n| --- | ---: | ---: |")
        for name, args in rows.items():
            in_worker = worker.submit(median_us, *args).result()  # timed inside the worker: no thread hop counted
            print(f"| {name} | {median_us(*args):.1f} | {in_worker:.1f} |")

    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}; host us a call, median of 2,000")
    table("Alone on the GPU")
    idle = subprocess.Popen(
        [sys.executable, "-c", "import sys, torch; torch.zeros(1, device='cuda'); print(flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        idle.stdout.readline()  # its context exists
        table("With a second process's CUDA context on the GPU (idle)")
    finally:
        idle.kill()
        idle.wait()
    worker.shutdown()


if __name__ == "__main__":
    main()
