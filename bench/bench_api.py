r"""The public API against the kernels it launches, on one GPU in one run (issue: the public API at kernel speed).

    PYTHONUNBUFFERED=1 python -m bench.bench_api [--out DIR] [--dims 128,512] [--quick]

Four tables:
1. N = 2^20, dims (default 128, 512), float16/bfloat16/float32, bits 2-4, full/fast/2d/identity, each op:
   the raw launcher (``kernels.triton.quantize`` ...), the public call (``Quantizer.quantize`` ...) with its
   default check (one host sync), the public call with ``check=False``, a copy of the op's float tensor, and
   each followed by one synchronize of its stream: the raw launcher ("raw+sync": the floor of any call that
   waits for its kernel, as the default call does), the raw launcher setting the pinned bad-row flag (the
   default call's kernel) and the public ``check=False`` call; ``triton.testing.do_bench`` medians (L2
   flushed), and ratios.
2. N = 8,192, dim 128, float16: the same calls captured 64 at a time in one CUDA graph (replay time / 64)
   against the raw launcher's graph and the copy's.
3. Host cost of one eager call at N in {1, 256, 8192} (dim 128, float16, full, bits 3): wall time per call of
   a loop of calls, each followed by a synchronize, for a bare launch of the same Triton kernel with its
   arguments built once (``kernel[grid](*args)``: Triton's own dispatch), the raw launcher, the public call
   with ``check=False`` and the default public call; and the enqueue time alone (no synchronize in the loop).
   Each twice: with the launchers' direct launch of compiled kernels (``_launch.DIRECT``, the default) and
   through Triton's dispatch (DIRECT off), in the same run.
4. Where the public call's host time goes: cProfile of the default public quantize at N = 256.
Kernels are compiled first in worker processes (bench.bench_kernels.precompile). CSV and log go to --out.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import datetime
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_kernels import DTYPES, bench_median_us, copy_us_of, graph_per_call_us, precompile  # noqa: E402
from bench.host import cpu_name  # noqa: E402
from kernels import Quantizer  # noqa: E402

VARIANTS = ("full", "fast", "2d", "identity")
OPS = ("quantize", "dequantize", "roundtrip")


def say_ratios(say, label: str, ratios: list[float]) -> None:
    """One summary line of table 1: median, max and the cells within the 1.05x target."""
    say(f"# {label}: median {statistics.median(ratios):.3f}, max {max(ratios):.3f}, "
        f"cells <= 1.05: {sum(r <= 1.05 for r in ratios)} of {len(ratios)}")


def synced(fn):
    """fn, then one synchronize of the current stream (the Stream object built once, as _HostFlag keeps it)."""
    stream = torch.cuda.current_stream()

    def run():
        fn()
        stream.synchronize()

    return run


def calls(kt, q: Quantizer, x: torch.Tensor, dtype: torch.dtype) -> dict:
    """op -> (raw launcher, public default, public check=False, raw launcher setting a pinned bad-row flag as
    the default call's kernel does) on the same inputs; dequantize outputs x's dtype, the round trip float32
    (the library defaults)."""
    plan = q.plan
    packed = q.quantize(x)
    codes, norms = packed.codes, packed.norms
    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)  # (never set: the inputs are finite)
    return {
        "quantize": (
            lambda: kt.quantize(x, plan),
            lambda: q.quantize(x),
            lambda: q.quantize(x, check=False),
            lambda: kt.quantize(x, plan, flag=flag),
        ),
        "dequantize": (
            lambda: kt.dequantize(codes, norms, plan, dtype),
            lambda: q.dequantize(packed, dtype),
            lambda: q.dequantize(packed, dtype, check=False),
            lambda: kt.dequantize(codes, norms, plan, dtype, flag=flag),
        ),
        "roundtrip": (
            lambda: kt.roundtrip(x, plan),
            lambda: q.roundtrip(x),
            lambda: q.roundtrip(x, check=False),
            lambda: kt.roundtrip(x, plan, flag=flag),
        ),
    }


def bare_quantize_launch(q: Quantizer, x: torch.Tensor):
    """A function that repeats the quantize launcher's kernel launch (the plain or the Gluon kernel, whichever
    it picks) with the arguments the launcher built once: ``kernel[(grid,)](*args, **meta)``, Triton's own
    dispatch."""
    import kernels.triton as kt
    from kernels.triton import _launch

    recorded = []
    launch = _launch.launch

    def record(cache, key, kernel, grid, args, meta):
        recorded.append((kernel, grid, args, meta))
        return launch(cache, key, kernel, grid, args, meta)

    _launch.launch = record  # (the launchers call it through _launch's globals)
    try:
        kt.quantize(x, q.plan)
    finally:
        _launch.launch = launch
    (kernel, grid, args, meta), = recorded
    return lambda: kernel[(grid,)](*args, **meta)


def host_us(fn, calls: int, sync_each: bool) -> float:
    """Median over 5 rounds of the wall time per call of ``calls`` calls (synchronizing after each, or once
    at the end: then it is the enqueue rate while the GPU keeps up)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            if sync_each:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def table_graphs(kt, small: list, rows: list, say) -> None:
    """Table 2: the calls captured 64 at a time in one CUDA graph, against the raw launcher's graph."""
    say("\n## 2. N = 8192, dim 128, float16: per call, 64 calls in one CUDA graph (us)")
    say(f"{'variant':>8} {'b':>2} {'op':>10} {'raw':>7} {'public':>7} {'copy':>7} {'pub/raw':>7}")
    graph_rows = []
    for n, dim, dtype_name, variant, bits in small:
        dtype = DTYPES[dtype_name]
        q = Quantizer(variant, dim, bits, seed=0, device="cuda")
        x = torch.randn(n, dim, device="cuda", dtype=dtype)
        copy_us = copy_us_of(x, back_to_back=True)
        for op, (raw, _, unchecked, _) in calls(kt, q, x, dtype).items():
            t_raw, t_pub = graph_per_call_us(raw), graph_per_call_us(unchecked)
            graph_rows.append(t_pub / t_raw)
            rows.append(dict(n=n, dim=dim, dtype=dtype_name, variant=variant, bits=bits, op=op + "_graph",
                             raw_us=t_raw, public_us=t_pub, unchecked_us=t_pub, copy_us=copy_us))
            say(f"{variant:>8} {bits:>2} {op:>10} {t_raw:7.2f} {t_pub:7.2f} {copy_us:7.2f} {t_pub / t_raw:7.3f}")
    say(f"# graph public / raw: median {statistics.median(graph_rows):.3f}, max {max(graph_rows):.3f}")


