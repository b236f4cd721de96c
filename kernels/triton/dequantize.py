"""Dequantize: packed codes uint8 [N, code_bytes] + norms float32 [N] -> reconstruction [N, dim] in the
requested dtype, in one pass.

Fused kernel (full, fast, 2d, identity): per tile, load b bytes per group of 8 codes, unpack, gather the
centroids (the table of 2^b floats is 1-2 cache lines for b <= 5: an L1 hit per element), inverse-rotate in
registers, scale by the norm, cast and store the first dim columns. Matrix kernel (dense, hadamard):
x = rho * (c @ A)[:dim], K-looped over the coded columns; with HAS_X it also returns ||x - x_hat||^2
(used by the round trip of these two variants).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.plan import Plan
from kernels.triton._jit import (
    _centroid,
    _flag_bad_rows,
    _load_words,
    _rotate,
    _unpack_words,
    _word_centroids,
)
from kernels.triton._launch import (
    FLOAT_DTYPES,
    aligned,
    cdiv,
    check_device,
    check_flag,
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
def _dequantize_fused_kernel(
    codes_ptr,
    norms_ptr,
    out_ptr,
    flag_ptr,
    p0_ptr,
    p1_ptr,
    cent_ptr,
    N,
    DIM: tl.constexpr,
    N_CODED: tl.constexpr,
    CODE_BYTES: tl.constexpr,
    stride_cr,
    stride_cc,
    stride_n,
    stride_or,
    stride_oc,
    BN: tl.constexpr,
    W: tl.constexpr,
    BITS: tl.constexpr,
    FAMILY: tl.constexpr,
    WORD: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    HAS_FLAG: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    cols = tl.arange(0, W)
    rho = tl.load(norms_ptr + rows * stride_n, mask=row_ok, other=0.0)
    if HAS_FLAG:
        _flag_bad_rows(flag_ptr, rho, row_ok)
    # Rows wider than one tile go in chunks of W columns (see fused_tile); C0 a multiple of 8.
    for c0 in tl.static_range(0, N_CODED, W):
        first = (c0 // 8) * BITS  # the chunk's first byte
        word = _load_words(
            codes_ptr + first * stride_cc, rows, row_ok, stride_cr, stride_cc, BN, W, CODE_BYTES - first, BITS, WORD
        )
        # Centroids straight from the packed words at bits 1-2 (see _word_centroids): 0.89x the time for
        # full/fast at bits 2 (H200, N = 2^20, dim 128), but 1.2x for 2d ("pairs"; its tile goes through more
        # layout conversions), so 2d keeps the unpacked codes at bits 2.
        if SYMMETRIC and (BITS == 1 or (BITS == 2 and FAMILY != 1)):
            c = _word_centroids(word, cent_ptr, BN, W, BITS)
        else:
            c = _centroid(_unpack_words(word, BN, W, BITS), cent_ptr, BITS, SYMMETRIC)
        # Padding columns (>= n_coded) hold code 0, whose centroid is not zero; zero them so that the
        # padded blocks of the tile stay out of the sums of the inverse rotation.
        c = tl.where((c0 + cols < N_CODED)[None, :], c, 0.0)
        x = _rotate(c, p0_ptr, p1_ptr, BN, W, N_CODED, c0, FAMILY, True) * rho[:, None]
        tl.store(
            out_ptr + rows.to(tl.int64)[:, None] * stride_or + (c0 + cols)[None, :] * stride_oc,
            x.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (c0 + cols < DIM)[None, :],
        )


@triton.jit
def _unpack_columns(codes_ptr, row_off, row_ok, cols, stride_cc, CODE_BYTES, N_CODED, BITS: tl.constexpr):
    """Codes int32 [BN, BK] of columns ``cols`` [BK] (any alignment): two byte gathers per code, since a
    code of b bits straddles at most two bytes."""
    bit = cols * BITS
    first = bit >> 3
    ok = row_ok[:, None] & (cols < N_CODED)[None, :]
    lo = tl.load(codes_ptr + row_off + first[None, :] * stride_cc, mask=ok, other=0).to(tl.int32)
    hi = tl.load(
        codes_ptr + row_off + (first + 1)[None, :] * stride_cc, mask=ok & (first + 1 < CODE_BYTES)[None, :], other=0
    ).to(tl.int32)
    return (((hi << 8) | lo) >> (bit & 7)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _dequantize_matrix_kernel(
    codes_ptr,
    norms_ptr,
    out_ptr,
    a_ptr,
    cent_ptr,
    x_ptr,
    err_ptr,
    N,
    DIM: tl.constexpr,
    N_CODED: tl.constexpr,
    CODE_BYTES: tl.constexpr,
    stride_cr,
    stride_cc,
    stride_n,
    stride_or,
    stride_oc,
    stride_xr,
    stride_xc,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BO: tl.constexpr,
    BITS: tl.constexpr,
    HAS_X: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    code_rows = rows.to(tl.int64)[:, None] * stride_cr
    ks = tl.arange(0, BK)
    os = tl.arange(0, BO)
    rho = tl.load(norms_ptr + rows * stride_n, mask=row_ok, other=0.0)
    err = tl.zeros([BN], tl.float32)
    for o0 in range(0, DIM, BO):
        acc = tl.zeros([BN, BO], tl.float32)
        for k0 in range(0, N_CODED, BK):
            codes = _unpack_columns(codes_ptr, code_rows, row_ok, k0 + ks, stride_cc, CODE_BYTES, N_CODED, BITS)
            c = tl.where((k0 + ks < N_CODED)[None, :], tl.load(cent_ptr + codes), 0.0)
            a = tl.load(
                a_ptr + (k0 + ks)[:, None] * DIM + (o0 + os)[None, :],
                mask=(k0 + ks < N_CODED)[:, None] & (o0 + os < DIM)[None, :],
                other=0.0,
            )
            acc = tl.dot(c, a, acc, input_precision="ieee")
        x_hat = acc * rho[:, None]
        out_ok = row_ok[:, None] & (o0 + os < DIM)[None, :]
        tl.store(
            out_ptr + rows.to(tl.int64)[:, None] * stride_or + (o0 + os)[None, :] * stride_oc,
            x_hat.to(out_ptr.dtype.element_ty),
            mask=out_ok,
        )
        if HAS_X:
            x = tl.load(
                x_ptr + rows.to(tl.int64)[:, None] * stride_xr + (o0 + os)[None, :] * stride_xc, mask=out_ok, other=0.0
            ).to(tl.float32)
            diff = tl.where(out_ok, x - x_hat, 0.0)
            err += tl.sum(diff * diff, axis=1)
    if HAS_X:
        tl.store(err_ptr + rows, err, mask=row_ok)


def check_codes(codes: torch.Tensor, norms: torch.Tensor, plan: Plan) -> None:
    """codes uint8 [N, code_bytes], norms float32 [N], both on the plan's device (any strides)."""
    if codes.dtype != torch.uint8 or codes.ndim != 2 or codes.shape[1] != plan.code_bytes:
        raise ValueError(f"codes must be uint8 [N, {plan.code_bytes}], got {codes.dtype} {list(codes.shape)}")
    if norms.dtype != torch.float32 or norms.shape != codes.shape[:1]:
        raise ValueError(f"norms must be float32 [{codes.shape[0]}], got {norms.dtype} {list(norms.shape)}")
    check_device(codes, plan, "codes")
    check_device(norms, plan, "norms")


