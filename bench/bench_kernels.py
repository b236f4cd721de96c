r"""GPU benchmark of the Triton kernels: quantize, dequantize and round trip of every variant,
beside a device-to-device copy of the same input and the torch reference, measured in the same run.

    PYTHONUNBUFFERED=1 python -m bench.bench_kernels [--out DIR] [--quick | --targets] [--dims 128,512]

For N in {8192, 2^20}, dim in {64, 128, 256, 512}, bits {2, 3, 4} (and 1 for the fused variants at 2^20,
which the targets cover), dtype {float16, bfloat16, float32}, each op and variant:
- median time: triton.testing.do_bench (L2 flushed before every call, median);
- for N = 8192 also back-to-back time per call: 64 calls captured in one CUDA graph, replay time / 64
  (the copy is measured the same way);
- bytes read + written (input once, outputs once; parameters ignored), GB/s, and the fraction of the
  same-run copy bandwidth of the op's float tensor (input of quantize/round trip, output of dequantize)
  of the same N, dim and dtype (bytes-moved basis: a copy moves 2x its size);
- the torch reference path on the GPU (rows of dim 128, to fit the run in one call).
--targets narrows the run to what the kernel speed targets name: the fused variants, N = 2^20 at --dims with bits
1..4 and the three dtypes, N = 8,192 at dim 128 float16 only, no torch reference. Every run also times the
round trip with its reconstruction in the input's dtype (op ``roundtrip_same``: float16/bfloat16 inputs;
x in + x_hat in the same dtype + error out), beside the float32-output round trip.
--baseline DIR times an earlier copy of the kernels (a package ``kbase`` in DIR, same API) on the same card
in the same run, for the rows that matter most (fused variants, dim 128, float16: N = 2^20 median and
N = 8,192 back to back), so that a new version is compared on one card whatever card the run gets. Made
with ``for f in __init__ _jit _launch quantize dequantize roundtrip; do git show REV:kernels/triton/$f.py |
sed 's/kernels\.triton\./kbase./g' > .kbase/kbase/$f.py; done`` (.kbase ignored; name it in the device
call's carry).
Also the peak extra GPU memory of quantize and dequantize beyond their inputs and outputs
(torch.cuda.max_memory_allocated), and the target verdicts. Kernels are compiled first in parallel
worker processes (Triton's disk cache), since ~700 specializations compile in ~1 s each.
Full table (CSV) and log go to --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import reference  # noqa: E402
from kernels.quantizer import Quantizer  # noqa: E402
from kernels.rotations import ROTATIONS  # noqa: E402

# The fused-kernel variants first, then those the matrix kernels run (the registry says which is which).
FUSED = tuple(name for name, r in ROTATIONS.items() if r.kernel != "matrix")
VARIANTS = FUSED + tuple(name for name in ROTATIONS if name not in FUSED)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
OPS = ("quantize", "dequantize", "roundtrip")
# op timed besides OPS for 16-bit inputs: the round trip with x_hat in the input's dtype
SAME = "roundtrip_same"
GRAPH_CALLS = 64
SHORT = {"quantize": "quant", "dequantize": "deqnt", "roundtrip": "round", "roundtrip_same": "rt-in"}


def configs(quick: bool, dims: tuple[int, ...] = (64, 128, 256, 512), targets: bool = False):
    ns = (8192, 1 << 20)
    dims = (128,) if quick else dims
    for n in ns:
        for dim in (128,) if targets and n == 8192 else dims:
            for dtype in ("fp16",) if targets and n == 8192 else DTYPES:
                for variant in FUSED if targets else VARIANTS:
                    bits_list = (2, 3, 4)
                    if n == 1 << 20 and variant in FUSED and dim >= 128:
                        bits_list = (1, 2, 3, 4)
                    for bits in bits_list:
                        yield n, dim, dtype, variant, bits


# ---------------------------------------------------------------------------------------------------
# Parallel compile: run every op once on a small batch that gets the same specialization (same tile
# rows, N divisible by 16) so that the main process finds every kernel in Triton's disk cache.


def baseline_config(n: int, dim: int, dtype: str, variant: str, bits: int) -> bool:
    return dim == 128 and dtype == "fp16" and variant in FUSED


def _baseline_ops():
    base_dir = os.environ.get("KBASE_DIR")
    if not base_dir:
        return None
    sys.path.insert(0, os.path.abspath(base_dir))
    import kbase

    return kbase


def _compile_worker(jobs):
    import kernels.triton as kt

    kb = _baseline_ops()
    torch.cuda.init()
    for n, dim, dtype, variant, bits in jobs:
        if kb is not None and baseline_config(n, dim, dtype, variant, bits):
            q = Quantizer(variant, dim, bits, seed=0, device="cuda")
            x = torch.randn(8192 if n == 8192 else 1 << 18, dim, device="cuda", dtype=DTYPES[dtype])
            codes, norms = kb.quantize(x, q.plan)
            kb.dequantize(codes, norms, q.plan, DTYPES[dtype])
            kb.roundtrip(x, q.plan)
        q = Quantizer(variant, dim, bits, seed=0, device="cuda")
        # 2^18 rows get the same tile as 2^20 (>= SMALL_PROGRAMS programs at every dim)
        small = 8192 if n == 8192 else 1 << 18
        x = torch.randn(small, dim, device="cuda", dtype=DTYPES[dtype])
        codes, norms = kt.quantize(x, q.plan)
        kt.dequantize(codes, norms, q.plan, DTYPES[dtype])
        kt.roundtrip(x, q.plan)
        if DTYPES[dtype] != torch.float32:
            kt.roundtrip(x, q.plan, DTYPES[dtype])
    torch.cuda.synchronize()
    return len(jobs)


def precompile(all_configs, workers: int) -> float:
    start = time.time()
    jobs = [[] for _ in range(workers)]
    for i, cfg in enumerate(all_configs):
        jobs[i % workers].append(cfg)
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_compile_worker, jobs)
    return time.time() - start


# ---------------------------------------------------------------------------------------------------
# Timing


def bench_median_us(fn, rep: int = 20) -> float:
    """``triton.testing.do_bench``'s median (L2 flushed before each call) in us; ``rep``: ms of repeats."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median") * 1e3


