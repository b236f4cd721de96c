"""The @triton.jit helpers of the kernels: norms, rotations, code search, bit packing.

Tile shape of the fused kernels (kernel families "blocks", "pairs", "none"): one program owns BN rows and W
columns, W = next power of two >= max(8, n_coded). Columns dim..W-1 are loaded as zeros, which is exactly
the zero padding of the method (padded coordinates are zero before the rotation). The tile is viewed as
[BN, W // 8, 8] for packing: 8 consecutive codes of b bits are exactly b bytes that start on a byte
boundary (docs/FORMAT.md layout), so each group of 8 packs into one integer word and is stored as b bytes.
The rotation views the same registers as [BN, W // 4, 4] quaternion blocks or [BN, W // 2, 2] planar
pairs; tl.split / tl.join on a last dimension of 2 that lives inside one thread cost no data movement.
"""

from __future__ import annotations

import triton
import triton.language as tl

SS_FLOOR = tl.constexpr(1.1754944e-38)  # the smallest normal float32: _norm_of clamps sum(x^2) to it
EPS = tl.constexpr(1e-30)  # the reference's clamp of the norm (kernels.reference.EPS); constexpr for @jit use


@triton.jit
def _norm(x):
    """Row norms and reciprocals of a float32 tile x [BN, W] -> (rho [BN], inv [BN]) (see _norm_of)."""
    return _norm_of(tl.sum(x * x, axis=1))


@triton.jit
def _flag_bad_rows(flag_ptr, rho, row_ok):
    """Set the int32 at flag_ptr to 1 if the norm rho float32 [BN] of a row (row_ok [BN]) is NaN or Inf: NaN/Inf
    in the row, or squares that overflow float32. The caller's whole check is then one word in pinned host
    memory, read after the sync it makes anyway (``Quantizer``, check=True): no reduction, no copy."""
    bad = row_ok & ((rho != rho) | (tl.abs(rho) > 3.4028234663852886e38))  # NaN, +-Inf (given norms)
    one = bad.to(tl.int32)
    tl.store(flag_ptr + one * 0, one, mask=bad)


@triton.jit
def _norm_of(ss):
    """(rho, inv) float32 [BN] from the row sums of squares ss [BN].

    inv = rsqrt(sum x^2) (MUFU.RSQ) and rho = sum * inv: the first version's sqrt_rn and IEEE division
    cost ~30 SASS instructions a row, with slow-path branches, for every row a thread holds (4 rows of
    dim 128 a thread: ~4 instructions an element). Both differ from the reference's sqrt and x / rho by
    an ulp or two. sum x^2 is clamped to the smallest normal float32, which keeps a zero vector at
    direction 0 (the reference's max(rho, 1e-30) clamp) and misses only ||x|| < 1.1e-19."""
    inv = tl.math.rsqrt(tl.maximum(ss, SS_FLOOR))
    return ss * inv, inv