def launch_matrix_dequantize(codes, norms, out, plan, x=None, err=None) -> None:
    """Run the dense/hadamard dequantize kernel into ``out`` [N, dim]; with x and err also the squared error."""
    n = codes.shape[0]
    bn, bk, bo = matrix_tiles(plan)
    has_x = x is not None
    xs = (x.stride(0), x.stride(1)) if has_x else (0, 0)
    _dequantize_matrix_kernel[(cdiv(n, bn),)](
        codes,
        norms,
        out,
        plan.mixing_matrix,
        plan.centroids,
        x if has_x else out,
        err if has_x else norms,
        n,
        plan.dim,
        plan.n_coded,
        plan.code_bytes,
        codes.stride(0),
        codes.stride(1),
        norms.stride(0),
        out.stride(0),
        out.stride(1),
        *xs,
        BN=bn,
        BK=bk,
        BO=bo,
        BITS=plan.bits,
        HAS_X=has_x,
        num_warps=4,
    )


def dequantize(
    codes: torch.Tensor,
    norms: torch.Tensor,
    plan: Plan,
    dtype: torch.dtype,
    tile: tuple[int, int] | None = None,
    flag: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed codes uint8 [N, code_bytes] and norms float32 [N] -> reconstruction [N, dim] in ``dtype``
    (float16 | bfloat16 | float32); matches ``kernels.reference.dequantize`` within float32 rounding.
    ``tile``: the fused kernel's (tile elements, warps) instead of ``_launch.fused_tile``'s (benchmarks).
    ``flag``: int32 [1] (on the device, or pinned host memory) set to 1 if a norm is not finite
    (``_launch.check_flag``; the fused kernels never clear it, dense's path writes 0 or 1)."""
    check_codes(codes, norms, plan)
    check_flag(flag, norms)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    n = codes.shape[0]
    out = torch.empty(n, plan.dim, dtype=dtype, device=codes.device)
    if n == 0:
        return out
    if fused(plan):
        width, rows, warps = fused_tile(plan, n, "dequantize", tile)
        lanes = lane_plan(plan, codes.device, width, rows, warps, dtype)
        grid = cdiv(n, rows)
        stride_cr, stride_cc = codes.stride()
        stride_n = norms.stride(0)
        sizes = (n, plan.dim, plan.n_coded, plan.code_bytes, stride_cr, stride_cc, stride_n, *out.stride())
        word = word_access(plan, codes)
        meta = dict(BN=rows, W=width, BITS=plan.bits, WORD=word, SYMMETRIC=plan.symmetric, num_warps=warps)
        # The launch class (_launch.launch): what varies between calls of this plan (out is fresh).
        key = (
            width, rows, warps, word, dtype, aligned(codes), aligned(norms),
            int_class(n), int_class(stride_cr), int_class(stride_cc), int_class(stride_n),
        )  # fmt: skip
        head, tail = (codes, norms, out), (plan.centroids, *sizes)
        launch_fused(plan, "dequantize", _dequantize_fused_kernel, key, grid, lanes, head, flag, tail, meta)
    else:
        launch_matrix_dequantize(codes, norms, out, plan)
        if flag is not None:
            flag_non_finite(norms, flag)
    return out