def graph_per_call_us(fn, calls: int = GRAPH_CALLS, replays: int = 20) -> float:
    """Back-to-back time per call: ``calls`` launches captured in one CUDA graph, median over replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def op_bytes(op: str, n: int, dim: int, es: int, code_bytes: int) -> int:
    if op == "quantize":
        return n * dim * es + n * code_bytes + n * 4
    if op == "dequantize":
        return n * code_bytes + n * 4 + n * dim * es
    if op == SAME:
        return 2 * n * dim * es + n * 4  # x in, x_hat in the same dtype + sq_err out
    return n * dim * es + n * dim * 4 + n * 4  # round trip: x in, x_hat float32 + sq_err out


def copy_us_of(x: torch.Tensor, back_to_back: bool = False) -> float:
    """Median (or back-to-back) time of a device-to-device copy of x. Back to back, every call allocates
    its output as the ops do (torch.empty_like, then copy_), so that both write fresh memory."""
    if back_to_back:
        return graph_per_call_us(lambda: torch.empty_like(x).copy_(x))
    out = torch.empty_like(x)
    return bench_median_us(lambda: out.copy_(x))


def op_calls(kt, x: torch.Tensor, plan, dtype: torch.dtype, tile: tuple[int, int] | None = None) -> dict:
    """op -> (triton call, torch reference call) on the same inputs (codes from the Triton quantize);
    ``tile``: the fused kernels' (tile elements, warps) instead of the launch policy's (sweeps)."""
    extra = {} if tile is None else {"tile": tile}  # a --baseline copy may predate the argument
    codes, norms = kt.quantize(x, plan)
    calls = {
        "quantize": (lambda: kt.quantize(x, plan, **extra), lambda: reference.quantize(x, plan)),
        "dequantize": (
            lambda: kt.dequantize(codes, norms, plan, dtype, **extra),
            lambda: reference.dequantize(codes, norms, plan, dtype),
        ),
        "roundtrip": (lambda: kt.roundtrip(x, plan, **extra), lambda: reference.roundtrip(x, plan)),
    }
    if dtype != torch.float32:
        calls[SAME] = (lambda: kt.roundtrip(x, plan, dtype, **extra), lambda: reference.roundtrip(x, plan, dtype))
    return calls


def tile_sweep(kt, say) -> None:
    """Time the fused kernels at other (tile elements, warps) than the default, N = 2^20, fp16, dim 128."""
    say("\n## Tile sweep: N = 2^20, fp16, dim 128 (us; default tile 4096 elements, 4 warps)")
    x = torch.randn(1 << 20, 128, device="cuda", dtype=torch.float16)
    for variant, bits in (("full", 4), ("identity", 4), ("full", 2)):
        plan = Quantizer(variant, 128, bits, seed=0, device="cuda").plan
        for tile, warps in ((4096, 4), (2048, 4), (8192, 8), (4096, 8), (2048, 2), (8192, 4)):
            calls = op_calls(kt, x, plan, torch.float16, tile=(tile, warps))
            times = [bench_median_us(calls[op][0]) for op in OPS]
            say(
                f"  {variant:>8} b{bits} tile {tile:5d} warps {warps}: "
                + "  ".join(f"{op} {t:7.1f}" for op, t in zip(OPS, times, strict=True))
            )


def small_sweep(kt, say) -> None:
    """Back-to-back time per call at N = 8,192, dim 128, fp16 for other warps a program (tile 1,024
    elements, the small-batch tile), beside the default choice, to check SMALL_PER_THREAD."""
    say("\n## Small-batch sweep: N = 8192, dim 128, fp16, back-to-back us per call (tile 1024 elements)")
    x = torch.randn(8192, 128, device="cuda", dtype=torch.float16)
    say(f"  copy b2b {copy_us_of(x, back_to_back=True):.2f}")
    for variant, bits in (("full", 4), ("full", 2), ("identity", 2)):
        plan = Quantizer(variant, 128, bits, seed=0, device="cuda").plan
        for warps in (0, 2, 4, 8):
            calls = op_calls(kt, x, plan, torch.float16, tile=(1024, warps) if warps else None)
            times = [graph_per_call_us(calls[op][0]) for op in (*OPS, SAME)]
            say(
                f"  {variant:>8} b{bits} warps {warps or 'default'}: "
                + "  ".join(f"{op} {t:6.2f}" for op, t in zip((*OPS, SAME), times, strict=True))
            )


def peak_extra_bytes(fn, out_bytes: int) -> int:
    """Peak allocated during fn beyond what was allocated before it (inputs) and its outputs."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return peak - before - out_bytes


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--quick", action="store_true", help="dim 128 only")
    parser.add_argument("--dims", default="64,128,256,512", help="comma-separated dims")
    parser.add_argument("--sweep", action="store_true", help="also time other tile sizes / warps (fp16, dim 128)")
    parser.add_argument("--targets", action="store_true", help="only what the targets name (fused, see above)")
    parser.add_argument("--small-sweep", action="store_true", help="warps sweep at N = 8192 (back to back)")
    parser.add_argument("--variants", default="", help="comma-separated variants (default: all the run covers)")
    parser.add_argument("--baseline", default="", help="directory holding an earlier copy of the kernels (kbase)")
    parser.add_argument("--compile-only", action="store_true", help="fill Triton's cache and exit")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = io.StringIO()

    def say(line: str = "") -> None:
        print(line, flush=True)
        log.write(line + "\n")

    import kernels.triton as kt

    if args.baseline:
        os.environ["KBASE_DIR"] = args.baseline  # read by the compile workers too
    kb = _baseline_ops()
    base_rows = []
    props = torch.cuda.get_device_properties(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    say(
        f"# bench_kernels  card: {props.name} ({props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB)  "
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
        f"  commit: {commit or 'unknown'}  torch {torch.__version__}"
    )
    all_configs = list(configs(args.quick, tuple(int(d) for d in args.dims.split(",")), args.targets))
    if args.variants:
        wanted = set(args.variants.split(","))
        all_configs = [c for c in all_configs if c[3] in wanted]
    say(f"# compiling {len(all_configs)} configs x 3 ops in {args.workers} processes ...")
    say(f"# compiled in {precompile(all_configs, args.workers):.0f} s")
    if args.compile_only:
        return

    # Device copy bandwidth, once, large (the ceiling of the two numbers in docs/kernels-notes.md).
    t_big = copy_us_of(torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_())
    say(f"# device copy 1 GiB: {t_big:.0f} us = {2 * (1 << 30) / t_big / 1e3:.0f} GB/s (read + write)")

    rows = []
    csv_file = open(os.path.join(args.out, "bench_kernels.csv"), "w", newline="")  # written as it goes
    writer = None
    copy_cache: dict = {}
    peak: dict = {}
    current = None
    for n, dim, dtype_name, variant, bits in all_configs:
        dtype = DTYPES[dtype_name]
        es = torch.empty(0, dtype=dtype).element_size()
        if current != (n, dim, dtype_name):
            current = (n, dim, dtype_name)
            x = torch.randn(n, dim, device="cuda", dtype=dtype)
            copy_us = copy_us_of(x)
            copy_b2b = copy_us_of(x, back_to_back=True) if n == 8192 else float("nan")
            copy_cache[current] = (copy_us, copy_b2b)
            say(
                f"# copy n={n} dim={dim} {dtype_name}: {copy_us:.1f} us ({2 * x.numel() * es / copy_us / 1e3:.0f} GB/s)"
                + (f", back-to-back {copy_b2b:.2f} us" if n == 8192 else "")
            )
        copy_us, copy_b2b = copy_cache[current]
        copy_gbs = 2 * n * dim * es / copy_us / 1e3
        q = Quantizer(variant, dim, bits, seed=0, device="cuda")
        plan = q.plan
        calls = op_calls(kt, x, plan, dtype)
        for op in calls:
            fn, ref_fn = calls[op]
            t = bench_median_us(fn)
            b2b = graph_per_call_us(fn) if n == 8192 else float("nan")
            with_ref = dim == 128 and not args.targets
            t_ref = bench_median_us(ref_fn) if with_ref else float("nan")
            nbytes = op_bytes(op, n, dim, es, plan.code_bytes)
            gbs = nbytes / t / 1e3
            row = dict(
                n=n,
                dim=dim,
                dtype=dtype_name,
                variant=variant,
                bits=bits,
                op=op,
                triton_us=t,
                b2b_us=b2b,
                copy_us=copy_us,
                copy_b2b_us=copy_b2b,
                mbytes=nbytes / 1e6,
                gbs=gbs,
                frac_copy=gbs / copy_gbs,
                torch_us=t_ref,
                speedup=t_ref / t,
            )
            rows.append(row)
            if writer is None:
                writer = csv.DictWriter(csv_file, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
            csv_file.flush()
            if n == 1 << 20 and op in ("quantize", "dequantize"):
                out_bytes = (n * plan.code_bytes + n * 4) if op == "quantize" else n * dim * es
                extra = peak_extra_bytes(fn, out_bytes)
                key = (op, variant)
                peak[key] = max(peak.get(key, -(1 << 62)), extra)
        last = rows[-len(calls) :]
        del calls
        if kb is not None and baseline_config(n, dim, dtype_name, variant, bits):
            for op, fn in op_calls(kb, x, plan, dtype).items():
                if op not in OPS:
                    continue
                new = next(r for r in last if r["op"] == op)
                if n == 8192:
                    base_rows.append((n, variant, bits, op, "b2b", new["b2b_us"], graph_per_call_us(fn[0])))
                else:
                    base_rows.append((n, variant, bits, op, "median", new["triton_us"], bench_median_us(fn[0])))
        say(
            f"{n:>8} {dim:>4} {dtype_name:>4} {variant:>8} b{bits}  "
            + "  ".join(
                f"{SHORT[r['op']]} {r['triton_us']:8.1f}us {r['frac_copy']:5.2f}cp"
                + (f" b2b {r['b2b_us']:6.2f}" if n == 8192 else "")
                for r in last
            )
        )

    csv_file.close()

    if base_rows:
        say(f"\n## This version against the baseline kernels ({args.baseline}), same card, dim 128, fp16 (us)")
        say(f"{'n':>8} {'variant':>8} {'bits':>4} {'op':>10} {'timing':>6} {'new':>8} {'base':>8} {'new/base':>8}")
        for n, variant, bits, op, how, t_new, t_base in base_rows:
            say(f"{n:>8} {variant:>8} {bits:>4} {op:>10} {how:>6} {t_new:8.2f} {t_base:8.2f} {t_new / t_base:8.2f}")
    if args.sweep:
        tile_sweep(kt, say)
    if args.small_sweep:
        small_sweep(kt, say)
    try:
        # ---- summary tables ------------------------------------------------------------------------
        say("\n## Summary: N = 2^20, dim >= 128, fraction of copy bandwidth (min over dims, dtypes, bits 1..4)")
        say(f"{'variant':>9} " + " ".join(f"{op:>22}" for op in (*OPS, SAME)))
        verdict_ok = True
        for variant in VARIANTS:
            cells = []
            for op in (*OPS, SAME):
                sel = [
                    r
                    for r in rows
                    if r["n"] == 1 << 20 and r["dim"] >= 128 and r["variant"] == variant and r["op"] == op
                ]
                if not sel:
                    cells.append("-")
                    continue
                worst = min(sel, key=lambda r: r["frac_copy"])
                med = statistics.median(r["frac_copy"] for r in sel)
                cells.append(f"min {worst['frac_copy']:.2f} med {med:.2f}")
                if variant in FUSED and op in OPS and worst["frac_copy"] < 0.90:
                    verdict_ok = False
            say(f"{variant:>9} " + " ".join(f"{c:>22}" for c in cells))
        say(f"target >= 0.90 of copy (full, fast, 2d, identity): {'MET' if verdict_ok else 'MISSED'}")
        say("\nworst fused rows at 2^20, dim >= 128:")
        fused_rows = [
            r for r in rows if r["n"] == 1 << 20 and r["dim"] >= 128 and r["variant"] in FUSED and r["op"] in OPS
        ]
        for r in sorted(fused_rows, key=lambda r: r["frac_copy"])[:12]:
            say(
                f"  {r['op']:>10} {r['variant']:>8} d={r['dim']} b={r['bits']} {r['dtype']}: {r['triton_us']:.1f} us, "
                f"{r['gbs']:.0f} GB/s, {r['frac_copy']:.3f} of copy"
            )

        say("\n## N = 8192, dim 128, fp16, back-to-back per call (CUDA graph of 64 calls), us")
        say(
            f"{'variant':>9} {'bits':>4} {'quantize':>9} {'dequant':>9} {'roundtrip':>9} {'copy':>6} {'rt/copy':>8}"
            f" {'rt fp16 out':>11} {'/copy':>6}"
        )
        for variant in VARIANTS:
            for bits in (2, 3, 4):
                sel = {
                    r["op"]: r
                    for r in rows
                    if r["n"] == 8192
                    and r["dim"] == 128
                    and r["dtype"] == "fp16"
                    and r["variant"] == variant
                    and r["bits"] == bits
                }
                if len(sel) < 4:
                    continue
                rt, same = sel["roundtrip"], sel[SAME]
                say(
                    f"{variant:>9} {bits:>4} {sel['quantize']['b2b_us']:9.2f} {sel['dequantize']['b2b_us']:9.2f} "
                    f"{rt['b2b_us']:9.2f} {rt['copy_b2b_us']:6.2f} {rt['b2b_us'] / rt['copy_b2b_us']:8.2f}"
                    f" {same['b2b_us']:11.2f} {same['b2b_us'] / rt['copy_b2b_us']:6.2f}"
                )
        say("target: round trip <= 1.3x copy (full, fast, 2d, identity)")

        say("\n## Peak extra GPU memory beyond inputs and outputs, N = 2^20 (max over dims, dtypes, bits), bytes")
        for (op, variant), extra in sorted(peak.items()):
            say(f"  {op:>10} {variant:>8}: {extra}")

        say("\n## Triton vs torch reference on the GPU, N = 2^20 fp16, dim 128, bits 4 (us)")
        for r in rows:
            if r["n"] == 1 << 20 and r["dim"] == 128 and r["dtype"] == "fp16" and r["bits"] == 4:
                say(
                    f"  {r['op']:>10} {r['variant']:>8}: triton {r['triton_us']:8.1f}  torch {r['torch_us']:9.1f}  "
                    f"x{r['speedup']:.0f}"
                )
    except Exception:  # keep the log and the tables above
        import traceback

        say(traceback.format_exc())
    with open(os.path.join(args.out, "bench_kernels.log"), "w") as f:
        f.write(log.getvalue())


if __name__ == "__main__":
    main()