def table_host(kt, rows: list, say) -> None:
    """Table 3: host time of one eager call, through Triton's dispatch and through the direct launch."""
    from kernels.triton import _launch

    say("\n## 3. Host cost of one eager call: dim 128, float16, full, bits 3 quantize (us per call)")
    say(f"{'N':>5} {'mode':>12} {'dispatch':>8} {'bare launch':>11} {'launcher':>9} {'no-check':>9} {'public':>8} "
        f"{'public/bare':>11} {'nochk/bare':>10}")
    q = Quantizer("full", 128, 3, seed=0, device="cuda")
    for n in (1, 256, 8192):
        x = torch.randn(n, 128, device="cuda", dtype=torch.float16)
        fns = (
            bare_quantize_launch(q, x),
            lambda x=x: kt.quantize(x, q.plan),
            lambda x=x: q.quantize(x, check=False),
            lambda x=x: q.quantize(x),
        )
        for direct in (False, True):
            _launch.DIRECT = direct
            q.plan.launches.clear()
            dispatch = "direct" if direct else "triton"
            for sync_each, mode in ((True, "sync each"), (False, "enqueue")):
                t = [host_us(f, 200, sync_each) for f in fns]
                op = f"host_{mode.replace(' ', '_')}_{dispatch}"
                rows.append(dict(n=n, dim=128, dtype="fp16", variant="full", bits=3, op=op,
                                 raw_us=t[0], public_us=t[3], unchecked_us=t[2], copy_us=float("nan")))
                say(f"{n:>5} {mode:>12} {dispatch:>8} {t[0]:11.1f} {t[1]:9.1f} {t[2]:9.1f} {t[3]:8.1f} "
                    f"{t[3] / t[0]:11.2f} {t[2] / t[0]:10.2f}")


