"""Round trip: rows x [N, dim] -> reconstruction [N, dim] (float32 by default, or float16 / bfloat16) and
squared error ||x - x_hat||^2 float32 [N] of the float32 reconstruction, without writing codes to memory
(fused variants).

Fused kernel (full, fast, 2d, identity): quantize and dequantize of one tile in registers: load, norm,
rotate, search, gather centroids, inverse-rotate, scale, store x_hat, reduce the error. dense and hadamard
run the quantize kernel (codes go through a temporary, 1/32 to 1/4 of the input's bytes) and then the
dequantize kernel that also reduces the error.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.plan import Plan
from kernels.triton._jit import (
    _flag_bad_rows,
    _rotate,
    _row_chunk,
    _rows_norm,
    _search_centroid,
)
from kernels.triton._launch import (
    FLOAT_DTYPES,
    aligned,
    cdiv,
    check_flag,
    check_rows,
    fused,
    fused_tile,
    int_class,
    lane_plan,
    launch_fused,
)
from kernels.triton.dequantize import launch_matrix_dequantize
from kernels.triton.quantize import quantize


@triton.jit
def _roundtrip_fused_kernel(
    x_ptr,
    out_ptr,
    err_ptr,
    flag_ptr,
    p0_ptr,
    p1_ptr,
    bnd_ptr,
    cent_ptr,
    N,
    DIM: tl.constexpr,
    N_CODED: tl.constexpr,
    stride_xr,
    stride_xc,
    stride_or,
    stride_oc,
    BN: tl.constexpr,
    W: tl.constexpr,
    BITS: tl.constexpr,
    FAMILY: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    HAS_FLAG: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    cols = tl.arange(0, W)
    # A row in one tile is loaded once; wider rows (see fused_tile) go in chunks of W columns: a norm
    # pass, then each chunk is loaded again in the loop.
    whole, rho, inv = _rows_norm(x_ptr, rows, row_ok, DIM, N_CODED, stride_xr, stride_xc, W)
    if HAS_FLAG:
        _flag_bad_rows(flag_ptr, rho, row_ok)
    err = tl.zeros([BN], tl.float32)
    for c0 in tl.static_range(0, N_CODED, W):  # one trip for a whole row
        x = _row_chunk(whole, x_ptr, rows, row_ok, c0 + cols, DIM, N_CODED, stride_xr, stride_xc, W)
        err += _roundtrip_tile(
            x,
            rho,
            inv,
            out_ptr,
            p0_ptr,
            p1_ptr,
            bnd_ptr,
            cent_ptr,
            rows,
            row_ok,
            c0 + cols,
            DIM,
            N_CODED,
            c0,
            stride_or,
            stride_oc,
            BN,
            W,
            BITS,
            FAMILY,
            SYMMETRIC,
        )
    tl.store(err_ptr + rows, err, mask=row_ok)


@triton.jit
def _roundtrip_tile(
    x,
    rho,
    inv,
    out_ptr,
    p0_ptr,
    p1_ptr,
    bnd_ptr,
    cent_ptr,
    rows,
    row_ok,
    cols,
    DIM,
    N_CODED,
    C0,
    stride_or,
    stride_oc,
    BN: tl.constexpr,
    W: tl.constexpr,
    BITS: tl.constexpr,
    FAMILY: tl.constexpr,
    SYMMETRIC: tl.constexpr,
):
    """Round trip of the float32 tile x [BN, W] (columns ``cols`` = C0 .. C0 + W - 1 of the rows, norms
    rho and 1 / rho [BN]): stores x_hat and returns the tile's part of ||x - x_hat||^2 [BN]."""
    y = _rotate(x * inv[:, None], p0_ptr, p1_ptr, BN, W, N_CODED, C0, FAMILY, False)
    c = tl.where((cols < N_CODED)[None, :], _search_centroid(y, bnd_ptr, cent_ptr, BITS, SYMMETRIC), 0.0)
    x_hat = _rotate(c, p0_ptr, p1_ptr, BN, W, N_CODED, C0, FAMILY, True) * rho[:, None]
    mask = row_ok[:, None] & (cols < DIM)[None, :]
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * stride_or + cols[None, :] * stride_oc,
        x_hat.to(out_ptr.dtype.element_ty),
        mask=mask,
    )
    diff = tl.where(mask, x - x_hat, 0.0)
    return tl.sum(diff * diff, axis=1)


def roundtrip(
    x: torch.Tensor,
    plan: Plan,
    dtype: torch.dtype = torch.float32,
    tile: tuple[int, int] | None = None,
    flag: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [N, dim] -> (reconstruction [N, dim] in ``dtype`` (float16 | bfloat16 | float32), squared
    error float32 [N] of the float32 reconstruction); same results as ``kernels.reference.roundtrip``
    within float32 rounding (and the boundary rule of ``quantize``). A float16 output halves the bytes
    written at float16 input. ``tile``: the fused kernel's (tile elements, warps) instead of
    ``_launch.fused_tile``'s (benchmarks). ``flag``: int32 [1] (on the device, or pinned host memory) set to 1
    if a row's norm is not finite (``_launch.check_flag``; the fused kernels never clear it, dense's path
    writes 0 or 1)."""
    check_rows(x, plan)
    check_flag(flag, x)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    n = x.shape[0]
    out = torch.empty(n, plan.dim, dtype=dtype, device=x.device)
    err = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return out, err
    if fused(plan):
        width, rows, warps = fused_tile(plan, n, "roundtrip", tile)
        lanes = lane_plan(plan, x.device, width, rows, warps, dtype)
        grid = cdiv(n, rows)
        stride_xr, stride_xc = x.stride()
        sizes = (n, plan.dim, plan.n_coded, stride_xr, stride_xc, *out.stride())
        meta = dict(BN=rows, W=width, BITS=plan.bits, SYMMETRIC=plan.symmetric, num_warps=warps)
        # The launch class (_launch.launch): what varies between calls of this plan (out and err are fresh).
        key = (width, rows, warps, x.dtype, dtype, aligned(x), int_class(n), int_class(stride_xr), int_class(stride_xc))
        head, tail = (x, out, err), (plan.boundaries, plan.centroids, *sizes)
        launch_fused(plan, "roundtrip", _roundtrip_fused_kernel, key, grid, lanes, head, flag, tail, meta)
    else:
        codes, norms = quantize(x, plan, flag=flag)
        launch_matrix_dequantize(codes, norms, out, plan, x=x, err=err)
    return out, err
