"""The Gluon kernels (``kernels.triton._gluon``) compiled for sm_90 on any machine (Triton ships
ptxas), with the counts of their machine code: instructions, warp shuffles, shared-memory accesses,
barriers, registers a thread and local-memory accesses (spills). No GPU is needed; TRITON_INTERPRET must be
unset (the interpreter wraps the Triton helpers that the kernels call).

    python -m bench.sass quantize:128:4:float16 roundtrip:256:2:bfloat16     # a table
    python -m bench.sass --json quantize:128:4:float16:1048576:word           # what the tests read

A case is op:dim:bits:dtype[:rows[:word|bytes[:variant]]] (rows 2^20, word access and hadamard by default; other
variants: quantize of the block rotations, e.g. quantize:256:3:float16:1048576:word:full, and of 2d and identity,
routed there at bits 4 and at bits 3 of 16-bit inputs, and compiled there otherwise); the launch's tile
(``_launch.fused_tile``) and lane layout are those of a real launch of that many rows.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_sm90(
    op: str, dim: int, bits: int, dtype: torch.dtype, rows: int = 1 << 20, word: bool = True, variant: str = "hadamard"
):
    """(compiled kernel, (W, BN, warps), ``_gluon.LanePlan``) of the op's Gluon kernel for a quantizer of (variant,
    dim, bits) launched on ``rows`` rows of ``dtype``: contiguous, 16-byte aligned tensors. Variants other than
    hadamard and kronecker: quantize only, of the plan kernels in ``_gluon.LANE_QUANTIZE_KERNELS``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernels import Quantizer
    from kernels.triton import _gluon
    from kernels.triton._launch import family_id, fused_tile, lane_maxnreg

    plan = Quantizer(variant, dim, bits, seed=0, backend="torch").plan
    width, block_rows, warps = fused_tile(plan, rows, op)
    stored = None if op == "quantize" else dtype  # what the kernel stores as floats picks the piece width
    loaded = dtype if op == "quantize" else None  # the quantize's input dtype routes 2d and identity (bits 3)
    lane = _gluon.lane_layout(plan, torch.device("cuda"), width, block_rows, warps, stored, op != "quantize", loaded)
    if lane is None and op == "quantize" and plan.kernel in ("pairs", "none"):  # compiled, not yet launched
        lane = _gluon._lane_plan(width, block_rows, warps, 8, False)
    if lane is None:
        raise ValueError(f"{op} dim {dim} over {rows} rows runs the plain kernels, not Gluon")
    const = dict(DIM=dim, N_CODED=plan.n_coded, BN=block_rows, W=width, BITS=bits, SYMMETRIC=plan.symmetric)
    const.update(LANES=lane)
    t = TRITON_TYPES[dtype]
    if op == "quantize":
        fn = _gluon._quantize_kernel
        table = "i64" if plan.search_grid is not None else "fp32"  # what the launcher passes (Plan.search_table)
        pointers = dict(x_ptr=t, codes_ptr="u8", norms_ptr="fp32", signs_ptr="fp32", p1_ptr="fp32", bnd_ptr=table)
        scalars = ["N", "stride_xr", "stride_cr"]
        const.update(CODE_BYTES=plan.code_bytes, stride_xc=1, stride_cc=1, WORD=word, FAMILY=family_id(plan))
    elif op == "dequantize":
        fn = _gluon._dequantize_kernel
        pointers = dict(codes_ptr="u8", norms_ptr="fp32", out_ptr=t, signs_ptr="fp32", cent_ptr="fp32")
        scalars = ["N", "stride_cr", "stride_or"]
        const.update(CODE_BYTES=plan.code_bytes, stride_cc=1, stride_n=1, stride_oc=1, WORD=word)
    elif op == "roundtrip":
        fn = _gluon._roundtrip_kernel
        pointers = dict(x_ptr=t, out_ptr=t, err_ptr="fp32", signs_ptr="fp32", bnd_ptr="fp32", cent_ptr="fp32")
        scalars = ["N", "stride_xr", "stride_or"]
        const.update(stride_xc=1, stride_oc=1)
    else:
        raise ValueError(f"op must be quantize, dequantize or roundtrip, got {op!r}")
    pointers["flag_ptr"] = "i32"  # the bad-row flag of a checked call (the default public path)
    const["HAS_FLAG"] = True
    types = {name: "*" + ty for name, ty in pointers.items()} | dict.fromkeys(scalars, "i32")
    types |= dict.fromkeys(const, "constexpr")
    order = list(fn.arg_names)
    aligned = [order.index(name) for name in [*pointers, *scalars[1:]]]  # pointers and row strides: % 16
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = GluonASTSource(fn, {name: types[name] for name in order}, const, attrs)
    options = {"num_warps": warps, "maxnreg": lane_maxnreg(op, warps)}  # as the launcher compiles it
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return kernel, (width, block_rows, warps), lane


def counts(kernel) -> dict[str, int]:
    """Instruction counts of a compiled kernel's SASS, its static shared memory in bytes and the registers a
    thread (the highest register named, plus one: what limits the warps an SM holds)."""
    from triton.tools.disasm import get_sass

    sass = [line for line in get_sass(kernel.asm["cubin"]).splitlines() if line.rstrip().endswith(";")]

    def matching(pattern: str) -> int:
        return sum(1 for line in sass if re.search(pattern, line))

    registers = [int(r) for line in sass for r in re.findall(r"\bR(\d+)\b", line)]
    return {
        "registers": max(registers, default=-1) + 1,
        "local_accesses": matching(r"\b(LDL|STL)\b"),
        "instructions": len(sass),
        "shuffles": matching(r"\bSHFL\b"),
        "float_multiplies": matching(r"\bFMUL\b"),
        "float_selects": matching(r"\bFSEL\b"),
        "float_compares": matching(r"\bFSETP\b"),
        "saturating_adds": matching(r"\bFADD\.SAT\b"),
        "shared_accesses": matching(r"\b(LDS|STS)\b"),
        "barriers": matching(r"\bBAR\b"),
        "shared_bytes": kernel.metadata.shared,
    }


def parse_case(text: str) -> tuple[str, int, int, torch.dtype, int, bool, str]:
    parts = text.split(":")
    op, dim, bits, dtype = parts[0], int(parts[1]), int(parts[2]), DTYPES[parts[3]]
    rows = int(parts[4]) if len(parts) > 4 else 1 << 20
    word = (parts[5] if len(parts) > 5 else "word") == "word"
    return op, dim, bits, dtype, rows, word, parts[6] if len(parts) > 6 else "hadamard"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", help="op:dim:bits:dtype[:rows[:word|bytes[:variant]]]")
    parser.add_argument("--json", action="store_true", help="one JSON object: case -> counts, tile, stages")
    args = parser.parse_args(argv)
    results = {}
    for case in args.cases:
        kernel, tile, lanes = compile_sm90(*parse_case(case))
        stages = {k: bin(getattr(lanes, k)) for k in ("memory_stages", "compute_stages", "lane_stages")}
        results[case] = counts(kernel) | {"tile": tile, "piece": tile[0] // lanes.memory.threads_per_warp[1]} | stages
    if args.json:
        json.dump(results, sys.stdout)
        return
    print(
        "| case | W, BN, warps | columns a thread | stages across lanes | instructions | shuffles | shared | "
        "registers | local (spills) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, r in results.items():
        print(
            f"| {case} | {r['tile']} | {r['piece']} | {r['lane_stages']} | {r['instructions']} | {r['shuffles']} | "
            f"{r['shared_accesses']} | {r['registers']} | {r['local_accesses']} |"
        )


if __name__ == "__main__":
    main()
