"""Quantize: rows x [N, dim] (float16 | bfloat16 | float32, any strides) -> packed codes uint8
[N, code_bytes] and norms float32 [N], in one pass over the input.

Fused kernel (full, fast, 2d, identity, hadamard, kronecker up to 4 blocks): per tile of BN rows, load x
once, norm, scale, rotate in registers, search the codebook, pack 8 codes into b bytes and store. On CUDA,
hadamard (and kronecker at power-of-two dims) and full and fast run that pass in the Gluon kernel instead
(``_gluon._quantize_kernel``, ``_launch.launch_fused``). Matrix kernel (dense, kronecker with more blocks):
the rotation is y = (x / rho) @ A^T with A [n_coded, dim] (tl.dot in float32, "ieee"), K-looped over dim and
tiled over the coded columns; x is re-read from L2 once per output tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.plan import Plan
from kernels.triton._jit import (
    EPS,
    _code_search,
    _code_words,
    _flag_bad_rows,
    _pack_words,
    _rotate,
    _row_chunk,
    _rows_norm,
    _store_words,
)
from kernels.triton._launch import (
    aligned,
    cdiv,
    check_flag,
    check_rows,
    flag_non_finite,
    fused,
    fused_tile,
    int_class,
    lane_plan,
    launch_fused,
    matrix_tiles,
    word_access,
)


@triton.jit
def _quantize_fused_kernel(
    x_ptr,
    codes_ptr,
    norms_ptr,
    flag_ptr,
    p0_ptr,
    p1_ptr,
    bnd_ptr,
    N,
    DIM: tl.constexpr,
    N_CODED: tl.constexpr,
    CODE_BYTES: tl.constexpr,
    stride_xr,
    stride_xc,
    stride_cr,
    stride_cc,
    BN: tl.constexpr,
    W: tl.constexpr,
    BITS: tl.constexpr,
    FAMILY: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    WORD: tl.constexpr,
    HAS_FLAG: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    cols = tl.arange(0, W)
    # A row in one tile is loaded once; wider rows (see fused_tile) go in chunks of W columns: a norm
    # pass, then each chunk is loaded again in the loop.
    whole, rho, inv = _rows_norm(x_ptr, rows, row_ok, DIM, N_CODED, stride_xr, stride_xc, W)
    tl.store(norms_ptr + rows, rho, mask=row_ok)
    if HAS_FLAG:
        _flag_bad_rows(flag_ptr, rho, row_ok)
    for c0 in tl.static_range(0, N_CODED, W):  # one trip for a whole row
        x = _row_chunk(whole, x_ptr, rows, row_ok, c0 + cols, DIM, N_CODED, stride_xr, stride_xc, W)
        _quantize_tile(
            x,
            inv,
            codes_ptr,
            p0_ptr,
            p1_ptr,
            bnd_ptr,
            rows,
            row_ok,
            c0 + cols,
            N_CODED,
            c0,
            CODE_BYTES,
            stride_cr,
            stride_cc,
            BN,
            W,
            BITS,
            FAMILY,
            SYMMETRIC,
            WORD,
        )


@triton.jit
def _quantize_tile(
    x,
    inv,
    codes_ptr,
    p0_ptr,
    p1_ptr,
    bnd_ptr,
    rows,
    row_ok,
    cols,
    N_CODED,
    C0,
    CODE_BYTES,
    stride_cr,
    stride_cc,
    BN: tl.constexpr,
    W: tl.constexpr,
    BITS: tl.constexpr,
    FAMILY: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    WORD: tl.constexpr,
):
    """Codes of the float32 tile x [BN, W] (columns ``cols`` = C0 .. C0 + W - 1, C0 a multiple of 8;
    1 / rho [BN]), packed and stored from byte C0 * BITS / 8 of the rows."""
    # x * (1 / rho) instead of x / rho: one multiply an element instead of a division; the two differ by
    # an ulp or two, which moves only values within ~1e-7 relative of a boundary.
    y = _rotate(x * inv[:, None], p0_ptr, p1_ptr, BN, W, N_CODED, C0, FAMILY, False)
    if C0 + W <= N_CODED:
        valid = None  # every column of the chunk is coded
    else:
        valid = (cols < N_CODED)[None, :]  # padding codes are zero bits in the last byte
    if SYMMETRIC and BITS == 2:
        word = _code_words(y, bnd_ptr, valid, BN, W)
    else:
        codes = _code_search(y, bnd_ptr, BITS, SYMMETRIC)
        if valid is not None:
            codes = tl.where(valid, codes, 0)
        word = _pack_words(codes, BN, W, BITS)
    first = (C0 // 8) * BITS  # the chunk's first byte
    _store_words(
        word,
        codes_ptr + first * stride_cc,
        rows,
        row_ok,
        stride_cr,
        stride_cc,
        BN,
        W,
        CODE_BYTES - first,
        BITS,
        WORD,
    )


@triton.jit
def _quantize_matrix_kernel(
    x_ptr,
    codes_ptr,
    norms_ptr,
    a_ptr,
    bnd_ptr,
    N,
    DIM: tl.constexpr,
    N_CODED: tl.constexpr,
    CODE_BYTES: tl.constexpr,
    stride_xr,
    stride_xc,
    stride_cr,
    stride_cc,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BO: tl.constexpr,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xr
    ks = tl.arange(0, BK)
    ss = tl.zeros([BN], tl.float32)
    for k0 in range(0, DIM, BK):
        x = tl.load(
            x_rows + (k0 + ks)[None, :] * stride_xc, mask=row_ok[:, None] & (k0 + ks < DIM)[None, :], other=0.0
        ).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    rho = tl.sqrt_rn(ss)
    tl.store(norms_ptr + rows, rho, mask=row_ok)
    inv = 1.0 / tl.maximum(rho, EPS)
    os = tl.arange(0, BO)
    for o0 in range(0, N_CODED, BO):
        acc = tl.zeros([BN, BO], tl.float32)
        for k0 in range(0, DIM, BK):
            x = (
                tl.load(
                    x_rows + (k0 + ks)[None, :] * stride_xc, mask=row_ok[:, None] & (k0 + ks < DIM)[None, :], other=0.0
                ).to(tl.float32)
                * inv[:, None]
            )
            a_t = tl.load(
                a_ptr + (o0 + os)[None, :] * DIM + (k0 + ks)[:, None],
                mask=(o0 + os < N_CODED)[None, :] & (k0 + ks < DIM)[:, None],
                other=0.0,
            )
            acc = tl.dot(x, a_t, acc, input_precision="ieee")
        codes = _code_search(acc, bnd_ptr, BITS, SYMMETRIC)
        codes = tl.where((o0 + os < N_CODED)[None, :], codes, 0)
        # o0 is a multiple of 8 (BO is), so this tile's codes start at byte o0 * BITS / 8.
        _store_words(
            _pack_words(codes, BN, BO, BITS),
            codes_ptr + (o0 // 8) * BITS * stride_cc,
            rows,
            row_ok,
            stride_cr,
            stride_cc,
            BN,
            BO,
            CODE_BYTES - (o0 // 8) * BITS,
            BITS,
            False,
        )


def quantize(
    x: torch.Tensor, plan: Plan, tile: tuple[int, int] | None = None, flag: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [N, dim] -> (packed codes uint8 [N, code_bytes], norms float32 [N]); same results as
    ``kernels.reference.quantize`` (codes may differ only for values within ~1e-7 relative of a boundary).
    ``tile``: the fused kernel's (tile elements, warps) instead of ``_launch.fused_tile``'s (benchmarks).
    ``flag``: int32 [1] (on the device, or pinned host memory) set to 1 if a row's norm is not finite
    (``_launch.check_flag``; the fused kernels never clear it, dense's path writes 0 or 1)."""
    check_rows(x, plan)
    check_flag(flag, x)
    n = x.shape[0]
    codes = torch.empty(n, plan.code_bytes, dtype=torch.uint8, device=x.device)
    norms = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, norms
    sym = plan.symmetric
    if fused(plan):
        width, rows, warps = fused_tile(plan, n, "quantize", tile)
        lanes = lane_plan(plan, x.device, width, rows, warps, exchange=False, loaded=x.dtype)
        grid = cdiv(n, rows)
        stride_xr, stride_xc = x.stride()
        sizes = (n, plan.dim, plan.n_coded, plan.code_bytes, stride_xr, stride_xc, *codes.stride())
        word = word_access(plan, codes)
        meta = dict(BN=rows, W=width, BITS=plan.bits, SYMMETRIC=sym, WORD=word, num_warps=warps)
        # The launch class (_launch.launch): what varies between calls of this plan (codes and norms are fresh).
        key = (width, rows, warps, word, x.dtype, aligned(x), int_class(n), int_class(stride_xr), int_class(stride_xc))
        head, tail = (x, codes, norms), (plan.boundaries, *sizes)
        launch_fused(plan, "quantize", _quantize_fused_kernel, key, grid, lanes, head, flag, tail, meta)
    else:
        bn, bk, bo = matrix_tiles(plan)
        _quantize_matrix_kernel[(cdiv(n, bn),)](
            x,
            codes,
            norms,
            plan.mixing_matrix,
            plan.boundaries,
            n,
            plan.dim,
            plan.n_coded,
            plan.code_bytes,
            x.stride(0),
            x.stride(1),
            codes.stride(0),
            codes.stride(1),
            BN=bn,
            BK=bk,
            BO=bo,
            BITS=plan.bits,
            SYMMETRIC=sym,
            num_warps=4,
        )
        if flag is not None:  # (the matrix kernels write no flag: three small launches and an async copy)
            flag_non_finite(norms, flag)
    return codes, norms
