"""The Gluon kernels of the hadamard rotation (``kernels.triton._gluon``).

Gluon cannot run under the interpreter. On the CPU the kernels are compiled for sm_90 (Triton ships ptxas)
and the machine code is checked for what the design promises: no shared memory and no barrier, the
Walsh-Hadamard butterflies staying in registers and warp shuffles. On the GPU (marker ``gpu``) the ops are
checked against the torch reference with tests/kernels/test_triton_ops.py's ``check_ops``, for the shapes
that route to these kernels (asserted), and against the plain Triton kernels byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import Quantizer
from kernels.packing import unpack_codes
from tests.kernels.test_triton_ops import DTYPES, _near_boundary, _rotated, _rows_close, check_ops, needs_cuda

kt = pytest.importorskip("kernels.triton")
G = pytest.importorskip("kernels.triton._gluon")
from kernels.triton._launch import LANE_MAXNREG, LANE_RT_256, fused_tile, lane_maxnreg, word_access  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plan(dim: int, bits: int):
    return Quantizer("hadamard", dim, bits, seed=3, backend="torch").plan


def test_lane_plan_covers_the_tile_and_partitions_the_stages():
    """Both layouts cover the [BN, W] tile once (no element held twice, none missing) with the same rows and
    lanes: R rows x ``piece`` columns a thread, L lanes a row. ``memory`` holds pieces of 4-8 consecutive
    columns on adjacent lanes (16 or 8 bytes of what the kernel stores), ``compute`` the thread's columns
    consecutively (whole groups of 8 codes). Every stage of the transform runs once: in one layout inside a
    thread, or across lanes. With the exchange (dequantize, round trip), at N = 2^20 and dims <= 256 no stage
    needs a shuffle; quantize keeps to the memory layout."""
    cuda = torch.device("cuda")
    for dim in (2, 5, 8, 64, 100, 128, 256, 512, 1000, 1024):
        plan = _plan(dim, 4)
        for op in ("quantize", "dequantize", "roundtrip"):
            for n in (1, 7, 300, 5000, 1 << 20):
                width, rows, warps = fused_tile(plan, n, op)
                stored = torch.float32 if op != "quantize" and n % 2 else torch.float16
                exchange = op != "quantize"  # as the launchers call it
                lane = G.lane_layout(plan, cuda, width, rows, warps, stored, exchange)
                # Every tile up to dim 256 runs here; wider rows where their tile gives a thread enough
                # columns for one warp to span the row (small batches, 8-16 elements a thread, keep the
                # plain kernels there).
                if plan.n_coded < 8:  # dims 1-4: not whole groups of 8 codes (the word masks assume them)
                    assert lane is None, (dim, op, n)
                elif dim <= 256 or (n == 1 << 20 and op != "roundtrip"):
                    assert lane is not None, (dim, op, n)
                if lane is None:
                    continue
                per_thread = width * rows // (32 * warps)
                (r, vec), (tr, lanes), (wr, wc) = (
                    lane.memory.size_per_thread,
                    lane.memory.threads_per_warp,
                    lane.memory.warps_per_cta,
                )
                piece = width // lanes
                assert r * piece == per_thread and piece % 8 == 0
                if exchange:
                    assert lane.compute.size_per_thread == [r, piece] and lane.compute.threads_per_warp == [tr, lanes]
                    assert vec in ((4,) if stored == torch.float32 and lanes > 1 else (4, 8)), (dim, op, n)
                else:  # everything in the memory layout, whole groups of 8 a piece
                    assert lane.compute == lane.memory and vec == 8 and lane.compute_stages == 0
                assert tr * lanes == 32 and wc == 1 and r * tr * wr == rows and wr == warps, (dim, op, n)
                everything = (1 << (width.bit_length() - 1)) - 1
                masks = (lane.memory_stages, lane.compute_stages, lane.lane_stages)
                assert masks[0] | masks[1] | masks[2] == everything and sum(bin(m).count("1") for m in masks) == (
                    width.bit_length() - 1
                )
                if n == 1 << 20 and exchange:
                    assert lane.lane_stages == 0 or dim > 256, (dim, op)


def test_lane_layout_routes_hadamard_and_the_quantize_of_block_rotations_on_cuda():
    plan = _plan(128, 4)
    width, rows, warps = fused_tile(plan, 1 << 20, "quantize")
    assert G.lane_layout(plan, torch.device("cpu"), width, rows, warps) is None  # the interpreter's device
    full = Quantizer("full", 128, 4, backend="torch").plan
    assert G.lane_layout(full, torch.device("cuda"), width, rows, warps) is None  # dequantize, round trip
    # Quantize of the block rotations runs in Gluon too (no exchange); 2d and identity where the plan has a grid
    # search (bits 4), not at bits 3.
    for variant, bits, routed in (("full", 4, True), ("fast", 3, True), ("2d", 4, True), ("identity", 4, True),
                                  ("2d", 3, False), ("identity", 3, False), ("dense", 4, False)):  # fmt: skip
        other = Quantizer(variant, 128, bits, backend="torch").plan
        got = G.lane_layout(other, torch.device("cuda"), width, rows, warps, exchange=False)
        assert (got is not None) == routed, (variant, bits)
    # ... and 2d and identity at bits 3 with 16-bit inputs (the steps search), every column coded.
    steps_cases = (("2d", 128, torch.float16, True), ("identity", 128, torch.bfloat16, True),
                   ("identity", 128, torch.float32, False), ("2d", 120, torch.float16, False))  # fmt: skip
    for variant, dim, dtype, routed in steps_cases:
        other = Quantizer(variant, dim, 3, backend="torch").plan
        got = G.lane_layout(other, torch.device("cuda"), *fused_tile(other, 1 << 20, "quantize"), None, False, dtype)
        assert (got is not None) == routed == G.steps_search(other, fused_tile(other, 1 << 20, "quantize")[0], dtype)
    odd = Quantizer("full", 100, 4, backend="torch").plan  # n_coded 100: not whole groups of 8 codes
    assert G.lane_layout(odd, torch.device("cuda"), *fused_tile(odd, 1 << 20, "quantize"), exchange=False) is None
    for dim, routed in ((128, True), (64, True), (96, False), (384, False)):  # kronecker: one block, or m > 1
        kron = Quantizer("kronecker", dim, 4, seed=2, backend="torch").plan
        got = G.lane_layout(kron, torch.device("cuda"), *fused_tile(kron, 1 << 20, "quantize"))
        assert (got is not None) == routed, dim
    kron = Quantizer("kronecker", 128, 4, seed=2, backend="torch").plan  # its 1 x 1 mix folds into the signs
    assert torch.equal(kron.lane_signs, kron.params["signs"] * float(kron.params["mix"]))
    table = kron.lane_sign_table  # the signs, then each column pair's sign bits as one 16-bit-pair XOR mask
    assert torch.equal(table[:128], kron.lane_signs)
    pairs = torch.tensor([-1.0, 1.0], dtype=torch.float16).repeat(64)  # a pair's 16-bit halves, low first
    flipped = (pairs.view(torch.int32) ^ table[128:].view(torch.int32)).view(torch.float16)
    assert torch.equal(flipped, pairs * kron.lane_signs.half())
    tiny = _plan(4, 4)  # 2 bytes of codes a row: not a whole group of 8 codes
    assert G.lane_layout(tiny, torch.device("cuda"), *fused_tile(tiny, 1 << 20, "quantize")) is None
    wide = _plan(2048, 4)  # a row wider than one warp spans keeps the plain kernels
    assert G.lane_layout(wide, torch.device("cuda"), *fused_tile(wide, 1 << 20, "quantize")) is None


# op:dim:bits:dtype:rows:access: padding (dims 5, 100), the narrowest row (8), the widest row (1024), the
# bits-2 and bits-1 word tricks, bits 3 as bytes, bits 5-8 (binary search, gathers), small-batch tiles,
# strided codes (bytes).
COMPILE_CASES = [
    "quantize:128:4:float16:1048576:word",
    "quantize:256:2:bfloat16:1048576:word",
    "quantize:64:3:float32:1048576:word",
    "quantize:5:7:float16:1048576:bytes",
    "quantize:1024:1:float32:1048576:word",
    "dequantize:128:2:float16:1048576:word",
    "dequantize:100:3:bfloat16:300:bytes",
    "dequantize:8:8:float32:1048576:word",
    "dequantize:64:2:float32:1048576:word",
    "dequantize:128:3:float32:1048576:bytes",
    "dequantize:256:1:float16:7:word",
    "roundtrip:128:4:bfloat16:1048576:word",
    "roundtrip:64:6:float32:1048576:word",
    "roundtrip:200:2:float16:1048576:word",
    "roundtrip:256:4:bfloat16:1048576:word",
    "roundtrip:256:3:float16:300:word",
]


def _sass_counts(cases: list[str]) -> dict:
    """bench/sass.py's counts for ``cases``, compiled in one process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.sass", "--json", *cases],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def sm90_counts():
    """The counts for COMPILE_CASES (~20 s)."""
    return _sass_counts(COMPILE_CASES)


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiles_for_sm90_with_warp_local_exchanges(case, sm90_counts):
    """The point of the Gluon kernels, read from the sm_90 machine code: the only shared-memory traffic is
    the warp-local exchanges between layouts (16-byte accesses: a quarter of an access an element; none in
    quantize, one in dequantize, there and back in the round trip), with no barrier but one between two
    exchanges (they reuse one scratch buffer); stages across lanes are warp shuffles."""
    op, dim, bits = case.split(":")[0], int(case.split(":")[1]), int(case.split(":")[2])
    got = sm90_counts[case]
    width, rows, warps = got["tile"]
    per_thread = width * rows // (32 * warps)
    passes = 2 if op == "roundtrip" else 1  # the round trip transforms forward and back
    exchanges = {"quantize": 0, "dequantize": 1, "roundtrip": 2}[op]
    assert got["barriers"] <= max(0, exchanges - 1), got
    assert got["shared_accesses"] <= exchanges * max(8, per_thread // 4) * 2, got  # 0 for quantize
    n_coded = _plan(dim, bits).n_coded
    across = sum(1 for s in range(12) if (int(got["lane_stages"], 2) >> s) & 1 and (1 << s) < n_coded)
    assert got["shuffles"] >= passes * across * per_thread, got


# quantize of the rotations of consecutive columns (variant last): blocks (full, fast), and pairs (2d) and none
# (identity), routed here at bits 4 (the grid search); a small-batch tile; a padded row (dim 40 in W 64).
BLOCK_CASES = [
    "quantize:256:3:float16:1048576:word:full",
    "quantize:128:2:bfloat16:1048576:word:fast",
    "quantize:512:4:float32:1048576:word:full",
    "quantize:40:5:float16:300:word:full",
    "quantize:128:3:bfloat16:1048576:bytes:2d",
    "quantize:256:4:float16:1048576:word:identity",
]


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_rotation_quantize_stays_in_threads(case, sm90_quantize_counts):
    """The point of running the block rotations' quantize in Gluon, read from the sm_90 machine code: each 4-D
    block (or pair) sits in one thread of the memory layout, so nothing goes through shared memory (the plain
    kernel converts layouts there for 16-bit inputs) and the only shuffles are the row norm's reduction over the
    row's lanes, for each of the thread's rows; no spills. full and fast hold 16 columns of 2 rows a thread
    (``_gluon.BLOCK_PIECE``), 2d and identity 32 of one."""
    got = sm90_quantize_counts[case]
    width, rows, warps = got["tile"]
    lanes_a_row = width // got["piece"]
    per_thread = width * rows // (32 * warps)
    rows_a_thread = per_thread // got["piece"]
    piece = max(G.BLOCK_PIECE, width // 32) if case.split(":")[-1] in ("full", "fast") else per_thread
    assert got["piece"] == min(piece, per_thread, width), got
    assert got["shared_accesses"] == 0 and got["barriers"] == 0 and got["local_accesses"] == 0, got
    assert got["shuffles"] <= rows_a_thread * max(1, lanes_a_row.bit_length() - 1) + 1, got


# hadamard's quantize with its stages across lanes (64 and 32 elements a thread), 2-bit (a search without float
# selects) and 3-bit codes, and full's (blocks in a thread); the most float multiplies an element each may keep:
# hadamard the random signs that ptxas does not fold into a first-stage FFMA (0.36-0.72 an element), full the
# first product of each rotated coordinate (1 an element). Before the scaled thresholds: 2.5 and 2.1.
SCALED_QUANTIZE_CASES = [
    ("quantize:256:2:float16:1048576:word", 0.75),
    ("quantize:128:3:float32:1048576:word", 0.75),  # (16-bit inputs: the steps search, STEPS_CASES)
    ("quantize:128:3:bfloat16:1048576:word", 2.0),  # + the steps: |y| times a power of two (exact), thresholds
    ("quantize:256:2:float16:1048576:word:full", 1.25),
]


@pytest.mark.parametrize("case,multiplies", SCALED_QUANTIZE_CASES)
def test_quantize_scales_rows_not_elements(case, multiplies, sm90_quantize_counts):
    """sm_90 machine code of quantize: with the scaled thresholds no element is multiplied by the row's scale
    (hadamard before: 162 FMULs a thread of 64 at dim 256 bits 3), and a butterfly stage across lanes is one
    FFMA an element, not a select between a sum and a difference (before: one FSEL an element a stage)."""
    got = sm90_quantize_counts[case]
    width, rows, warps = got["tile"]
    per_thread = width * rows // (32 * warps)
    assert got["float_multiplies"] <= multiplies * per_thread, got
    tree = int(case.split(":")[2]) == 3 and ":float32:" in case  # the 3-bit tree picks its second threshold
    selects_a_search = 1 if tree else 0
    assert got["float_selects"] <= selects_a_search * per_thread + 4, got


# The bits-4 quantize of each family, with the grid search (Plan.search_grid): the tree picked 3 thresholds an
# element with FSEL (96 a thread of 32 elements at dim 128), the grid none (a lookup and one compare).
GRID_CASES = [
    "quantize:128:4:float16:1048576:word:full",
    "quantize:128:4:bfloat16:1048576:word:identity",
    "quantize:256:4:float32:1048576:word:2d",
    "quantize:128:4:float16:1048576:word",
]


@pytest.mark.parametrize("case", GRID_CASES)
def test_bits_4_quantize_searches_the_grid(case, sm90_quantize_counts):
    """sm_90 machine code of the bits-4 Gluon quantize: no select tree (at most 4 FSELs a thread, for the row
    norms' clamps), no spills, no shared memory."""
    got = sm90_quantize_counts[case]
    assert got["float_selects"] <= 4 and got["local_accesses"] == 0 and got["shared_accesses"] == 0, got


# The bits-3 Gluon quantize of 16-bit inputs codes by saturating steps (_gluon._code_words_3bit); float32 keeps the
# select tree (2 compares an element on |y|, one FSEL picking the second threshold).
STEPS_CASES = [
    "quantize:128:3:float16:1048576:word:full",
    "quantize:256:3:bfloat16:1048576:word:identity",
    "quantize:128:3:float16:1048576:word:2d",
    "quantize:128:3:bfloat16:1048576:word",
    "quantize:128:3:float32:1048576:word:full",
]


@pytest.fixture(scope="module")
def sm90_quantize_counts():
    """The counts for the quantize case lists below and above (BLOCK, SCALED_QUANTIZE, GRID and STEPS cases), in
    one compiling process."""
    cases = [*BLOCK_CASES, *(case for case, _ in SCALED_QUANTIZE_CASES), *GRID_CASES, *STEPS_CASES]
    return _sass_counts(list(dict.fromkeys(cases)))


@pytest.mark.parametrize("case", STEPS_CASES)
def test_bits_3_quantize_of_16_bit_inputs_steps_on_the_fma_pipe(case, sm90_quantize_counts):
    """sm_90 machine code of the bits-3 Gluon quantize: 16-bit inputs take three FADD.SAT an element and no
    compare or select an element (before: 100 FSETP, 98 SEL and 32 FSEL a thread of 32 at dim 128, full);
    float32 inputs keep the tree. No spills, no shared memory."""
    got = sm90_quantize_counts[case]
    width, rows, warps = got["tile"]
    per_thread = width * rows // (32 * warps)
    assert got["local_accesses"] == 0 and got["shared_accesses"] == 0, got
    if ":float32:" in case:
        assert got["saturating_adds"] == 0 and got["float_compares"] >= 2 * per_thread, got
    else:
        assert got["saturating_adds"] == 3 * per_thread, got
        assert got["float_compares"] <= 8 and got["float_selects"] <= 4, got


def test_steps_search_dtypes_are_the_inputs_other_than_float32():
    """The kernel picks the steps search for every input that is not float32; the routing of 2d and identity
    names the dtypes (SAT_SEARCH_DTYPES). A new input dtype must be placed in both."""
    from kernels import INPUT_DTYPES

    assert set(INPUT_DTYPES.values()) - {torch.float32} == set(G.SAT_SEARCH_DTYPES), INPUT_DTYPES


def _steps_words(y: torch.Tensor, positive: torch.Tensor, t_scale: torch.Tensor) -> torch.Tensor:
    """``_gluon._code_words_3bit``'s arithmetic in float32 torch (sat as clamp): y [N, 8 g], the three positive
    boundaries, t_scale [N] -> int64 words [N, g]."""
    exponent = (t_scale.view(torch.int32) >> 23) & 0xFF
    big = ((294 - exponent) << 23).view(torch.float32)[:, None]
    a = y.abs() * big
    steps = [(a - (p * t_scale)[:, None] * big).clamp(0, 1) for p in positive]
    half_count = (steps[0] + steps[1]) + (steps[2] + 0.5)
    j = torch.arange(8, dtype=torch.int32).repeat(y.shape[1] // 8)
    minus_weight = ((128 + 3 * j) << 23) | (-(1 << 31))
    weight = (((0.0 - y).view(torch.int32) & (-(1 << 31))) ^ minus_weight).view(torch.float32)
    total = (weight * half_count).reshape(y.shape[0], -1, 8).sum(dim=2)
    return (total * 0.5 + 8388607.5).long()


def test_steps_search_arithmetic_gives_the_tree_codes():
    """The steps search's algebra (exact steps, the sign of 0 - y, the weighted sum and its offset), replayed in
    float32 torch on the CPU, packs the reference's codes of y / t_scale: values on every scaled boundary and
    one float either side, +-0, tiny and huge row scales, dims 8 to 4096 (the smallest boundaries)."""
    for dim in (8, 128, 4096):
        plan = Quantizer("identity", dim, 3, seed=0, backend="torch").plan
        positive = plan.boundaries[4:].float()
        for scale in (1.1e-19, 3e-7, 1.0, 2.5e4, 1.8e19):
            ts = torch.full((6,), scale, dtype=torch.float32)
            edges = torch.cat([positive * scale, -positive * scale]).float()
            near = torch.cat([edges, edges.nextafter(edges * 2), edges.nextafter(edges * 0)])
            rows = torch.cat([near, torch.tensor([0.0, -0.0, scale, -scale, scale * 1e-30, 3 * scale])])
            y = rows.repeat(6 * 8 * 4)[: 6 * 8 * 4].reshape(6, -1).clone()
            y[1] = y[0].flip(0)
            y[2] = torch.randn(y.shape[1]) * scale / dim**0.5
            words = _steps_words(y, positive, ts)
            codes = torch.stack([(words >> (3 * k)) & 7 for k in range(8)], dim=2).reshape(y.shape)
            # The tree's rule (_jit._code_search): 4 + c for y > 0, else 3 - c, c the number of scaled positive
            # boundaries strictly below |y| (y on a negative boundary codes above it, unlike the reference).
            c = (y.abs()[:, :, None] > (positive[None, :] * ts[:, None])[:, None, :]).sum(dim=2)
            tree = torch.where(y > 0, 4 + c, 3 - c)
            assert torch.equal(codes, tree), (dim, scale)
            scaled = plan.boundaries.float()[None, :] * ts[:, None]
            strict = (y[:, :, None] > scaled[:, None, :]).sum(dim=2)
            on_negative = (y[:, :, None] == -(positive[None, :] * ts[:, None])[:, None, :]).any(dim=2)
            assert torch.equal(codes[~on_negative], strict[~on_negative]) and on_negative.any(), (dim, scale)


@pytest.mark.parametrize("case", [c for c in COMPILE_CASES if c.startswith("roundtrip")])
def test_round_trip_fits_its_register_cap(case, sm90_counts):
    """The round trip holds at most LANE_MAXNREG registers a thread, so that an SM keeps 16 of its 2-warp
    programs' warps (at 146-183 registers it kept 10-12, and measured up to 1.23x slower: BENCHMARKS.md §9);
    the one-warp programs of W 256 at large batches (LANE_RT_256) take what they need, without spilling."""
    got = sm90_counts[case]
    width, rows, warps = got["tile"]
    if warps == 1:  # LANE_RT_256 (W 256, large batches): uncapped, and no spills
        assert (width * rows, warps) == LANE_RT_256 and got["local_accesses"] == 0, got
        assert lane_maxnreg("roundtrip", warps) is None
    else:
        assert 32 <= got["registers"] <= LANE_MAXNREG["roundtrip"] == lane_maxnreg("roundtrip", warps), got


# ---------------------------------------------------------------------------------------------------
# GPU

GPU_CASES = [
    (dim, bits, dtype)
    for dim, bits, dtype in [
        (64, 2, "float16"),
        (128, 3, "bfloat16"),
        (256, 4, "float32"),
        (8, 1, "float16"),
        (5, 6, "bfloat16"),
        (100, 8, "float32"),
    ]
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dim,bits,dtype", GPU_CASES)
@pytest.mark.parametrize("n", [4099, 300, 1])
def test_ops_match_reference_gpu(dim, bits, dtype, n):
    plan = _plan(dim, bits)  # dims <= 256: every op and batch size runs the Gluon kernels
    for op in ("quantize", "dequantize", "roundtrip"):
        assert G.lane_layout(plan, torch.device("cuda"), *fused_tile(plan, n, op)) is not None, op
    check_ops("hadamard", dim, bits, DTYPES[dtype], n=n, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dim,bits,dtype", [(128, 3, "float16"), (64, 4, "float32"), (256, 2, "bfloat16")])
def test_kronecker_one_block_gpu(dim, bits, dtype):
    """kronecker at a power-of-two dim (one block: signs, one transform, a +-1 mix) runs these kernels."""
    plan = Quantizer("kronecker", dim, bits, seed=11, backend="torch").plan
    for op in ("quantize", "dequantize", "roundtrip"):
        assert G.lane_layout(plan, torch.device("cuda"), *fused_tile(plan, 4099, op)) is not None, op
    check_ops("kronecker", dim, bits, DTYPES[dtype], n=4099, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "variant,dim,bits,dtype",
    [("full", 256, 3, "float16"), ("fast", 128, 2, "bfloat16"), ("full", 512, 4, "float32"),
     ("full", 40, 5, "float16"), ("fast", 1024, 1, "bfloat16"), ("full", 64, 8, "float32"),
     ("2d", 128, 4, "float16"), ("identity", 256, 4, "bfloat16"), ("2d", 512, 4, "float32"),
     ("identity", 64, 4, "float32"), ("2d", 256, 3, "bfloat16"), ("identity", 128, 3, "float16"),
     ("identity", 512, 3, "bfloat16")],
)  # fmt: skip
@pytest.mark.parametrize("n", [1 << 14, 4099, 300, 1])
def test_block_rotation_quantize_gpu(variant, dim, bits, dtype, n):
    """full and fast quantize in the Gluon kernel, and 2d and identity at bits 4 (the grid search) and at bits 3
    with 16-bit inputs (the steps search), asserted where it runs (rows of 512 or more at small batches keep
    the plain kernel, a warp spanning no such row at 8 elements a thread), against the reference."""
    plan = Quantizer(variant, dim, bits, seed=4, backend="torch").plan
    tile = fused_tile(plan, n, "quantize")
    routed = G.lane_layout(plan, torch.device("cuda"), *tile, None, False, DTYPES[dtype])
    assert (routed is not None) == (dim < 512 or n == 1 << 14)
    check_ops(variant, dim, bits, DTYPES[dtype], n=n, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant,bits", [("full", 3), ("fast", 2)])
def test_block_rotation_quantize_strided_and_large_gpu(variant, bits):
    """Strided rows (row stride dim + 3, offset start), and a batch at the large-batch tile."""
    check_ops(variant, 128, bits, torch.float16, n=777, device="cuda", strided=True)
    check_ops(variant, 256, bits, torch.bfloat16, n=1 << 15, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits,dtype", [(2, "float16"), (4, "bfloat16"), (3, "float32")])
def test_round_trip_in_one_warp_programs_gpu(bits, dtype):
    """Dim 256 at a batch large enough for LANE_RT_256's one-warp, uncapped round trip (asserted), every op
    against the reference (the round trip into float32 and into the 16-bit dtype)."""
    plan = _plan(256, bits)
    width, rows, warps = fused_tile(plan, 1 << 15, "roundtrip")
    assert (width * rows, warps) == LANE_RT_256 and fused_tile(plan, 300, "roundtrip")[2] > 1
    check_ops("hadamard", 256, bits, DTYPES[dtype], n=1 << 15, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "dim,bits,dtype", [(1000, 2, "bfloat16"), (1024, 5, "float16"), (512, 3, "float32"), (300, 4, "bfloat16")]
)
def test_wide_rows_gpu(dim, bits, dtype):
    """Rows of 512-1024 coded columns: the Gluon kernels at large batches (asserted), the plain ones below."""
    plan = _plan(dim, bits)
    assert G.lane_layout(plan, torch.device("cuda"), *fused_tile(plan, 1 << 20, "quantize")) is not None
    check_ops("hadamard", dim, bits, DTYPES[dtype], n=1 << 16, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_strided_rows_and_codes_gpu(bits):
    """Strided input rows, and codes with an odd row stride (byte access): the same bytes and outputs as
    contiguous tensors."""
    check_ops("hadamard", 128, bits, torch.float16, n=1000, device="cuda", strided=True)
    plan = Quantizer("hadamard", 96, bits, seed=1, device="cuda", backend="torch").plan
    x = torch.randn(777, 96, device="cuda")
    codes, norms = kt.quantize(x, plan)
    wide = torch.zeros(777, plan.code_bytes + 3, dtype=torch.uint8, device="cuda")[:, 1 : plan.code_bytes + 1]
    wide.copy_(codes)
    assert not word_access(plan, wide) and word_access(plan, codes)
    for dtype in DTYPES.values():
        assert torch.equal(kt.dequantize(wide, norms, plan, dtype), kt.dequantize(codes, norms, plan, dtype))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dim,bits", [(256, 1), (256, 2), (128, 2), (64, 3)])
def test_negative_norms_flip_the_reconstruction_gpu(dim, bits):
    """A norm is a float32 the caller may give negative: x_hat = norm * direction, as the reference has it.
    Bits 1-2 scale their centroids by the row's norm before the sign bit goes in, which must flip, not set."""
    plan = Quantizer("hadamard", dim, bits, seed=3, device="cuda", backend="torch").plan
    codes, norms = kt.quantize(torch.randn(300, dim, device="cuda"), plan)
    for dtype in DTYPES.values():
        positive = kt.dequantize(codes, norms, plan, dtype)
        assert torch.equal(kt.dequantize(codes, -norms, plan, dtype), -positive), dtype


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_tiny_rows_round_trip_as_quantize_then_dequantize_gpu(bits):
    """Rows with ||x|| below the norm's clamp (1.1e-19): the round trip's scaled thresholds pick the codes that
    quantize picks, so its reconstruction is dequantize's."""
    plan = Quantizer("hadamard", 256, bits, seed=3, device="cuda", backend="torch").plan
    x = torch.randn(64, 256, device="cuda") * torch.logspace(-30, -18, 64, device="cuda")[:, None]
    codes, norms = kt.quantize(x, plan)
    x_hat, _ = kt.roundtrip(x, plan)
    # Row-relative: the two scale the centroids in another order, so an element near zero differs by ~1e-7 of
    # its row (H200: all rows within 3e-7); a different code would move the row by ~0.1 of its norm.
    _rows_close(x_hat, kt.dequantize(codes, norms, plan, torch.float32), rel=1e-6)
    assert bool((x_hat[x.double().norm(dim=1) > 1e-18].abs().amax(dim=1) > 0).all())  # not a comparison of zeros


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant,bits", [("full", 2), ("fast", 3), ("full", 4), ("hadamard", 2), ("hadamard", 3)])
def test_quantize_of_tiny_and_zero_rows_as_the_plain_kernel_gpu(variant, bits, monkeypatch):
    """Rows below the norm's clamp (||x|| < 1.1e-19, where the kernels divide by the clamp, not by ||x||) and a
    zero row: the Gluon quantize searches against the boundaries times the row's clamped norm and picks the
    codes that the plain kernel picks by dividing by it. Scaled by ||x|| instead, these rows would code as
    unit vectors: thousands of codes would differ."""
    plan = Quantizer(variant, 256, bits, seed=3, device="cuda", backend="torch").plan
    x = torch.randn(64, 256, device="cuda") * torch.logspace(-30, -17, 64, device="cuda")[:, None]
    x[5] = 0.0
    assert G.lane_layout(plan, x.device, *fused_tile(plan, 64, "quantize"), exchange=False) is not None
    codes, norms = kt.quantize(x, plan)
    monkeypatch.setattr(G, "lane_layout", lambda *args, **kwargs: None)
    plain_codes, plain_norms = kt.quantize(x, plan)
    torch.testing.assert_close(norms, plain_norms, rtol=4e-7, atol=0)  # the sums' order
    assert torch.equal(codes[5], plain_codes[5])
    assert (codes != plain_codes).sum() <= 4  # bytes: a code on a boundary may differ


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["full", "fast", "2d", "identity", "hadamard"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bits_3_steps_search_codes_as_the_tree_gpu(variant, dtype, monkeypatch):
    """The steps search (bits 3, 16-bit inputs) against the select tree of the plain kernel on rows with exact
    zeros (+0 and -0: identity codes them as y = 0, below the middle boundary), a zero row, rows below the
    norm's clamp and rows near float16's largest values: codes equal but for values on a boundary."""
    plan = Quantizer(variant, 128, 3, seed=6, device="cuda", backend="torch").plan
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4099, 128, device="cuda", generator=gen)
    x[:, ::5] = 0.0
    x[:, 1::7] = -0.0
    x[3] = 0.0
    x[10:20] *= 1e-25  # rows below the norm's clamp (bfloat16; float16 flushes them to +-0)
    x[20:30] *= 6e4 / x[20:30].abs().amax(dim=1, keepdim=True)
    x = x.to(DTYPES[dtype])
    assert G.lane_layout(plan, x.device, *fused_tile(plan, x.shape[0], "quantize"), None, False, x.dtype) is not None
    codes, norms = kt.quantize(x, plan)
    monkeypatch.setattr(G, "lane_layout", lambda *args, **kwargs: None)
    tree_codes, tree_norms = kt.quantize(x, plan)
    torch.testing.assert_close(norms, tree_norms, rtol=4e-7, atol=0)
    idx, tree_idx = (unpack_codes(c, 3, plan.n_coded).long() for c in (codes, tree_codes))
    differ = idx != tree_idx
    assert bool(_near_boundary(_rotated(x, plan), plan)[differ].all()) and int(differ.sum()) <= 8, int(differ.sum())
    assert torch.equal(codes[3], tree_codes[3]) and bool((idx[3] == 3).all())  # a zero row: all code 3
    if variant == "identity":
        zero = x.float() == 0
        assert bool((idx[zero] == 3).all())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dim,bits", [(128, 4), (256, 2), (64, 3), (100, 7)])
def test_agrees_with_the_plain_kernels_gpu(dim, bits, monkeypatch):
    """The Gluon and the plain Triton kernels compute the same transform with the butterfly stages in
    another order and the norm summed in another order: codes equal but for values on a boundary,
    reconstructions within float32 rounding."""
    plan = Quantizer("hadamard", dim, bits, seed=5, device="cuda", backend="torch").plan
    x = torch.randn(4099, dim, device="cuda", dtype=torch.float16)
    fast_codes, fast_norms = kt.quantize(x, plan)
    fast_hat, fast_err = kt.roundtrip(x, plan)
    fast_out = kt.dequantize(fast_codes, fast_norms, plan, torch.float32)
    monkeypatch.setattr(G, "lane_layout", lambda *args, **kwargs: None)
    plain_codes, plain_norms = kt.quantize(x, plan)
    torch.testing.assert_close(fast_norms, plain_norms, rtol=4e-7, atol=0)  # two ulps: the sum's order
    assert (fast_codes != plain_codes).sum() <= 4
    _rows_close(fast_out, kt.dequantize(fast_codes, fast_norms, plan, torch.float32), rel=1e-6)  # row norms
    plain_hat, plain_err = kt.roundtrip(x, plan)
    # Rows with a rotated value on a boundary may take the other code in either round trip (their norms
    # differ in the last ulp), as in check_ops.
    same = (fast_codes == plain_codes).all(dim=1) & ~_near_boundary(_rotated(x, plan), plan).any(dim=1)
    _rows_close(fast_hat[same], plain_hat[same], rel=1e-6)
    torch.testing.assert_close(fast_err[same], plain_err[same], rtol=1e-5, atol=1e-6)


class _Recorder:
    """Stands in for a Gluon kernel in the launcher: kernel[grid](*args, **kwargs) records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@pytest.mark.parametrize("op", ["quantize", "dequantize", "roundtrip"])
def test_launchers_bind_the_gluon_kernels(op, monkeypatch):
    """The launchers' Gluon calls (which the CPU cannot run) bind every parameter of the kernel, by
    position and name, with the tensors and sizes of the call: the kernel is replaced by a recorder and
    the lane plan forced, on CPU tensors."""
    import inspect

    plan = Quantizer("hadamard", 100, 3, seed=4, backend="torch").plan
    x = torch.randn(37, 100 + 3)[:, :100]  # strided rows
    codes, norms = kt.quantize(x, plan)  # the plain kernels, for real inputs
    kernel = {"quantize": "_quantize_kernel", "dequantize": "_dequantize_kernel", "roundtrip": "_roundtrip_kernel"}
    signature = inspect.signature(getattr(G, kernel[op]).fn)
    recorder = _Recorder()
    monkeypatch.setattr(G, kernel[op], recorder)
    forced = []

    def lane_layout(plan, device, width, rows, warps, stored=None, exchange=True, loaded=None):
        forced.append(G._lane_plan(width, rows, warps, 4 if stored == torch.float32 else 8, exchange))
        return forced[-1]

    monkeypatch.setattr(G, "lane_layout", lane_layout)
    if op == "quantize":
        kt.quantize(x, plan)
    elif op == "dequantize":
        kt.dequantize(codes, norms, plan, torch.float32)
    else:
        kt.roundtrip(x, plan, torch.bfloat16)
    (grid, args, kwargs), = recorder.calls
    width, rows, warps = fused_tile(plan, 37, op)
    assert grid == (-(-37 // rows),) and kwargs.pop("num_warps") == warps
    assert kwargs.pop("maxnreg") == lane_maxnreg(op, warps) == LANE_MAXNREG[op]
    bound = signature.bind(*args, **kwargs).arguments
    assert bound["N"] == 37 and bound["DIM"] == 100 and bound["N_CODED"] == 128 and bound["BITS"] == 3
    assert bound["signs_ptr"] is plan.lane_sign_table and bound["LANES"] is forced[-1]
    assert bound["BN"] == rows and bound["W"] == width and bound["SYMMETRIC"] == plan.symmetric
    if op != "dequantize":
        assert bound["x_ptr"] is x and (bound["stride_xr"], bound["stride_xc"]) == (103, 1)
        assert bound["bnd_ptr"] is plan.boundaries
    if op == "quantize":
        assert bound["CODE_BYTES"] == 48 and bound["stride_cr"] == 48 and bound["stride_cc"] == 1
        assert bound["codes_ptr"].shape == (37, 48) and bound["norms_ptr"].shape == (37,)
        assert bound["LANES"].compute == bound["LANES"].memory  # quantize keeps to the memory layout
    if op == "dequantize":
        assert bound["codes_ptr"] is codes and bound["norms_ptr"] is norms and bound["cent_ptr"] is plan.centroids
        assert bound["out_ptr"].dtype == torch.float32 and bound["stride_or"] == 100 and bound["stride_n"] == 1
    if op == "roundtrip":
        assert bound["out_ptr"].dtype == torch.bfloat16 and bound["err_ptr"].shape == (37,)
        assert bound["cent_ptr"] is plan.centroids


def test_plain_kernels_run_hadamard_where_gluon_is_missing():
    """A Triton whose Gluon cannot build the kernels (simulated: their module made unimportable) leaves
    ``kernels.triton`` working: a warning, no Gluon plan, and hadamard through the plain kernels."""
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["kernels.triton._gluon"] = None  # importing the Gluon kernels raises, as on such a Triton
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kernels.triton as kt
            from kernels.triton import _launch
        import torch
        from kernels import Quantizer, reference
        assert _launch.GLUON is None
        assert any("Gluon kernels are off" in str(w.message) for w in caught)
        plan = Quantizer("hadamard", 64, 3, backend="torch").plan
        assert _launch.lane_plan(plan, torch.device("cuda"), 64, 32, 2) is None
        x = torch.randn(5, 64)
        codes, norms = kt.quantize(x, plan)
        assert torch.equal(codes, reference.quantize(x, plan)[0])
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]


def test_plain_kernels_keep_their_tiles_on_rocm(monkeypatch):
    """On ROCm (simulated: torch.version.hip set) ``lane_layout`` declines every launch, so hadamard runs the
    plain kernels, and at their own tiles: not the Gluon ones (e.g. LANE_RT_256's one-warp programs)."""
    from kernels.triton._launch import _fused_tile

    plan = Quantizer("hadamard", 256, 3, backend="torch").plan
    ops = ("quantize", "dequantize", "roundtrip")
    plain = {op: _fused_tile(256, 1 << 20, op, None, False, lanes=False) for op in ops}
    assert fused_tile(plan, 1 << 20, "roundtrip") != plain["roundtrip"]  # on CUDA: the Gluon tile (LANE_RT_256)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    for op, tile in plain.items():
        width, rows, warps = fused_tile(plan, 1 << 20, op)
        assert G.lane_layout(plan, torch.device("cuda"), width, rows, warps) is None
        assert (width, rows, warps) == tile, op


def test_a_gluon_compile_error_falls_back_to_the_plain_kernels(monkeypatch):
    """A Gluon kernel that fails to build (an experimental API that moved) turns Gluon off with a warning,
    and the call, and every later one, runs the plain kernels with the same results."""
    from triton.compiler.errors import CompilationError

    from kernels import reference
    from kernels.triton import _launch

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise CompilationError("src", None, "unsupported layout")

            return launch

    monkeypatch.setattr(_launch, "_gluon_failed", [])
    monkeypatch.setattr(G, "_quantize_kernel", Broken())
    monkeypatch.setattr(G, "lane_layout", lambda *args, **kwargs: object())
    plan = Quantizer("hadamard", 64, 3, seed=1, backend="torch").plan
    x = torch.randn(9, 64)
    with pytest.warns(UserWarning, match="Gluon kernels are off"):
        codes, norms = kt.quantize(x, plan)
    assert torch.equal(codes, reference.quantize(x, plan)[0])
    assert _launch._gluon_failed and _launch.lane_plan(plan, torch.device("cuda"), 64, 32, 2) is None
    assert fused_tile(plan, 1 << 20, "roundtrip") == (64, 32, 4)  # the plain kernels' tile again (Gluon's: 2 warps)
    assert torch.equal(kt.quantize(x, plan)[0], codes)  # later calls: no warning, plain kernels
