"""Gluon kernels of the hadamard rotation (and kronecker with one block): quantize, dequantize and round trip
with the tile's layouts chosen explicitly, so that every Walsh-Hadamard butterfly stays in registers and
inside one warp. The quantize of the block rotations (full, fast) runs here too, each 4-D block inside a
thread of the same memory layout (``_rotate_in_thread``, ``LANE_QUANTIZE_KERNELS``).

The fused kernels of ``_jit`` can run hadamard too, in plain Triton, where each butterfly stage moves the
pair axis last with a permute and Triton's layout propagation turns every stage whose partners sit in other
threads into a conversion through shared memory. The sm_90 compile of quantize (dim 128, float16, bits 4,
32 elements a thread): 1480 instructions, 144 shuffles, 47 shared-memory accesses and 23 barriers a thread;
full's plain kernel had 944 instructions. Here (``lane_layout``): a memory layout for loads and stores (pieces of 4-8
consecutive columns, adjacent lanes on adjacent pieces) and, for dequantize and the round trip, a compute
layout (a thread's columns of a row consecutive), with one warp-local exchange between them. A stage whose
pair sits in one thread only renames registers (asserted free at compile time); a stage whose pair sits in
lanes l and l ^ m is one ``shfl.sync.bfly`` an element. Quantize dim 128 (bits 4): 936 instructions, 66
shuffles, no shared memory (full's, also here: 808); round trip dim 256: no stage through shuffles, two
exchanges (16 shared accesses a thread).

The word format is that of the plain kernels (docs/FORMAT.md). The stages run in another order and the norm
sums in another order, so results agree with the plain kernels and the reference within float32 rounding
(codes but for values on a boundary; tests/kernels/test_gluon.py on the GPU). Gluon kernels do not run under
TRITON_INTERPRET, so ``lane_layout`` only picks them for CUDA tensors; the CPU tests compile them for sm_90
(``bench/sass.py``) and read the machine code.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

# Triton helpers that take no layout of their own compile inside Gluon kernels too (in Gluon's semantics).
from kernels.triton._jit import (
    SS_FLOOR,
    _code_search,
    _flag_bad_rows,
    _load_rows,
    _norm_of,
    _search_centroid,
    _word_pointer,
)

# How _forward scales the rows it transforms (its SCALE).
UNSCALED = gl.constexpr(0)  # z = H (signs * x): the round trip's scaled-threshold search scales the thresholds
SCALE_FIRST = gl.constexpr(1)  # y = H (signs * x * inv / sqrt(n)): one multiply a row folds both scales
SCALE_LAST = gl.constexpr(2)  # y = H (signs * x * inv) / sqrt(n): quantize (folded, it spilled: below)

MAX_WIDTH = 32 * 32  # one warp spans a row with at most 32 elements a thread: wider rows keep the plain kernels

# The plan kernels (``Plan.kernel``) of the block rotations whose quantize runs here too (``_rotate_in_thread``).
# H200, N = 2^20, bits 2-4, time against the plain fused kernel in the same run (two runs, before the scaled
# thresholds): full at dim 256 with 16-bit inputs 0.58-0.77x, dim 512 0.65-0.97x, dim 128 0.89-1.04x.
# "pairs" (2d) and "none" (identity) compile here as well but keep the plain kernel: measured once at
# 0.72-1.09x, a loss in some cells. Their dequantize here, blocks in a thread in chunks of the plain kernel's
# W, measured 1.02-1.89x the plain kernel's time (session 9): not used.
LANE_QUANTIZE_KERNELS = frozenset({"blocks"})
# ... and those whose quantize runs here where the plan has a grid search (``Plan.search_grid``: bits 4), or the
# steps search at bits 3 (``steps_search``: 16-bit inputs; numbers at SAT_SEARCH_DTYPES). At bits 4 the
# Gluon quantize of 2d and identity took 0.63-0.82x their plain kernel's time (dims 128 and 256, all dtypes,
# H200, same run; the plain kernel cannot take the grid: with it, it took 2.4-3.3x its tree's time).
LANE_GRID_QUANTIZE_KERNELS = frozenset({"pairs", "none"})
# Input dtypes whose bits-3 quantize searches by saturating steps (``_code_words_3bit``), where every column is
# coded (n_coded == W). H200, N = 2^20, time against the select tree, same run (dims 128 and 256): float16 and
# bfloat16 full 0.97-1.00x, hadamard 0.97-0.99x; 2d and identity through the Gluon quantize (routed there by it,
# ``LANE_GRID_QUANTIZE_KERNELS``) 0.78-1.00x their plain kernel's. Float32 keeps the tree and the plain kernels:
# there the steps measured 0.96-1.11x (hadamard at dim 256 and identity at dim 128: 1.11x).
# The kernel tests the same thing as "not float32" (a constexpr of its pointer's type): every other input dtype
# is 16-bit (kernels.INPUT_DTYPES; tests/kernels/test_gluon.py holds the two together).
SAT_SEARCH_DTYPES = (torch.float16, torch.bfloat16)
# Columns of a row a thread holds in the quantize of "blocks" (at least W / 32: one warp spans a row). Each
# thread loads the 16 coefficients of each of its blocks once for all its rows: with 32 columns (one row a
# thread, the default) that was 4 loads an element. H200, N = 2^20, time against 32 columns, same run: 16
# columns 0.85-0.97x (dims 128 and 256, float16 and float32, bits 2-4); 8 columns 0.89-1.13x. 2d and identity
# (bits 4) keep 32 (16: 0.99-1.05x).
BLOCK_PIECE = 16
# The FAMILY constexpr of the Gluon quantize for ``Plan.kernel`` (``_launch.FUSED_FAMILIES``' numbering). The
# kernels' own PAIRS constexpr is another thing: signs stored two columns to a word (``_store_rows``).
FAMILY_BLOCKS, FAMILY_PAIRS, FAMILY_NONE = gl.constexpr(0), gl.constexpr(1), gl.constexpr(2)


class LanePlan(NamedTuple):
    """How a Gluon launch lays out its tile [BN, W] (see ``lane_layout``): the layouts and which butterfly
    stages run where. Stage s pairs columns j and j + 2^s; the three masks (bit s = stage s) partition the
    stages of a W-column transform."""

    memory: gl.BlockedLayout  # loads and stores: pieces of V consecutive columns, adjacent lanes adjacent
    compute: gl.BlockedLayout  # the stages on the memory layout's lane bits, the code search and packing
    words: gl.SliceLayout  # packed words [BN, W // 8] of ``compute``: a thread's groups consecutive
    memory_stages: int  # in-thread in ``memory``
    compute_stages: int  # in-thread in ``compute``
    lane_stages: int  # across lanes: shfl.sync.bfly with lane ^ (2^s / lane_unit) in ``compute``
    lane_unit: int  # the columns a lane's piece spans in ``compute``


@functools.lru_cache(maxsize=1024)
def _lane_plan(width: int, rows: int, warps: int, vec: int, exchange: bool, piece: int = 0) -> LanePlan | None:
    per_thread = width * rows // (32 * warps)
    piece = min(piece or per_thread, per_thread, width)  # columns of one row a thread holds
    lanes = width // piece
    if width > MAX_WIDTH or piece < 8 or piece % 8 or per_thread % piece or lanes > 32:
        return None
    if lanes == 1 or not exchange:
        vec = 8  # whole rows in a thread, or packing in the memory layout: whole groups of 8 a piece
    else:
        # Narrower memory pieces move the memory layout's lane bits down, clear of the compute layout's
        # (the top column bits): with vec * lanes <= piece no stage needs a shuffle. 8-byte accesses cost
        # more instructions than 16-byte ones but stay coalesced; below 4 columns a shuffle stage is cheaper.
        vec = max(4, min(vec, width // lanes**2))
    r, tr = per_thread // piece, 32 // lanes
    memory = gl.BlockedLayout([r, vec], [tr, lanes], [warps, 1], [1, 0])
    stages = (1 << (width.bit_length() - 1)) - 1  # bits 0 .. log2(W) - 1
    memory_lanes = stages & (vec * lanes - 1) & ~(vec - 1)  # column bits log2(V) .. log2(V L) - 1
    if not exchange:
        words = gl.SliceLayout(2, gl.BlockedLayout([r, 1, 8], [tr, lanes, 1], [warps, 1, 1], [2, 1, 0]))
        return LanePlan(memory, memory, words, stages & ~memory_lanes, 0, memory_lanes, vec)
    compute = gl.BlockedLayout([r, piece], [tr, lanes], [warps, 1], [1, 0])
    words = gl.SliceLayout(2, gl.BlockedLayout([r, piece // 8, 8], [tr, lanes, 1], [warps, 1, 1], [2, 1, 0]))
    compute_lanes = stages & ~(piece - 1)  # column bits log2(piece) ..
    memory_stages = stages & ~memory_lanes
    lane_stages = memory_lanes & compute_lanes
    compute_stages = stages & ~memory_stages & ~lane_stages
    return LanePlan(memory, compute, words, memory_stages, compute_stages, lane_stages, piece)


def steps_search(plan, width: int, loaded: torch.dtype | None) -> bool:
    """Whether the Gluon quantize of ``loaded`` rows codes by ``_code_words_3bit`` (the kernel's own test of the
    same conditions): symmetric bits 3, every column of the W-wide tile coded, 16-bit inputs."""
    return plan.bits == 3 and plan.symmetric and plan.n_coded == width and loaded in SAT_SEARCH_DTYPES


def lane_layout(
    plan,
    device: torch.device,
    width: int,
    rows: int,
    warps: int,
    stored: torch.dtype | None = None,
    exchange: bool = True,
    loaded: torch.dtype | None = None,
) -> LanePlan | None:
    """The ``LanePlan`` of the Gluon kernels for a fused launch of (W, BN, num_warps) = (width, rows, warps),
    or None where the plain kernels run instead: rotations other than signs and one Walsh-Hadamard transform
    (``Plan.lane_signs``: hadamard, and kronecker at power-of-two dims), except the quantize (``exchange``
    False) of the plan kernels in LANE_QUANTIZE_KERNELS (full, fast), and of those in LANE_GRID_QUANTIZE_KERNELS
    (2d, identity) at bits 4 or where ``steps_search`` (of the input dtype ``loaded``), at n_coded <= W; devices
    other than CUDA (the interpreter cannot run Gluon), rows wider than one warp spans (W > 1024) and tiles of
    fewer than 8 elements a thread.

    Two layouts, each thread holding the same number of columns of a row (``piece``), on the same lanes:
    - ``memory``: pieces of V consecutive columns, lane l of the row's L lanes pieces l, l + L, ..., so that
      adjacent lanes touch adjacent 16 bytes: V = 8 (16 bytes of float16), or 4 where the kernel stores
      float32 (``stored``). A layout of consecutive columns only (64-128 bytes a lane) left each warp store
      half-filling 32 sectors: float32 dequantize took 3.0-3.3x full's time, 1.1-1.2x in this one (H200).
    - ``compute``: a thread's columns consecutive. The stages on the column bits that ``memory`` spreads over
      lanes run here inside a thread; one conversion between the two is a warp-local exchange (4 STS.128 +
      4 LDS.128 a thread of 32 elements at W = 128, sm_90) instead of one shuffle an element a stage. Bits on
      lanes in both (W > 256 at 32 columns a thread) are shuffle stages. Codes are packed and moved in
      ``compute``: a thread's words are consecutive bytes.
    ``exchange=False`` (quantize) keeps everything in ``memory`` (V = 8), the stages on its lane bits
    through shuffles: at dim 128 bits 3-4 quantize took 1.26-1.32x full's time with the exchange and
    1.07-1.15x without (16-bit inputs); at dim 256 0.76-1.15x and 0.72-1.13x (H200). The inverse ops gain
    from it: the dim-256 round trip 1.01-1.40x against 1.03-1.58x with shuffles only.

    Also None where n_coded is not a multiple of 8 (dims below 8): the word masks assume whole groups of 8
    codes (code_bytes a multiple of bits), and on ROCm (no 32-lane warps, no PTX)."""
    if device.type != "cuda" or plan.n_coded % 8 or torch.version.hip is not None:
        return None
    if plan.lane_signs is None:
        # Quantize of the fused rotations in LANE_QUANTIZE_KERNELS: every block of a row inside a thread.
        routed = plan.kernel in LANE_QUANTIZE_KERNELS or (
            plan.kernel in LANE_GRID_QUANTIZE_KERNELS
            and (plan.search_grid is not None or steps_search(plan, width, loaded))
        )
        if exchange or not routed or plan.n_coded > width:
            return None
        piece = max(BLOCK_PIECE, width // 32) if plan.kernel == "blocks" else 0
        return _lane_plan(width, rows, warps, 8, exchange, piece)
    return _lane_plan(width, rows, warps, 4 if stored == torch.float32 else 8, exchange)


@gluon.jit
def _lane_exchange(t, MASK: gl.constexpr):
    """float32 t (any shape): each element replaced by the same register of lane ^ MASK (shfl.sync.bfly; the
    whole warp takes part, which Triton's straight-line code guarantees)."""
    bits = t.to(gl.int32, bitcast=True)
    got = gl.inline_asm_elementwise(
        "shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;",
        "=r,r,r",
        [bits, gl.full_like(bits, MASK)],
        dtype=gl.int32,
        is_pure=True,
        pack=1,
    )
    return got.to(gl.float32, bitcast=True)


@gluon.jit
def _opaque(v):
    """float32 v unchanged, through a PTX move that LLVM cannot see through: a multiply by v then stays a
    multiply (of +-1, LLVM would rewrite it as a select of t or -t, one more instruction an element)."""
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _butterfly_in_thread(t, BN: gl.constexpr, W: gl.constexpr, H: gl.constexpr):
    """One butterfly stage of half-width H on float32 t [BN, W] whose partners (j, j + H) sit in one thread:
    (a, b) -> (a + b, a - b). The reshapes and permutes only rename registers; the final conversion back
    to the tile's layout is asserted trivial (no data movement)."""
    u = gl.permute(gl.reshape(t, [BN, W // (2 * H), 2, H]), [0, 1, 3, 2])
    a, b = gl.split(u)
    u = gl.permute(gl.join(a + b, a - b), [0, 1, 3, 2])
    return gl.convert_layout(gl.reshape(u, [BN, W]), t.type.layout, assert_trivial=True)


@gluon.jit
def _stages(t, cols, BN: gl.constexpr, W: gl.constexpr, N_CODED: gl.constexpr, IN_THREAD: gl.constexpr,
            ACROSS: gl.constexpr, PIECE: gl.constexpr):  # fmt: skip
    """The butterfly stages s of IN_THREAD (pairs inside a thread) and ACROSS (pairs in lanes l and
    l ^ (2^s / PIECE)) of the Walsh-Hadamard transform of the first N_CODED (a power of two) columns of
    float32 t [BN, W] (columns beyond stay in butterfly blocks of their own); cols [W]: the column indices
    in t's layout. The stages commute: the transform is their product in any order."""
    for stage in gl.static_range(10):  # W <= MAX_WIDTH = 2^10
        if (1 << stage) < N_CODED:
            if (IN_THREAD >> stage) & 1:
                t = _butterfly_in_thread(t, BN, W, 1 << stage)
            elif (ACROSS >> stage) & 1:
                # (a, b) -> (a + b, a - b) as partner + t * (+1 or -1): one FFMA an element, the same float as
                # the add or subtract; a select between the two took two FADDs and an FSEL (sm_90, quantize dim
                # 256 bits 3 float16: 1872 -> 1744 instructions a thread of 64 elements).
                flip = _opaque(gl.where((cols & (1 << stage)) != 0, -1.0, 1.0))
                t = _lane_exchange(t, (1 << stage) // PIECE) + t * flip[None, :]
    return t


@gluon.jit
def _store_flipped_pairs(t, signs_ptr, out_ptr, rows, row_ok, stride_or, N_CODED: gl.constexpr,
                         BN: gl.constexpr, W: gl.constexpr):  # fmt: skip
    """Store float32 t [BN, W] (``LANES.memory``; rows [BN], row_ok their mask) with its columns' signs
    applied to the 16-bit out_ptr (float16 or bfloat16; unit column stride, rows of W columns, 16-byte
    aligned: the launchers' fresh output at DIM == W = N_CODED) as 32-bit words of two consecutive columns:
    one cvt.rn.{f16,bf16}x2.f32 a pair, then the pair's two signs as one XOR of its sign bits (the int32
    masks after the N_CODED float32 signs of ``Plan.lane_sign_table``) instead of an FMUL an element. The
    same bits as ``(t * signs).to(16-bit)``: the signs are exactly +-1, rounding to nearest is odd-symmetric,
    and x * -1 flips only the sign bit (zeros and infinities included). Only a NaN may differ, in its sign
    bit (the GPU's FMUL gives the canonical NaN, which the XOR then signs).

    The XOR sits inside the store's asm: written as a plain XOR before a ``gl.store``, LLVM emits all the
    XORs ahead of the run of predicated stores and ptxas turns that run into branches (BSSY/BRA, sm_90:
    +8-16 instructions, more than the XORs save)."""
    even, odd = gl.split(gl.reshape(t, [BN, W // 2, 2]))
    if out_ptr.dtype.element_ty == gl.float16:
        word = gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [even, odd], dtype=gl.int32,
                                         is_pure=True, pack=1)  # fmt: skip
    else:
        word = gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [even, odd], dtype=gl.int32,
                                         is_pure=True, pack=1)  # fmt: skip
    PAIRS: gl.constexpr = word.type.layout  # a thread's words consecutive (pairs of its consecutive columns)
    c2 = gl.arange(0, W // 2, layout=gl.SliceLayout(0, PAIRS))
    masks = gl.load(signs_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + N_CODED + c2)
    flips = gl.full_like(word, 0) + masks[None, :]
    ok = gl.full_like(word, 0) + gl.convert_layout(row_ok, gl.SliceLayout(1, PAIRS)).to(gl.int32)[:, None]
    r2 = gl.convert_layout(rows, gl.SliceLayout(1, PAIRS))
    word_ptr = out_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    ptrs = word_ptr + r2.to(gl.int64)[:, None] * (stride_or >> 1) + c2[None, :]  # (stride_or = W)
    # A store of a piece of the memory layout (its 8 or 4 columns: 16 or 8 bytes, aligned): 4 or 2 words, as
    # gl.store's vectors (2 stores of 8 bytes instead of one of 16 took 4 STG more a thread at 32 columns).
    if t.type.layout.size_per_thread[1] % 8 == 0:
        gl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b32 a, b, c, d; setp.ne.b32 p, $16, 0; xor.b32 a, $4, $8; xor.b32 b, $5, $9; "
            "xor.b32 c, $6, $10; xor.b32 d, $7, $11; @p st.global.v4.b32 [$12], {a, b, c, d}; "
            "mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0; }",
            "=r,=r,=r,=r,r,r,r,r,r,r,r,r,l,l,l,l,r,r,r,r", [word, flips, ptrs, ok], dtype=gl.int32, is_pure=False,
            pack=4)  # fmt: skip
    else:
        gl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b32 a, b; setp.ne.b32 p, $8, 0; xor.b32 a, $2, $4; xor.b32 b, $3, $5; "
            "@p st.global.v2.b32 [$6], {a, b}; mov.b32 $0, 0; mov.b32 $1, 0; }",
            "=r,=r,r,r,r,r,l,l,r,r", [word, flips, ptrs, ok], dtype=gl.int32, is_pure=False, pack=2)  # fmt: skip


@gluon.jit
def _store_rows(x, signs_ptr, out_ptr, rows, row_ok, cols, stride_or, stride_oc, DIM: gl.constexpr,
                N_CODED: gl.constexpr, BN: gl.constexpr, W: gl.constexpr, PAIRS: gl.constexpr):  # fmt: skip
    """Store float32 x [BN, W] (``LANES.memory``; cols its column indices) into the first DIM columns of the
    rows < N of out_ptr in its dtype: with PAIRS, as 32-bit words of two columns with their signs applied
    (``_store_flipped_pairs``: x left unsigned by ``_inverse``), else element by element."""
    if PAIRS:
        _store_flipped_pairs(x, signs_ptr, out_ptr, rows, row_ok, stride_or, N_CODED, BN, W)
    else:
        gl.store(
            out_ptr + rows.to(gl.int64)[:, None] * stride_or + cols[None, :] * stride_oc,
            x.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (cols < DIM)[None, :],
        )


@gluon.jit
def _forward(x, inv, signs_ptr, cols, BN: gl.constexpr, W: gl.constexpr, N_CODED: gl.constexpr,
             LANES: gl.constexpr, SCALE: gl.constexpr = SCALE_FIRST):  # fmt: skip
    """y = H (signs * x / rho) / sqrt(n_coded) of a float32 tile x [BN, W] in ``LANES.memory`` (cols its
    column indices; inv = 1 / rho [BN]) -> y in ``LANES.compute``. SCALE UNSCALED: z = H (signs * x), no scale
    (the round trip scales its row's boundaries and centroids instead; inv unused)."""
    COMPUTE: gl.constexpr = LANES.compute
    signs = gl.load(signs_ptr + cols, mask=cols < N_CODED, other=0.0)
    # SCALE_FIRST: 1 / sqrt(n) goes into the row's scale, a multiply a row instead of an element (sm_90 SASS of
    # the round trip at dim 256: 6 multiplies an element before, 4 with this and the same in _inverse: -7%
    # instructions). Quantize keeps the multiply at the end (SCALE_LAST): folded, ptxas spilled predicates at 64
    # elements a thread (dim 256: +14% instructions).
    if SCALE == UNSCALED:
        t = x * signs[None, :]  # (ptxas folds the signs into the first stage's FFMAs: half a multiply an element)
    elif SCALE == SCALE_FIRST:
        t = x * (inv * (1.0 / N_CODED**0.5))[:, None] * signs[None, :]
    else:
        t = x * inv[:, None] * signs[None, :]
    t = _stages(t, cols, BN, W, N_CODED, LANES.memory_stages, 0, 1)
    t = gl.convert_layout(t, COMPUTE)
    cols_c = gl.arange(0, W, layout=gl.SliceLayout(0, COMPUTE))
    t = _stages(t, cols_c, BN, W, N_CODED, LANES.compute_stages, LANES.lane_stages, LANES.lane_unit)
    return t * (1.0 / N_CODED**0.5) if SCALE == SCALE_LAST else t


@gluon.jit
def _inverse(c, rho, signs_ptr, cols, BN: gl.constexpr, W: gl.constexpr, N_CODED: gl.constexpr,
             LANES: gl.constexpr, SCALED: gl.constexpr = False, UNSIGNED: gl.constexpr = False):  # fmt: skip
    """x = rho * signs * H c / sqrt(n_coded) of the centroids c [BN, W] in ``LANES.compute`` (zero beyond
    n_coded) -> x in ``LANES.memory`` (cols its column indices, rho [BN] its rows)."""
    COMPUTE: gl.constexpr = LANES.compute
    MEMORY: gl.constexpr = LANES.memory
    cols_c = gl.arange(0, W, layout=gl.SliceLayout(0, COMPUTE))
    t = _stages(c, cols_c, BN, W, N_CODED, LANES.compute_stages, LANES.lane_stages, LANES.lane_unit)
    t = gl.convert_layout(t, MEMORY)
    t = _stages(t, cols, BN, W, N_CODED, LANES.memory_stages, 0, 1)
    if UNSIGNED:  # the caller applies the signs (``_store_flipped_pairs``)
        x = t if SCALED else t * (rho * (1.0 / N_CODED**0.5))[:, None]
    else:
        signs = gl.load(signs_ptr + cols, mask=cols < N_CODED, other=0.0)
        if SCALED:  # c already carries rho / sqrt(n) (centroids scaled a row: round trip, dequantize bits 1-2)
            x = t * signs[None, :]
        else:
            x = t * signs[None, :] * (rho * (1.0 / N_CODED**0.5))[:, None]  # 1 / sqrt(n) a row, as in _forward
    return x


@gluon.jit
def _group_view(t, WORDS: gl.constexpr, BN: gl.constexpr, W: gl.constexpr):
    """t [BN, W] as [BN, W // 8, 8] groups of 8 codes in the layout WORDS is the slice of (a free view)."""
    return gl.convert_layout(gl.reshape(t, [BN, W // 8, 8]), WORDS.parent, assert_trivial=True)


@gluon.jit
def _group_shifts(WORDS: gl.constexpr, BITS: gl.constexpr, word_type: gl.constexpr):
    """The bit offsets j * BITS [8] of the codes j of a group, in the groups view of WORDS."""
    j = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, WORDS.parent))).to(word_type)
    return j * BITS


@gluon.jit
def _pack(codes, WORDS: gl.constexpr, BN: gl.constexpr, W: gl.constexpr, BITS: gl.constexpr):
    """int32 codes [BN, W] -> words [BN, W // 8] (layout WORDS; uint32 for bits <= 4, else uint64), code j of
    group g in bits [j * BITS, (j + 1) * BITS) of word g (``_jit._pack_words``)."""
    if BITS <= 4:
        c3 = _group_view(codes, WORDS, BN, W).to(gl.uint32)
        shifts = _group_shifts(WORDS, BITS, gl.uint32)
    else:
        c3 = _group_view(codes, WORDS, BN, W).to(gl.uint64)
        shifts = _group_shifts(WORDS, BITS, gl.uint64)
    return gl.sum(c3 << shifts[None, None, :], axis=2)  # disjoint bits: sum == or


@gluon.jit
def _code_words_2bit(y, bnd_ptr, t_scale, WORDS: gl.constexpr, BN: gl.constexpr, W: gl.constexpr):
    """Packed 2-bit codes of y [BN, W] for a symmetric codebook with its boundaries times t_scale [BN] (a
    row's), from the two comparisons without a code per element (``_jit._code_words``, whose docstring gives
    the bit algebra; every column is coded here)."""
    y3 = _group_view(y, WORDS, BN, W)
    bit = (1 << _group_shifts(WORDS, 2, gl.uint32))[None, None, :]
    threshold = (gl.convert_layout(t_scale, gl.SliceLayout(1, WORDS), assert_trivial=True) * gl.load(bnd_ptr + 2))
    e = gl.where(gl.abs(y3) > threshold[:, None, None], bit, 0) + gl.where(y3 > 0.0, bit << 1, 0)
    word = gl.sum(e, axis=2)
    return word ^ (((word ^ 0xFFFFFFFF) >> 1) & 0x5555)


@gluon.jit
def _step(a, offset):
    """float32 sat(a + offset) (one FADD.SAT): 1.0 where a + offset >= 1, 0.0 where it is <= 0 or NaN."""
    return gl.inline_asm_elementwise(
        "add.rn.sat.f32 $0, $1, $2;", "=f,f,f", [a, offset], dtype=gl.float32, is_pure=True, pack=1
    )


@gluon.jit
def _code_words_3bit(y, bnd_ptr, t_scale, WORDS: gl.constexpr, BN: gl.constexpr, W: gl.constexpr):
    """Packed 3-bit codes (uint32 words [BN, W // 8] of 24 bits, layout WORDS) of y [BN, W] for a symmetric
    codebook whose boundaries are times t_scale [BN] (a row's, > 0), every column coded: the tree's codes
    (``_code_search``) computed on the FMA pipe. The 16-bit quantize is bound by the ALU pipe (half the FMA
    pipe's rate), where the tree's compares and selects run: sm_90, float16 dim 128, ALU instructions a thread of
    32 elements: full 298 -> 112, identity 363 -> 96 (``bench/sass.py``).

    - Steps: with A = 2^(40 - exponent of t_scale) (a row's power of two: no rounding, no overflow), a = |y| A and
      each positive boundary's T = P_k t_scale, s_k = sat(a - T A) is exactly [|y| > T] (the tree's compare):
      a - T A is exact in sign and, when positive, at least one ulp of T A >= P_k 2^15 >= 2^7 (Lloyd-Max bits 3:
      P_0 ~ 0.5 / sqrt(n) >= 2^-8 up to MAX_DIM = 4096; tests/kernels/test_gluon.py checks it).
    - Code: K/2 + c for y > 0, K/2 - 1 - c otherwise (c = s_0 + s_1 + s_2): code = 3.5 + m (c + 0.5) with
      m = +1 for y > 0 and -1 otherwise, read off the sign of 0 - y (+0 for y = +-0, which code below the middle
      boundary as in the reference).
    - Word: sum_j 8^j code_j = (S + 2^24 - 1) / 2 with S = sum_j (2 m_j 8^j) (c_j + 0.5): odd integers below
      2^24 in magnitude, so every partial sum is exact in float32; one conversion a word.
    Rows whose norm is not finite get NaN steps (0), codes of their own (raised by the bad-row flag)."""
    y3 = _group_view(y, WORDS, BN, W)
    ts = gl.convert_layout(t_scale, gl.SliceLayout(1, WORDS), assert_trivial=True)
    exponent = ((ts.to(gl.uint32, bitcast=True) >> 23) & 0xFF).to(gl.int32)
    big = ((294 - exponent) << 23).to(gl.float32, bitcast=True)  # 2^(167 - biased exponent): ts * big ~ 2^40
    a = gl.abs(y3) * big[:, None, None]
    t0 = (-(gl.load(bnd_ptr + 4) * ts) * big)[:, None, None]
    t1 = (-(gl.load(bnd_ptr + 5) * ts) * big)[:, None, None]
    t2 = (-(gl.load(bnd_ptr + 6) * ts) * big)[:, None, None]
    half_count = (_step(a, t0) + _step(a, t1)) + (_step(a, t2) + 0.5)
    j = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, WORDS.parent)))
    minus_weight = (((128 + 3 * j) << 23).to(gl.uint32) | 0x80000000)[None, None, :]  # -2 * 8^j, float32 bits
    weight = (((0.0 - y3).to(gl.uint32, bitcast=True) & 0x80000000) ^ minus_weight).to(gl.float32, bitcast=True)
    return (gl.sum(weight * half_count, axis=2) * 0.5 + 8388607.5).to(gl.uint32)


@gluon.jit
def _coded(y, bnd_ptr, BITS: gl.constexpr, SYMMETRIC: gl.constexpr, scale, N_CODED: gl.constexpr, W: gl.constexpr,
           COMPUTE: gl.constexpr):  # fmt: skip
    """int32 codes [BN, W] of y (layout COMPUTE) against the boundaries times scale, 0 beyond N_CODED."""
    cols_c = gl.arange(0, W, layout=gl.SliceLayout(0, COMPUTE))
    return gl.where((cols_c < N_CODED)[None, :], _code_search(y, bnd_ptr, BITS, SYMMETRIC, scale), 0)


@gluon.jit
def _word_places(rows, row_ok, WORDS: gl.constexpr, NG: gl.constexpr, CODE_BYTES: gl.constexpr, BITS: gl.constexpr):
    """(group index g [NG], rows [BN], mask [BN, NG]) of the packed words in layout WORDS: the groups that
    start inside the row's CODE_BYTES, on rows < N."""
    g = gl.arange(0, NG, layout=gl.SliceLayout(0, WORDS))
    word_rows: gl.constexpr = gl.SliceLayout(1, WORDS)  # the same rows as the tile's: a free conversion
    ok = gl.convert_layout(row_ok, word_rows, assert_trivial=True)[:, None] & (g * BITS < CODE_BYTES)[None, :]
    return g, gl.convert_layout(rows, word_rows, assert_trivial=True), ok


@gluon.jit
def _store_words(
    word,
    codes_ptr,
    rows,
    row_ok,
    stride_cr,
    stride_cc,
    WORDS: gl.constexpr,
    NG: gl.constexpr,
    CODE_BYTES: gl.constexpr,
    BITS: gl.constexpr,
    WORD: gl.constexpr,
):
    """Store words [BN, NG] (layout WORDS): group g -> bytes [g * BITS, (g + 1) * BITS) of the row, as one
    1/2/4/8-byte store a group when WORD (``_launch.word_access``), else byte by byte (bits 3, odd strides)."""
    g, wrows, ok = _word_places(rows, row_ok, WORDS, NG, CODE_BYTES, BITS)
    if WORD and BITS != 3:
        word_ptr = _word_pointer(codes_ptr, BITS)
        offs = wrows.to(gl.int64)[:, None] * (stride_cr // BITS) + g[None, :]
        gl.store(word_ptr + offs, word.to(word_ptr.dtype.element_ty), mask=ok)
    else:
        row_off = wrows.to(gl.int64)[:, None] * stride_cr
        for j in gl.static_range(BITS):
            byte = ((word >> (8 * j)) & 0xFF).to(gl.uint8)
            gl.store(codes_ptr + row_off + (g * BITS + j)[None, :] * stride_cc, byte, mask=ok)


@gluon.jit
def _load_words(
    codes_ptr,
    rows,
    row_ok,
    stride_cr,
    stride_cc,
    WORDS: gl.constexpr,
    NG: gl.constexpr,
    CODE_BYTES: gl.constexpr,
    BITS: gl.constexpr,
    WORD: gl.constexpr,
):
    """The words of ``_store_words`` [BN, NG] (layout WORDS; uint32 for bits <= 4, else uint64)."""
    g, wrows, ok = _word_places(rows, row_ok, WORDS, NG, CODE_BYTES, BITS)
    if BITS <= 4:
        word_type: gl.constexpr = gl.uint32
    else:
        word_type: gl.constexpr = gl.uint64
    if WORD and BITS != 3:
        word_ptr = _word_pointer(codes_ptr, BITS)
        offs = wrows.to(gl.int64)[:, None] * (stride_cr // BITS) + g[None, :]
        word = gl.load(word_ptr + offs, mask=ok, other=0).to(word_type)
    else:
        row_off = wrows.to(gl.int64)[:, None] * stride_cr
        word = gl.load(codes_ptr + row_off + (g * BITS)[None, :] * stride_cc, mask=ok, other=0).to(word_type)
        for j in gl.static_range(1, BITS):
            byte = gl.load(codes_ptr + row_off + (g * BITS + j)[None, :] * stride_cc, mask=ok, other=0)
            word = word | (byte.to(word_type) << (8 * j))
    return word


@gluon.jit
def _centroids_of_words(
    word,
    cent_ptr,
    scale,
    LAYOUT: gl.constexpr,
    WORDS: gl.constexpr,
    BN: gl.constexpr,
    W: gl.constexpr,
    BITS: gl.constexpr,
    SYMMETRIC: gl.constexpr,
):
    """float32 centroids [BN, W] (layout LAYOUT) of the codes in words [BN, W // 8]. Symmetric bits 1-2:
    the sign and magnitude come straight from the bits (``_jit._word_centroids``); otherwise unpack and
    gather the table (an L1 hit). Symmetric bits 1-2 scale the row's centroids by ``scale`` [BN] (layout
    SliceLayout(1, WORDS)): two multiplies a row instead of one an element."""
    shifts = _group_shifts(WORDS, BITS, gl.uint32)
    if SYMMETRIC and BITS <= 2:
        w = word.to(gl.uint32)
        flipped = w ^ 0xFFFFFFFF
        sign = (flipped[:, :, None] << (32 - BITS - shifts[None, None, :])) & 0x80000000
        s3 = scale[:, None, None]
        if BITS == 1:
            mag = gl.full_like(sign, 0) + (gl.load(cent_ptr + 1) * s3).to(gl.uint32, bitcast=True)
        else:
            spread = (flipped >> 1) & 0x5555
            low = ((w ^ spread)[:, :, None] & (gl.full_like(shifts, 1) << shifts)[None, None, :]) != 0
            mag = gl.where(low, gl.load(cent_ptr + 3) * s3, gl.load(cent_ptr + 2) * s3).to(gl.uint32, bitcast=True)
        c3 = (mag ^ sign).to(gl.float32, bitcast=True)  # (^, not |: a negative norm's scale signs mag already)
    else:
        codes = (word[:, :, None] >> shifts[None, None, :].to(word.dtype)) & ((1 << BITS) - 1)
        c3 = gl.load(cent_ptr + codes.to(gl.int32))
    return gl.convert_layout(gl.reshape(c3, [BN, W]), LAYOUT, assert_trivial=True)


@gluon.jit
def _block_output(base, ok, K: gl.constexpr, N_BLOCKS, v0, v1, v2, v3):
    """Output K of every 4x4 block: sum over m of M[K, m] v_m, with M[K, m] the coefficient 4 K + m of each
    block, read from ``base`` [NB] pointers into the coefficient-major matrices (``Plan.fused_params``)."""
    m0 = gl.load(base + (4 * K + 0) * N_BLOCKS, mask=ok, other=0.0)[None, :]
    m1 = gl.load(base + (4 * K + 1) * N_BLOCKS, mask=ok, other=0.0)[None, :]
    m2 = gl.load(base + (4 * K + 2) * N_BLOCKS, mask=ok, other=0.0)[None, :]
    m3 = gl.load(base + (4 * K + 3) * N_BLOCKS, mask=ok, other=0.0)[None, :]
    return m0 * v0 + m1 * v1 + m2 * v2 + m3 * v3


@gluon.jit
def _rotate_in_thread(t, p0_ptr, p1_ptr, BN: gl.constexpr, W: gl.constexpr, N_CODED: gl.constexpr,
                      FAMILY: gl.constexpr):  # fmt: skip
    """The forward rotation y of the fused families whose blocks are consecutive columns (``_jit._rotate``'s
    FAMILY_BLOCKS: y = M v per 4 columns, p0_ptr the matrices float32 [16, N_CODED / 4]; FAMILY_PAIRS: planar
    rotations per 2 columns, p0_ptr/p1_ptr cos and sin [N_CODED / 2]; FAMILY_NONE: y = t) of float32 t [BN, W]
    in a layout where each thread holds whole groups of 8 consecutive columns, so that every block sits in one
    thread: the reshapes and splits only rename registers (asserted). Blocks beyond N_CODED come out zero."""
    if FAMILY == FAMILY_BLOCKS:
        NB: gl.constexpr = W // 4
        lo, hi = gl.split(gl.reshape(t, [BN, NB, 2, 2]))  # lo: columns 4b + {0, 2}, hi: 4b + {1, 3}
        v0, v2 = gl.split(lo)
        v1, v3 = gl.split(hi)
        blk = gl.arange(0, NB, layout=gl.SliceLayout(0, v0.type.layout))
        ok = blk < N_CODED // 4
        base = p0_ptr + blk
        w0 = _block_output(base, ok, 0, N_CODED // 4, v0, v1, v2, v3)
        w1 = _block_output(base, ok, 1, N_CODED // 4, v0, v1, v2, v3)
        w2 = _block_output(base, ok, 2, N_CODED // 4, v0, v1, v2, v3)
        w3 = _block_output(base, ok, 3, N_CODED // 4, v0, v1, v2, v3)
        y = gl.reshape(gl.join(gl.join(w0, w2), gl.join(w1, w3)), [BN, W])
    elif FAMILY == FAMILY_PAIRS:
        NP: gl.constexpr = W // 2
        x0, x1 = gl.split(gl.reshape(t, [BN, NP, 2]))
        pair = gl.arange(0, NP, layout=gl.SliceLayout(0, x0.type.layout))
        ok = pair < N_CODED // 2
        c = gl.load(p0_ptr + pair, mask=ok, other=0.0)[None, :]
        s = gl.load(p1_ptr + pair, mask=ok, other=0.0)[None, :]
        y = gl.reshape(gl.join(c * x0 - s * x1, s * x0 + c * x1), [BN, W])
    else:
        y = t
    return gl.convert_layout(y, t.type.layout, assert_trivial=True)


@gluon.jit
def _quantize_kernel(
    x_ptr, codes_ptr, norms_ptr, flag_ptr, signs_ptr, p1_ptr, bnd_ptr, N,
    DIM: gl.constexpr, N_CODED: gl.constexpr, CODE_BYTES: gl.constexpr,
    stride_xr, stride_xc, stride_cr, stride_cc,
    BN: gl.constexpr, W: gl.constexpr, BITS: gl.constexpr, SYMMETRIC: gl.constexpr, WORD: gl.constexpr,
    HAS_FLAG: gl.constexpr, LANES: gl.constexpr, FAMILY: gl.constexpr,
):  # fmt: skip
    """Quantize of a [BN, W] tile: hadamard (FAMILY 3, kronecker's one block 4: signs_ptr its lane signs), or
    a rotation of consecutive columns (FAMILY_BLOCKS, FAMILY_PAIRS, FAMILY_NONE: signs_ptr and p1_ptr the plan's
    fused parameters, ``_rotate_in_thread``); all in ``LANES.memory`` (no exchange)."""
    MEMORY: gl.constexpr = LANES.memory
    COMPUTE: gl.constexpr = LANES.compute
    WORDS: gl.constexpr = LANES.words
    rows = gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MEMORY))
    row_ok = rows < N
    cols = gl.arange(0, W, layout=gl.SliceLayout(0, MEMORY))
    x = _load_rows(x_ptr, rows, row_ok, cols, DIM, stride_xr, stride_xc)
    ss = gl.sum(x * x, axis=1)
    rho, inv = _norm_of(ss)
    gl.store(norms_ptr + rows, rho, mask=row_ok)
    if HAS_FLAG:
        _flag_bad_rows(flag_ptr, rho, row_ok)
    # Symmetric codebooks (bits 1-4): the row is rotated unscaled and searched against the boundaries times its
    # clamped norm (times sqrt(n) for hadamard's unnormalized transform), as the round trip does: 2^(bits-1) - 1
    # multiplies a row instead of one or two an element (sm_90, float16 bits 3 dim 256: hadamard 1744 -> 1624
    # instructions a thread of 64 elements, full 720 -> 696 a thread of 32). The search of z against t * s is
    # that of z / s against t up to float rounding (codes may differ on a boundary).
    if FAMILY <= FAMILY_NONE:
        y = _rotate_in_thread(x if SYMMETRIC else x * inv[:, None], signs_ptr, p1_ptr, BN, W, N_CODED, FAMILY)
        unnormalized: gl.constexpr = 1.0
    else:
        y = _forward(x, inv, signs_ptr, cols, BN, W, N_CODED, LANES, UNSCALED if SYMMETRIC else SCALE_LAST)
        unnormalized: gl.constexpr = N_CODED**0.5
    if SYMMETRIC:
        # 1 / inv: rho, but the clamped norm below ||x|| = 1.1e-19. A row whose sum of squares is not finite gets
        # NaN thresholds (inf * 0), so codes of its own (the plain kernel codes it as zeros): such rows raise the
        # bad-row flag and are refused by the checked calls; their codes are unspecified (docs/FORMAT.md).
        unit = gl.maximum(ss, SS_FLOOR) * inv
        scale = gl.convert_layout(unit * unnormalized, gl.SliceLayout(1, COMPUTE), assert_trivial=True)
        if BITS == 2 and N_CODED == W:
            word = _code_words_2bit(y, bnd_ptr, scale, WORDS, BN, W)
        elif BITS == 3 and N_CODED == W and x_ptr.dtype.element_ty != gl.float32:  # steps_search
            word = _code_words_3bit(y, bnd_ptr, scale, WORDS, BN, W)
        else:
            word = _pack(_coded(y, bnd_ptr, BITS, True, scale[:, None], N_CODED, W, COMPUTE), WORDS, BN, W, BITS)
    else:
        word = _pack(_coded(y, bnd_ptr, BITS, False, 1.0, N_CODED, W, COMPUTE), WORDS, BN, W, BITS)
    _store_words(word, codes_ptr, rows, row_ok, stride_cr, stride_cc, WORDS, W // 8, CODE_BYTES, BITS, WORD)


@gluon.jit
def _dequantize_kernel(
    codes_ptr, norms_ptr, out_ptr, flag_ptr, signs_ptr, cent_ptr, N,
    DIM: gl.constexpr, N_CODED: gl.constexpr, CODE_BYTES: gl.constexpr,
    stride_cr, stride_cc, stride_n, stride_or, stride_oc,
    BN: gl.constexpr, W: gl.constexpr, BITS: gl.constexpr, SYMMETRIC: gl.constexpr, WORD: gl.constexpr,
    HAS_FLAG: gl.constexpr, LANES: gl.constexpr,
):  # fmt: skip
    MEMORY: gl.constexpr = LANES.memory
    COMPUTE: gl.constexpr = LANES.compute
    WORDS: gl.constexpr = LANES.words
    rows = gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MEMORY))
    row_ok = rows < N
    cols = gl.arange(0, W, layout=gl.SliceLayout(0, MEMORY))
    rho = gl.load(norms_ptr + rows * stride_n, mask=row_ok, other=0.0)
    if HAS_FLAG:
        _flag_bad_rows(flag_ptr, rho, row_ok)
    word = _load_words(codes_ptr, rows, row_ok, stride_cr, stride_cc, WORDS, W // 8, CODE_BYTES, BITS, WORD)
    SCALED: gl.constexpr = SYMMETRIC and BITS <= 2  # the row's scale rho / sqrt(n) on its 2 centroids
    scale = gl.convert_layout(rho, gl.SliceLayout(1, WORDS), assert_trivial=True) * (1.0 / N_CODED**0.5)
    c = _centroids_of_words(word, cent_ptr, scale, COMPUTE, WORDS, BN, W, BITS, SYMMETRIC)
    if N_CODED < W:  # padding columns hold code 0, whose centroid is not zero
        cols_c = gl.arange(0, W, layout=gl.SliceLayout(0, COMPUTE))
        c = gl.where((cols_c < N_CODED)[None, :], c, 0.0)
    PAIRS: gl.constexpr = DIM == W and out_ptr.dtype.element_ty.primitive_bitwidth == 16 and stride_oc == 1
    x = _inverse(c, rho, signs_ptr, cols, BN, W, N_CODED, LANES, SCALED, PAIRS)
    _store_rows(x, signs_ptr, out_ptr, rows, row_ok, cols, stride_or, stride_oc, DIM, N_CODED, BN, W, PAIRS)


@gluon.jit
def _roundtrip_kernel(
    x_ptr, out_ptr, err_ptr, flag_ptr, signs_ptr, bnd_ptr, cent_ptr, N,
    DIM: gl.constexpr, N_CODED: gl.constexpr,
    stride_xr, stride_xc, stride_or, stride_oc,
    BN: gl.constexpr, W: gl.constexpr, BITS: gl.constexpr, SYMMETRIC: gl.constexpr,
    HAS_FLAG: gl.constexpr, LANES: gl.constexpr,
):  # fmt: skip
    MEMORY: gl.constexpr = LANES.memory
    COMPUTE: gl.constexpr = LANES.compute
    rows = gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MEMORY))
    row_ok = rows < N
    cols = gl.arange(0, W, layout=gl.SliceLayout(0, MEMORY))
    x = _load_rows(x_ptr, rows, row_ok, cols, DIM, stride_xr, stride_xc)
    # Not for bits 4 with 4 rows a thread (dim 8: 4 scaled tables of 15 took more spills than they saved), nor
    # for dim 128 bits 3 (H200, N = 2^20, 16-bit outputs: 1.11-1.13x the time of the other branch, though sm_90
    # SASS counted fewer instructions and no spills; dims 64 and 256: 0.90-1.00x).
    if SYMMETRIC and BITS <= 4 and (BITS < 4 or LANES.compute.size_per_thread[0] < 4) and not (W == 128 and BITS == 3):
        # z = H (signs * x) unscaled; instead of x / rho / sqrt(n) an element before the transform and rho /
        # sqrt(n) an element after the inverse, the row's positive boundaries are scaled by rho sqrt(n) and its
        # centroids by rho / sqrt(n) (2^bits - 1 multiplies a row). The flag and the norm's use come after the
        # transform, which does not wait for them (sm_90, dim 256, 16-bit: 41 -> 35.5 instructions an element
        # at bits 3, and no predicate spills in the search).
        ss = gl.sum(x * x, axis=1)
        z = _forward(x, ss, signs_ptr, cols, BN, W, N_CODED, LANES, UNSCALED)  # (its inv is unused)
        rho, inv = _norm_of(ss)
        if HAS_FLAG:
            _flag_bad_rows(flag_ptr, rho, row_ok)
        # The thresholds scale by 1 / inv, which is rho except below the clamp of _norm_of (||x|| < 1.1e-19):
        # there quantize divides by the clamped norm, and the round trip must pick the same codes.
        unit = gl.maximum(ss, SS_FLOOR) * inv
        unit_c = gl.convert_layout(unit, gl.SliceLayout(1, COMPUTE), assert_trivial=True)
        rho_c = gl.convert_layout(rho, gl.SliceLayout(1, COMPUTE), assert_trivial=True)
        c = _search_centroid(z, bnd_ptr, cent_ptr, BITS, True, (unit_c * N_CODED**0.5)[:, None],
                             (rho_c * (1.0 / N_CODED**0.5))[:, None])  # fmt: skip
        if N_CODED < W:
            cols_c = gl.arange(0, W, layout=gl.SliceLayout(0, COMPUTE))
            c = gl.where((cols_c < N_CODED)[None, :], c, 0.0)
        if DIM == W:
            # z / n - c = (y - c / (rho / sqrt(n))) rho / sqrt(n) with y the unit-norm rotated row (n a power of
            # two: 1 / n exact), so rho^2 ||y - c_unit||^2 = n ||z / n - c||^2 (one FFMA an element, as y - c was)
            d = z * (1.0 / N_CODED) - c
            err = gl.convert_layout(gl.sum(d * d, axis=1), gl.SliceLayout(1, MEMORY)) * N_CODED
        # Signs in the store (``_store_flipped_pairs``) but for W < 64 and W 128 at bits 4 (sm_90 SASS: at W 8-32
        # up to +120 instructions or more spills, and 2 more local accesses at W 128 bits 4; fewer elsewhere).
        PAIRS: gl.constexpr = (DIM == W and out_ptr.dtype.element_ty.primitive_bitwidth == 16 and stride_oc == 1
                               and W >= 64 and not (W == 128 and BITS == 4))  # fmt: skip
        x_hat = _inverse(c, rho, signs_ptr, cols, BN, W, N_CODED, LANES, True, PAIRS)
    else:
        rho, inv = _norm_of(gl.sum(x * x, axis=1))
        if HAS_FLAG:
            _flag_bad_rows(flag_ptr, rho, row_ok)
        y = _forward(x, inv, signs_ptr, cols, BN, W, N_CODED, LANES)
        c = _search_centroid(y, bnd_ptr, cent_ptr, BITS, SYMMETRIC)
        if N_CODED < W:  # (an all-true mask still costs a select an element)
            cols_c = gl.arange(0, W, layout=gl.SliceLayout(0, COMPUTE))
            c = gl.where((cols_c < N_CODED)[None, :], c, 0.0)
        if DIM == W:
            # Unpadded rows: ||x - x_hat|| = rho ||y - c|| (the signs and H / sqrt(n) are orthonormal), so the
            # error is summed where the codes were chosen and x is dead after the forward transform: with the
            # register cap (_launch.LANE_MAXNREG) the kernel fits 128 registers a thread (sm_90: it took 146-183
            # at bits 3-4).
            d = y - c
            err = gl.convert_layout(gl.sum(d * d, axis=1), gl.SliceLayout(1, MEMORY)) * (rho * rho)
        x_hat = _inverse(c, rho, signs_ptr, cols, BN, W, N_CODED, LANES)
        PAIRS: gl.constexpr = False
    _store_rows(x_hat, signs_ptr, out_ptr, rows, row_ok, cols, stride_or, stride_oc, DIM, N_CODED, BN, W, PAIRS)
    if DIM < W:  # padded rows: the error of the first DIM columns only
        diff = gl.where((cols < DIM)[None, :], x - x_hat, 0.0)
        err = gl.sum(diff * diff, axis=1)
    gl.store(err_ptr + rows, err, mask=row_ok)