@triton.jit
def _load_rows(x_ptr, rows, row_ok, cols, DIM, stride_xr, stride_xc):
    """float32 tile [BN, W] of rows ``rows`` [BN] and columns ``cols`` [W] (zero beyond DIM and N)."""
    return tl.load(
        x_ptr + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :] * stride_xc,
        mask=row_ok[:, None] & (cols < DIM)[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _chunk_norm(x_ptr, rows, row_ok, DIM, N_CODED: tl.constexpr, stride_xr, stride_xc, W: tl.constexpr):
    """(rho, inv) float32 [BN] of rows wider than one chunk: a first pass over the row's chunks of W
    columns sums the squares; the second pass of the caller loads each chunk again (an L1/L2 hit: the
    program's rows were just read; one more 16-byte load a thread per 8 float16 elements)."""
    cols = tl.arange(0, W)
    ss = tl.zeros([rows.shape[0]], tl.float32)
    for c0 in tl.static_range(0, N_CODED, W):
        x = _load_rows(x_ptr, rows, row_ok, c0 + cols, DIM, stride_xr, stride_xc)
        ss += tl.sum(x * x, axis=1)
    return _norm_of(ss)


@triton.jit
def _rows_norm(x_ptr, rows, row_ok, DIM, N_CODED: tl.constexpr, stride_xr, stride_xc, W: tl.constexpr):
    """(whole, rho, inv) for the fused kernels' rows: when a row fits one tile (N_CODED <= W), whole is
    that float32 tile [BN, W], loaded once, and its norms; otherwise whole is unused and the norms come
    from ``_chunk_norm``. The chunk loop then takes each chunk from ``_row_chunk``."""
    if N_CODED <= W:
        whole = _load_rows(x_ptr, rows, row_ok, tl.arange(0, W), DIM, stride_xr, stride_xc)
        rho, inv = _norm(whole)
    else:
        whole = tl.zeros([rows.shape[0], W], tl.float32)  # not used
        rho, inv = _chunk_norm(x_ptr, rows, row_ok, DIM, N_CODED, stride_xr, stride_xc, W)
    return whole, rho, inv


@triton.jit
def _row_chunk(whole, x_ptr, rows, row_ok, cols, DIM, N_CODED: tl.constexpr, stride_xr, stride_xc, W: tl.constexpr):
    """The float32 tile [BN, W] of columns ``cols``: ``whole`` when the row is one tile, else loaded
    again (an L1/L2 hit after ``_chunk_norm``)."""
    if N_CODED <= W:
        return whole
    else:
        return _load_rows(x_ptr, rows, row_ok, cols, DIM, stride_xr, stride_xc)


@triton.jit
def _coef(base, ok, k: tl.constexpr, N_BLOCKS):
    """Coefficient k (= 4 i + j) of every block's 4x4 matrix, as a [1, NB] row (0 for padding blocks);
    N_BLOCKS is the row stride of the coefficient-major table."""
    return tl.load(base + k * N_BLOCKS, mask=ok, other=0.0)[None, :]


@triton.jit
def _block_row(base, ok, K0: tl.constexpr, STEP: tl.constexpr, N_BLOCKS, v0, v1, v2, v3):
    """One output of every block's 4x4 product: sum over m of coefficient K0 + m * STEP times v_m."""
    return (
        _coef(base, ok, K0, N_BLOCKS) * v0
        + _coef(base, ok, K0 + STEP, N_BLOCKS) * v1
        + _coef(base, ok, K0 + 2 * STEP, N_BLOCKS) * v2
        + _coef(base, ok, K0 + 3 * STEP, N_BLOCKS) * v3
    )


@triton.jit
def _rotate_blocks(t, m_ptr, BN: tl.constexpr, W: tl.constexpr, N_BLOCKS, B0, INVERSE: tl.constexpr):
    """4x4 block rotation of a float32 tile t [BN, W] (W // 4 blocks of 4 consecutive columns, blocks
    B0 .. B0 + W // 4 - 1 of the row: the tile is a chunk of the row that starts at column 4 B0).

    m_ptr: float32 [16, N_BLOCKS], coefficient-major (``Plan.fused_params``): forward y = M v, inverse
    v = M^T y. Blocks >= N_BLOCKS (tile padding) get a zero matrix, so their output is zero.
    Coefficient-major because each coefficient is loaded for all blocks of the tile at once: from
    [N_BLOCKS, 4, 4] every such load touched one 64-byte block per lane (16 cache lines a warp
    instruction) and full/fast ran at 0.20-0.25 of copy bandwidth against 0.5-0.9 for identity
    (H200, N = 2^20, dim 128)."""
    NB: tl.constexpr = W // 4
    blk = B0 + tl.arange(0, NB)
    ok = blk < N_BLOCKS
    base = m_ptr + blk
    t4 = tl.reshape(t, [BN, NB, 2, 2])
    lo, hi = tl.split(t4)  # component j = 2a + c: lo holds c = 0 (j = 0, 2), hi holds c = 1 (j = 1, 3)
    v0, v2 = tl.split(lo)
    v1, v3 = tl.split(hi)
    # Output k is sum_m M'[k, m] v_m with M' = M (y = M v) or M^T (v = M^T y); coefficient M[i, j] is
    # element 4 i + j of the block, so M'[k, m] is element k * ROW + m * COL.
    if INVERSE:
        ROW: tl.constexpr = 1
        COL: tl.constexpr = 4
    else:
        ROW: tl.constexpr = 4
        COL: tl.constexpr = 1
    w0 = _block_row(base, ok, 0 * ROW, COL, N_BLOCKS, v0, v1, v2, v3)
    w1 = _block_row(base, ok, 1 * ROW, COL, N_BLOCKS, v0, v1, v2, v3)
    w2 = _block_row(base, ok, 2 * ROW, COL, N_BLOCKS, v0, v1, v2, v3)
    w3 = _block_row(base, ok, 3 * ROW, COL, N_BLOCKS, v0, v1, v2, v3)
    out = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [BN, NB, 2(a), 2(c)], j = 2a + c
    return tl.reshape(out, [BN, W])


@triton.jit
def _rotate_pairs(t, cos_ptr, sin_ptr, BN: tl.constexpr, W: tl.constexpr, N_PAIRS, P0, INVERSE: tl.constexpr):
    """Planar rotation of a float32 tile t [BN, W] (W // 2 pairs P0 .. P0 + W // 2 - 1 of the row):
    y0 = c x0 - s x1, y1 = s x0 + c x1; the inverse uses -s. Pairs >= N_PAIRS (tile padding) come out
    zero."""
    NP: tl.constexpr = W // 2
    pair = P0 + tl.arange(0, NP)
    ok = pair < N_PAIRS
    c = tl.load(cos_ptr + pair, mask=ok, other=0.0)[None, :]
    s = tl.load(sin_ptr + pair, mask=ok, other=0.0)[None, :]
    if INVERSE:
        s = -s
    x0, x1 = tl.split(tl.reshape(t, [BN, NP, 2]))
    y0 = c * x0 - s * x1
    y1 = s * x0 + c * x1
    return tl.reshape(tl.join(y0, y1), [BN, W])


@triton.jit
def _butterfly(t, BN: tl.constexpr, W: tl.constexpr, H: tl.constexpr):
    """One stage of the Walsh-Hadamard transform over the columns of t [BN, W]: for every pair of
    columns (j, j + H) in blocks of 2H, (a, b) -> (a + b, a - b). The pair axis is moved last so that
    tl.split / tl.join take it apart inside a thread."""
    u = tl.permute(tl.reshape(t, [BN, W // (2 * H), 2, H]), [0, 1, 3, 2])
    a, b = tl.split(u)
    u = tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2])
    return tl.reshape(u, [BN, W])


@triton.jit
def _rotate_hadamard(t, signs_ptr, BN: tl.constexpr, W: tl.constexpr, N_CODED: tl.constexpr, INVERSE: tl.constexpr):
    """Random signs and the fast Walsh-Hadamard transform of the n_coded columns (a power of two <= W; the
    columns beyond are zero and stay in butterfly blocks of their own), scaled by 1 / sqrt(n_coded):
    forward H (signs * x) / sqrt(n), inverse signs * H y / sqrt(n), as ``kernels.rotations.hadamard``:
    log2(n) butterfly stages in registers, no matrix."""
    cols = tl.arange(0, W)
    signs = tl.load(signs_ptr + cols, mask=cols < N_CODED, other=0.0)
    if not INVERSE:
        t = t * signs[None, :]
    for stage in tl.static_range(13):  # n_coded <= 4096 = 2^12
        if (1 << stage) < N_CODED:
            t = _butterfly(t, BN, W, 1 << stage)
    t = t * (1.0 / N_CODED**0.5)  # a float32 constant, as the reference's scalar scale
    if INVERSE:
        t = t * signs[None, :]
    return t


@triton.jit
def _mix_blocks(
    t, mix_ptr, BN: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, M: tl.constexpr, TRANSPOSE: tl.constexpr
):
    """Block j of the result = sum over k of mix[j, k] (mix[k, j] with TRANSPOSE) times block k, for the
    W // BLOCK blocks of BLOCK columns of t [BN, W]; mix [M, M] row-major, zero beyond M (padding blocks)."""
    NB: tl.constexpr = W // BLOCK
    j = tl.arange(0, NB)
    ok = (j[:, None] < M) & (j[None, :] < M)
    if TRANSPOSE:
        q = tl.load(mix_ptr + j[None, :] * M + j[:, None], mask=ok, other=0.0)
    else:
        q = tl.load(mix_ptr + j[:, None] * M + j[None, :], mask=ok, other=0.0)
    z = tl.reshape(t, [BN, 1, NB, BLOCK])
    y = tl.sum(z * tl.reshape(q, [1, NB, NB, 1]), axis=2)
    return tl.reshape(y, [BN, W])


@triton.jit
def _rotate_kronecker(
    t, signs_ptr, mix_ptr, BN: tl.constexpr, W: tl.constexpr, N_CODED: tl.constexpr, INVERSE: tl.constexpr
):
    """kronecker (``kernels.rotations.kronecker``): n_coded = m * BLOCK, BLOCK the largest power of two
    dividing it; forward (mix kron H) (signs * x) / sqrt(BLOCK), inverse signs * (mix^T kron H) y / sqrt(BLOCK):
    butterflies within each block, then a broadcast product across the blocks."""
    BLOCK: tl.constexpr = N_CODED & (-N_CODED)
    M: tl.constexpr = N_CODED // BLOCK
    cols = tl.arange(0, W)
    signs = tl.load(signs_ptr + cols, mask=cols < N_CODED, other=0.0)
    if INVERSE:
        t = _mix_blocks(t, mix_ptr, BN, W, BLOCK, M, True)
    else:
        t = t * signs[None, :]
    for stage in tl.static_range(13):
        if (1 << stage) < BLOCK:
            t = _butterfly(t, BN, W, 1 << stage)
    t = t * (1.0 / BLOCK**0.5)
    if INVERSE:
        t = t * signs[None, :]
    else:
        t = _mix_blocks(t, mix_ptr, BN, W, BLOCK, M, False)
    return t


@triton.jit
def _rotate(
    t,
    p0_ptr,
    p1_ptr,
    BN: tl.constexpr,
    W: tl.constexpr,
    N_CODED,
    C0,
    FAMILY: tl.constexpr,
    INVERSE: tl.constexpr,
):
    """Rotation of a float32 tile [BN, W] whose first column is column C0 (a multiple of W) of the row,
    for the fused kernel families (``_launch.FUSED_FAMILIES``): FAMILY 0 blocks, 1 pairs, 2 none,
    3 hadamard, 4 kronecker (whole rows only: C0 is 0)."""
    if FAMILY == 0:
        return _rotate_blocks(t, p0_ptr, BN, W, N_CODED // 4, C0 // 4, INVERSE)
    elif FAMILY == 1:
        return _rotate_pairs(t, p0_ptr, p1_ptr, BN, W, N_CODED // 2, C0 // 2, INVERSE)
    elif FAMILY == 3:
        return _rotate_hadamard(t, p0_ptr, BN, W, N_CODED, INVERSE)
    elif FAMILY == 4:
        return _rotate_kronecker(t, p0_ptr, p1_ptr, BN, W, N_CODED, INVERSE)
    else:
        return t


@triton.jit
def _magnitude_tree3(a, pos_ptr, scale=1.0):
    """The 2 predicates (p0, p1) of the tree search of |y| = a over the 3 positive boundaries P_0..P_2 at
    pos_ptr (bits 3), each times ``scale`` (a row's, broadcast to a; 1.0 folds away): the magnitude index
    s = 2 p0 + p1."""
    p0 = a > tl.load(pos_ptr + 1) * scale
    p1 = a > tl.where(p0, tl.load(pos_ptr + 2) * scale, tl.load(pos_ptr + 0) * scale)
    return p0, p1


@triton.jit
def _magnitude_tree4(a, pos_ptr, scale=1.0):
    """The 3 predicates (p0, p1, p2) of the tree search of |y| = a over the 7 positive boundaries
    P_0..P_6 at pos_ptr (bits 4), each times ``scale`` (as in ``_magnitude_tree3``): the magnitude index
    s = 4 p0 + 2 p1 + p2."""
    p0 = a > tl.load(pos_ptr + 3) * scale
    p1 = a > tl.where(p0, tl.load(pos_ptr + 5) * scale, tl.load(pos_ptr + 1) * scale)
    hi = tl.where(p1, tl.load(pos_ptr + 6) * scale, tl.load(pos_ptr + 4) * scale)
    lo = tl.where(p1, tl.load(pos_ptr + 2) * scale, tl.load(pos_ptr + 0) * scale)
    p2 = a > tl.where(p0, hi, lo)
    return p0, p1, p2


# The float32 2^23: w + 2^23 holds round(w) in its low mantissa bits for 0 <= w < 2^22.
GRID_MAGIC = tl.constexpr(8388608.0)
GRID_MAGIC_BITS = tl.constexpr(0x4B000000)


@triton.jit
def _grid_magnitude(y, grid_ptr, scale=1.0):
    """Magnitude index s int32 (shape of y) = number of positive boundaries P_k (times ``scale``, a row's)
    strictly below |y|, by one lookup in ``Plan.search_grid`` (int64 [G + 2]) and one comparison.

    w = |y| * (G / U) / scale puts |y| on a uniform grid of G cells (U above every P_k); cell round(w) holds
    at most one scaled boundary T (float32 bits, low word; +inf if none) and the count of those below the
    cell (high word): s = count + (w > T). round(w) is the low mantissa of w + 2^23 (two instructions on the
    FMA pipe, no conversion); an unsigned minimum sends w >= G, +inf and NaN to the last cell. The bits-4 tree
    it replaces is ~10 compares and selects an element on sm_90's ALU pipe (half the FMA pipe's rate), the
    quantize kernels' limit at 16-bit inputs; this is one compare, one select, one minimum there. w rounds
    once more than |y| > P_k * scale: codes may differ only for values within ~1e-7 relative of a boundary."""
    head = tl.load(grid_ptr)  # low word: G / U as float32 bits; high word: G + GRID_MAGIC_BITS
    # abs: a row's factor, never negative even for a negative scale (none reaches here; it would index below
    # the table): w >= 0 or NaN.
    w = tl.abs(y) * tl.abs(head.to(tl.int32).to(tl.float32, bitcast=True) / scale)
    bits = (w + GRID_MAGIC).to(tl.uint32, bitcast=True)
    last = (head >> 32).to(tl.uint32)
    cell = tl.load(grid_ptr + 1 - GRID_MAGIC_BITS + tl.minimum(bits, last).to(tl.int32))
    threshold = cell.to(tl.int32).to(tl.float32, bitcast=True)
    return (cell >> 32).to(tl.int32) + (w > threshold).to(tl.int32)


@triton.jit
def _code_search(y, bnd_ptr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, scale=1.0):
    """Code index int32 (shape of y) = number of boundaries strictly below y (float32), the boundaries times
    ``scale`` (a row's, broadcast to y; scale > 0: the codes of y / scale; 1.0 folds away).

    SYMMETRIC (bits <= 4, boundaries t_k = -t_{K-2-k} exactly, so the middle one is 0): a branch-free
    search over the K/2 - 1 positive boundaries P_i = t_{K/2+i} on |y| with scalar thresholds picked by
    selects (bits - 1 compares, 2^(bits-2) selects), then the sign folds in:
    index = K/2 + s for y > 0 and K/2 - 1 - s otherwise, i.e. s ^ (K/2 or K/2 - 1). Differs from the
    strict rule only for y exactly equal to a negative boundary. The first version counted all K/2 - 1
    boundaries: ~23 SASS instructions an element at bits 4 (sm_90 disassembly), this one ~12.
    With ``bnd_ptr`` an int64 table (``Plan.search_grid``, bits 4; the Gluon quantize), the magnitude index
    comes from ``_grid_magnitude`` instead of the tree.
    Otherwise (bits >= 5): binary search with BITS gathers from the boundary table (L1 hits)."""
    if SYMMETRIC and bnd_ptr.dtype.element_ty == tl.int64:
        HALF_G: tl.constexpr = 1 << (BITS - 1)
        idx = _grid_magnitude(y, bnd_ptr, scale) ^ tl.where(y > 0.0, HALF_G, HALF_G - 1)
    elif SYMMETRIC:
        if BITS == 1:
            idx = (y > 0.0).to(tl.int32)
        else:
            HALF: tl.constexpr = 1 << (BITS - 1)
            a = tl.abs(y)
            if BITS == 2:
                s = (a > tl.load(bnd_ptr + HALF) * scale).to(tl.int32)
            elif BITS == 3:
                p0, p1 = _magnitude_tree3(a, bnd_ptr + HALF, scale)
                s = (p0.to(tl.int32) << 1) | p1.to(tl.int32)
            else:
                p0, p1, p2 = _magnitude_tree4(a, bnd_ptr + HALF, scale)
                s = (p0.to(tl.int32) << 2) | (p1.to(tl.int32) << 1) | p2.to(tl.int32)
            idx = s ^ tl.where(y > 0.0, HALF, HALF - 1)
    else:
        # The first step is written out (index 0 or 2^(bits-1)) rather than starting from tl.zeros, which
        # needs a layout in the Gluon kernels that also call this.
        idx = tl.where(y > tl.load(bnd_ptr + (1 << (BITS - 1)) - 1) * scale, 1 << (BITS - 1), 0)
        for step in tl.static_range(1, BITS):
            cand = idx + (1 << (BITS - 1 - step))
            idx = tl.where(y > tl.load(bnd_ptr + cand - 1) * scale, cand, idx)
    return idx


@triton.jit
def _search_centroid(y, bnd_ptr, cent_ptr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, t_scale=1.0, c_scale=1.0):
    """Centroid float32 of the code of y float32 (any shape): _centroid(_code_search(y)) for the round trip,
    which never needs the code itself. With a row's t_scale and c_scale (broadcast to y; 1.0 folds away):
    the centroid of y / t_scale, times c_scale, with the scaling done on the few thresholds and centroids
    instead of on every element (the Gluon round trip's scaled search).

    SYMMETRIC: the predicates of _code_search's tree on |y| pick the positive centroid C_s = c_{K/2 + s}
    (s = 4 p0 + 2 p1 + p2 at bits 4) with 2^(bits-1) - 1 selects, and -C_s where y <= 0 (the code
    K/2 - 1 - s: y exactly 0 is below the middle boundary 0, as in the reference). This replaces the code
    arithmetic and the gather (tl.load of the table at the code), whose layout Triton converted to the
    tile's through shared memory: 38 STS + 38 LDS and 9 barriers a thread in the full bits 4 round trip
    (sm_90, float16, dim 128)."""
    if SYMMETRIC:
        HALF: tl.constexpr = 1 << (BITS - 1)
        pos = cent_ptr + HALF  # the positive centroids C_s
        if BITS == 1:
            mag = tl.load(pos) * c_scale
        else:
            a = tl.abs(y)
            if BITS == 2:
                mag = tl.where(a > tl.load(bnd_ptr + 2) * t_scale, tl.load(pos + 1) * c_scale, tl.load(pos) * c_scale)
            elif BITS == 3:
                p0, p1 = _magnitude_tree3(a, bnd_ptr + HALF, t_scale)
                lo = tl.where(p0, tl.load(pos + 2) * c_scale, tl.load(pos + 0) * c_scale)  # s = 2 p0
                hi = tl.where(p0, tl.load(pos + 3) * c_scale, tl.load(pos + 1) * c_scale)  # s = 2 p0 + 1
                mag = tl.where(p1, hi, lo)
            else:
                p0, p1, p2 = _magnitude_tree4(a, bnd_ptr + HALF, t_scale)
                # C_{4 p0 + 2 p1 + p2}: by p0 (4 selects), then p1 (2), then p2 (1)
                q0 = tl.where(p0, tl.load(pos + 4) * c_scale, tl.load(pos + 0) * c_scale)
                q1 = tl.where(p0, tl.load(pos + 5) * c_scale, tl.load(pos + 1) * c_scale)
                q2 = tl.where(p0, tl.load(pos + 6) * c_scale, tl.load(pos + 2) * c_scale)
                q3 = tl.where(p0, tl.load(pos + 7) * c_scale, tl.load(pos + 3) * c_scale)
                mag = tl.where(p2, tl.where(p1, q3, q1), tl.where(p1, q2, q0))
        value = tl.where(y > 0.0, mag, -mag)
    else:
        value = _centroid(_code_search(y, bnd_ptr, BITS, SYMMETRIC, t_scale), cent_ptr, BITS, SYMMETRIC) * c_scale
    return value


@triton.jit
def _centroid(codes, cent_ptr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Centroid values float32 of code indices int32 (any shape).

    SYMMETRIC and bits <= 2: selects among the positive centroids and a sign, with no memory access. A
    gather (tl.load of the table) is an anchor of Triton's layout assignment: the tile took the gather's
    layout and went through shared memory to the store's (full dequantize at bits 1-2: 528 SASS
    instructions a tile of 2048 with 11 barriers; with selects 384 and none). At bits 3-4 the select tree
    costs more than the conversion (7 + 8 selects an element at bits 4: 1128 instructions against 520),
    so those keep the gather, which hits L1 (the table is 32-64 bytes)."""
    if SYMMETRIC and BITS <= 2:
        HALF: tl.constexpr = 1 << (BITS - 1)
        upper = codes >= HALF
        if BITS == 1:
            mag = tl.zeros(codes.shape, tl.float32) + tl.load(cent_ptr + 1)
        else:  # magnitude index m = codes ^ (2 or 1): c_{2 + m} = -c_{1 - m}
            m = codes ^ tl.where(upper, HALF, HALF - 1)
            mag = tl.where((m & 1) != 0, tl.load(cent_ptr + 3), tl.load(cent_ptr + 2))
        value = tl.where(upper, mag, -mag)
    else:
        value = tl.load(cent_ptr + codes)
    return value


@triton.jit
def _word_pointer(codes_ptr, BITS: tl.constexpr):
    """codes_ptr (uint8) seen as a pointer to words of BITS bytes (one group of 8 codes)."""
    if BITS == 1:
        word_ptr = codes_ptr
    elif BITS == 2:
        word_ptr = codes_ptr.to(tl.pointer_type(tl.uint16))
    elif BITS == 4:
        word_ptr = codes_ptr.to(tl.pointer_type(tl.uint32))
    else:
        word_ptr = codes_ptr.to(tl.pointer_type(tl.uint64))
    return word_ptr


@triton.jit
def _pack_words(codes, BN: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr):
    """Codes int32 [BN, W] -> word [BN, W // 8] (uint32 for bits <= 4, else uint64): code j of group g in
    bits [j * BITS, (j + 1) * BITS) of word g (the layout of docs/FORMAT.md, LSB first)."""
    NG: tl.constexpr = W // 8
    shifts = tl.arange(0, 8) * BITS
    if BITS <= 4:
        c3 = tl.reshape(codes, [BN, NG, 8]).to(tl.uint32)
        word = tl.sum(c3 << shifts[None, None, :].to(tl.uint32), axis=2)  # disjoint bits: sum == or
    else:
        c3 = tl.reshape(codes, [BN, NG, 8]).to(tl.uint64)
        word = tl.sum(c3 << shifts[None, None, :].to(tl.uint64), axis=2)
    return word


@triton.jit
def _code_words(y, bnd_ptr, valid, BN: tl.constexpr, W: tl.constexpr):
    """Packed 2-bit codes word uint32 [BN, W // 8] (_pack_words's layout) of y float32 [BN, W], for a
    symmetric codebook (boundaries -t, 0, t), built from the two comparisons without a code per element.

    The code is 2 + s for y > 0 and 1 - s otherwise, s = (|y| > t): bit 1 is y > 0 and bit 0 is s for
    the upper half and not s for the lower. Each comparison selects its bit of the group's word (a constant
    per register) and the lower half's bit 0 is flipped once for the whole word: ``spread`` has a 1 at
    bit 0 of each code whose bit 1 is 0. ``valid`` bool [1, W] (or None when every column is coded) keeps
    padding codes at 0, which the flip would otherwise make 1. As in _code_search, y exactly equal to
    the negative boundary -t takes code 1 where the reference's strict count gives 0.
    Measured in the sm_90 compile (float16, dim 128): full quantize 20.8 -> 18.8 SASS instructions an
    element, identity (bfloat16) 16.5 -> 14.5. The same construction at bits 3-4 took more: 24.8-30.2
    against 25.2-27.0, as the extra predicates held at once spill to registers (P2R/ISETP)."""
    NG: tl.constexpr = W // 8
    y3 = tl.reshape(y, [BN, NG, 8])
    one = (tl.zeros([8], tl.uint32) + 1) << (tl.arange(0, 8) * 2).to(tl.uint32)
    bit = one[None, None, :]  # bit 0 of code j of the group
    e = tl.where(tl.abs(y3) > tl.load(bnd_ptr + 2), bit, 0) + tl.where(y3 > 0.0, bit << 1, 0)
    word = tl.sum(e, axis=2)  # disjoint bits: sum == or
    spread = ((word ^ 0xFFFFFFFF) >> 1) & 0x5555  # ~word: the interpreter's ~ on uint32 overflows
    if valid is not None:
        spread = spread & _pack_words(tl.where(valid, 1, 0) + tl.zeros([BN, W], tl.int32), BN, W, 2)
    return word ^ spread


@triton.jit
def _store_words(
    word,
    codes_ptr,
    rows,
    row_ok,
    stride_cr,
    stride_cc,
    BN: tl.constexpr,
    W: tl.constexpr,
    CODE_BYTES,
    BITS: tl.constexpr,
    WORD: tl.constexpr,
):
    """Store the packed groups word [BN, W // 8] (_pack_words): group g -> bytes [g * BITS, (g + 1) * BITS)
    of the row (docs/FORMAT.md); as whole words when WORD (see word_access), else byte by byte."""
    NG: tl.constexpr = W // 8
    g = tl.arange(0, NG)
    if WORD and BITS == 3:
        # bits 3: 4 groups of 8 codes (4 x 24 bits) are 12 bytes = 3 aligned 32-bit words. The three byte
        # stores each went through a shared-memory layout conversion of the tile's bytes, with single-byte
        # stores and their masks (identity bits 3 ran slower than bits 4: 181 against 156 us, H100).
        NQ: tl.constexpr = NG // 4
        q4 = tl.reshape(word, [BN, NQ, 2, 2])  # group 4 q + 2 a + c at [q, a, c]
        ga, gb = tl.split(q4)  # c = 0: groups 4q, 4q + 2; c = 1: groups 4q + 1, 4q + 3
        g0, g2 = tl.split(ga)
        g1, g3 = tl.split(gb)
        w0 = g0 | (g1 << 24)
        w1 = (g1 >> 8) | (g2 << 16)
        w2 = (g2 >> 16) | (g3 << 8)
        out = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, tl.zeros_like(w0))), [BN, NQ, 4])
        k = tl.arange(0, 4)
        qi = tl.arange(0, NQ)
        widx = qi[:, None] * 3 + k[None, :]  # [NQ, 4]: word 3 q + k of the row (k = 3 is padding)
        ok = row_ok[:, None, None] & ((k[None, :] < 3) & (widx < CODE_BYTES // 4))[None, :, :]
        word_ptr = codes_ptr.to(tl.pointer_type(tl.uint32))
        offs = rows.to(tl.int64)[:, None, None] * (stride_cr // 4) + widx[None, :, :]
        tl.store(word_ptr + offs, out, mask=ok)
    elif WORD:
        # bits 1, 2, 4, 8 with whole groups: one 1/2/4/8-byte store per group instead of BITS byte stores
        # (the byte planes each went through a shared-memory layout conversion: ~10% of the SASS).
        word_ptr = _word_pointer(codes_ptr, BITS)
        offs = rows.to(tl.int64)[:, None] * (stride_cr // BITS) + g[None, :]
        ok = row_ok[:, None] & (g * BITS < CODE_BYTES)[None, :]
        tl.store(word_ptr + offs, word.to(word_ptr.dtype.element_ty), mask=ok)
    else:
        row_off = rows.to(tl.int64)[:, None] * stride_cr
        for j in tl.static_range(BITS):
            byte_idx = g * BITS + j
            ok = row_ok[:, None] & (byte_idx < CODE_BYTES)[None, :]
            byte = ((word >> (8 * j)) & 0xFF).to(tl.uint8)
            tl.store(codes_ptr + row_off + byte_idx[None, :] * stride_cc, byte, mask=ok)


@triton.jit
def _load_words(
    codes_ptr,
    rows,
    row_ok,
    stride_cr,
    stride_cc,
    BN: tl.constexpr,
    W: tl.constexpr,
    CODE_BYTES,
    BITS: tl.constexpr,
    WORD: tl.constexpr,
):
    """The packed groups of _store_words: word [BN, W // 8] (uint32 for bits <= 4, else uint64) holds the
    8 codes of a group, code j in bits [j * BITS, (j + 1) * BITS) (zero beyond the row's bytes)."""
    NG: tl.constexpr = W // 8
    g = tl.arange(0, NG)
    if WORD and BITS == 3:  # 3 aligned 32-bit words = 4 groups of 8 codes (see _store_words)
        NQ: tl.constexpr = NG // 4
        k = tl.arange(0, 4)
        qi = tl.arange(0, NQ)
        widx = qi[:, None] * 3 + k[None, :]
        ok = row_ok[:, None, None] & ((k[None, :] < 3) & (widx < CODE_BYTES // 4))[None, :, :]
        word_ptr = codes_ptr.to(tl.pointer_type(tl.uint32))
        offs = rows.to(tl.int64)[:, None, None] * (stride_cr // 4) + widx[None, :, :]
        w = tl.load(word_ptr + offs, mask=ok, other=0).to(tl.uint32)
        wa, wb = tl.split(tl.reshape(w, [BN, NQ, 2, 2]))  # k = 2 a + c: wa = (w0, w2), wb = (w1, pad)
        w0, w2 = tl.split(wa)
        w1, _ = tl.split(wb)
        m24 = 0xFFFFFF
        g0 = w0 & m24
        g1 = ((w0 >> 24) | (w1 << 8)) & m24
        g2 = ((w1 >> 16) | (w2 << 16)) & m24
        g3 = w2 >> 8
        word = tl.reshape(tl.join(tl.join(g0, g2), tl.join(g1, g3)), [BN, NG])
    elif WORD:
        word_ptr = _word_pointer(codes_ptr, BITS)
        offs = rows.to(tl.int64)[:, None] * (stride_cr // BITS) + g[None, :]
        ok = row_ok[:, None] & (g * BITS < CODE_BYTES)[None, :]
        word = tl.load(word_ptr + offs, mask=ok, other=0)
        if BITS <= 4:
            word = word.to(tl.uint32)
    else:
        row_off = rows.to(tl.int64)[:, None] * stride_cr
        if BITS <= 4:
            word = tl.zeros([BN, NG], tl.uint32)
        else:
            word = tl.zeros([BN, NG], tl.uint64)
        for j in tl.static_range(BITS):
            byte_idx = g * BITS + j
            ok = row_ok[:, None] & (byte_idx < CODE_BYTES)[None, :]
            byte = tl.load(codes_ptr + row_off + byte_idx[None, :] * stride_cc, mask=ok, other=0)
            word = word | (byte.to(word.dtype) << (8 * j))
    return word


@triton.jit
def _unpack_words(word, BN: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [BN, W] of the groups word [BN, W // 8] (_load_words)."""
    shifts = tl.arange(0, 8) * BITS
    codes = (word[:, :, None] >> shifts[None, None, :].to(word.dtype)) & ((1 << BITS) - 1)
    return tl.reshape(codes.to(tl.int32), [BN, W])


@triton.jit
def _word_centroids(word, cent_ptr, BN: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr):
    """Centroids float32 [BN, W] of the codes in word uint32 [BN, W // 8] (_load_words), for symmetric
    codebooks (c_{K/2-1-s} = -c_{K/2+s}) of bits 1-2, without a code index or a gather.

    Code j of a group sits at bit 2 j (bits 2) or j. Its top bit says the half: 1 for the positive
    centroids c_{K/2+s}; the complement of that bit, moved to bit 31, is the float's sign. At bits 2 the
    lower half's magnitude bit is the complement of the code's low bit (code 1 - s), so the whole group
    is flipped at once: ``spread`` has a 1 at the low bit of every negative code. Then each element's
    bit test on a constant mask picks the magnitude with a select.
    Why: the unpack-then-select path spent ~8 SASS instructions an element at bits 2 (shift, mask,
    compare, xor, select, negate, select): full dequantize 18.2 -> 16.2 instructions an element (float16,
    dim 128, sm_90). At bits 3 the same construction counted 24.5 against the gather's 17.0, so bits 3-4
    keep the gather (_centroid)."""
    shifts = (tl.arange(0, 8) * BITS).to(tl.uint32)[None, None, :]
    w = word.to(tl.uint32)
    flipped = w ^ 0xFFFFFFFF  # ~w (the interpreter's ~ on uint32 overflows)
    sign = (flipped[:, :, None] << (32 - BITS - shifts)) & 0x80000000
    if BITS == 1:
        mag = tl.zeros([BN, W // 8, 8], tl.uint32) + tl.load(cent_ptr + 1).to(tl.uint32, bitcast=True)
    else:
        spread = (flipped >> 1) & 0x5555  # the low bit of each of the 8 codes whose top bit is 0
        low = ((w ^ spread)[:, :, None] & (1 << shifts)) != 0
        mag = tl.where(low, tl.load(cent_ptr + 3), tl.load(cent_ptr + 2)).to(tl.uint32, bitcast=True)
    return tl.reshape((mag | sign).to(tl.float32, bitcast=True), [BN, W])