def table_profile(say) -> None:
    """Table 4: where the default public call's host time goes (cProfile)."""
    say("\n## 4. cProfile: 2000 default public quantize calls, N = 256 (top 18 by own time)")
    q = Quantizer("full", 128, 3, seed=0, device="cuda")
    x = torch.randn(256, 128, device="cuda", dtype=torch.float16)
    q.quantize(x)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(2000):
        q.quantize(x)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(18)
    say(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--dims", default="128,512")
    parser.add_argument("--quick", action="store_true", help="dim 128, float16 and bits 3 only in table 1")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="table 1's variants (comma-separated)")
    parser.add_argument("--tables", default="1,2,3,4", help="which tables to run (comma-separated)")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = io.StringIO()

    def say(line: str = "") -> None:
        print(line, flush=True)
        log.write(line + "\n")

    import kernels.triton as kt

    props = torch.cuda.get_device_properties(0)
    say(
        f"# bench_api  card: {props.name} ({props.multi_processor_count} SMs)  "
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  torch {torch.__version__}  "
        f"CPU: {cpu_name()}"
    )
    tables = {int(t) for t in args.tables.split(",")}
    dims = (128,) if args.quick else tuple(int(d) for d in args.dims.split(","))
    dtypes = ("fp16",) if args.quick else tuple(DTYPES)
    bits_list = (3,) if args.quick else (2, 3, 4)
    variants = tuple(args.variants.split(","))
    big = [(1 << 20, d, t, v, b) for d in dims for t in dtypes for v in variants for b in bits_list]
    small = [(8192, 128, "fp16", v, b) for v in VARIANTS for b in (2, 3, 4)]
    big, small = (big if 1 in tables else []), (small if 2 in tables else [])
    say(f"# compiled in {precompile(big + small, args.workers):.0f} s")

    rows = []
    say("\n## 1. N = 2^20: median us (do_bench, L2 flushed); public / raw")
    say(f"{'dim':>4} {'dtype':>5} {'variant':>8} {'b':>2} {'op':>10} {'raw':>8} {'public':>8} {'no-check':>8} "
        f"{'copy':>8} {'pub/raw':>7} {'nochk/raw':>9} {'raw+sync':>8} {'flag+sync':>9} {'nochk+sync':>10} "
        f"{'pub/rsync':>8}")
    for n, dim, dtype_name, variant, bits in big:
        dtype = DTYPES[dtype_name]
        q = Quantizer(variant, dim, bits, seed=0, device="cuda")
        x = torch.randn(n, dim, device="cuda", dtype=dtype)
        copy_us = copy_us_of(x)
        for op, (raw, public, unchecked, flagged) in calls(kt, q, x, dtype).items():
            fns = (raw, public, unchecked, synced(raw), synced(flagged), synced(unchecked))
            t_raw, t_pub, t_unc, t_sync, t_flag, t_unc_sync = (bench_median_us(f) for f in fns)
            row = dict(n=n, dim=dim, dtype=dtype_name, variant=variant, bits=bits, op=op, raw_us=t_raw,
                       public_us=t_pub, unchecked_us=t_unc, copy_us=copy_us, raw_sync_us=t_sync,
                       raw_flag_sync_us=t_flag, unchecked_sync_us=t_unc_sync)
            rows.append(row)
            say(f"{dim:>4} {dtype_name:>5} {variant:>8} {bits:>2} {op:>10} {t_raw:8.1f} {t_pub:8.1f} {t_unc:8.1f} "
                f"{copy_us:8.1f} {t_pub / t_raw:7.3f} {t_unc / t_raw:9.3f} {t_sync:8.1f} {t_flag:9.1f} "
                f"{t_unc_sync:10.1f} {t_pub / t_sync:8.3f}")
        del x
    for label, over, under in (
        ("public / raw", "public_us", "raw_us"),
        ("check=False / raw", "unchecked_us", "raw_us"),
        ("raw+sync / raw (any synchronous call's floor)", "raw_sync_us", "raw_us"),
        ("public / raw+sync", "public_us", "raw_sync_us"),
        ("public / (flagged raw + sync), the default call over its own floor", "public_us", "raw_flag_sync_us"),
    ) if rows else ():
        say_ratios(say, label, [r[over] / r[under] for r in rows])

    if small:
        table_graphs(kt, small, rows, say)
    if 3 in tables:
        table_host(kt, rows, say)
    if 4 in tables:
        table_profile(say)

    with open(os.path.join(args.out, "bench_api.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "bench_api.log"), "w") as f:
        f.write(log.getvalue())


if __name__ == "__main__":
    main()
