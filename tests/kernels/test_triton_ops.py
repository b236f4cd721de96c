"""Triton kernels against the torch reference (``kernels.reference``), Liger-style: odd shapes, every
variant, every bits value 1..8, every input dtype.

Markers: ``interpreter`` tests run on the CPU under TRITON_INTERPRET=1 (tests/conftest.py) on
small shapes; ``gpu`` tests run the same checks on CUDA with larger shapes (``pytest -m gpu``).

What "equal" means:
- codes: identical, except values within 1e-6 relative of a codebook boundary, which may fall either way.
  The kernels compute x * (1 / rho) and sum the rotation in their own order, so a rotated value can differ
  from the reference's by a few ulps; a differing code must sit within 1e-6 * max(|t|, 1/sqrt(n_coded)) of
  a boundary t (the floor covers the boundary at 0), and at most max(1, 1e-4 * codes) may differ. The
  counts are reported at the end of the session.
- reconstructions (float32): per row ||a - b|| <= 1e-5 ||b||; float16/bfloat16 outputs within one unit
  in the last place of the output dtype (the CPU interpreter truncates to bfloat16 instead of rounding).
- squared error: |e - e_ref| <= 1e-5 ||x||^2 (a small difference of large numbers; see reconstructions).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import VARIANTS, Quantizer, reference
from kernels.packing import unpack_codes
from kernels.rotations import rotate
from tests.conftest import INTERPRETED

kt = pytest.importorskip("kernels.triton")

CODE_DIFF_STATS: list[tuple[str, int, int]] = []  # (case, differing codes, codes), summed by conftest
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HALF_ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="kernels are compiled for CUDA, not interpreted")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rotated(x: torch.Tensor, plan) -> torch.Tensor:
    """The reference's rotated coordinates float32 [N, n_coded] (the values the codebook search sees)."""
    x = x.float()
    norms = torch.linalg.vector_norm(x, dim=-1)
    direction = x / norms.clamp_min(reference.EPS).unsqueeze(-1)
    direction = torch.nn.functional.pad(direction, (0, plan.n_coded - plan.dim))
    return rotate(direction, plan.params, plan.variant)


def _near_boundary(y: torch.Tensor, plan) -> torch.Tensor:
    """bool, shape of y: values within 1e-6 * max(|t|, 1/sqrt(n_coded)) of a codebook boundary t, where the
    kernels and the reference may pick either neighbouring code."""
    bounds = plan.boundaries.to(y.device).contiguous()
    above = torch.searchsorted(bounds, y.contiguous()).clamp(1, len(bounds) - 1)  # nearest: above or above - 1
    near = torch.zeros_like(y, dtype=torch.bool)
    for t in (bounds[above - 1], bounds[above]):
        near |= (y - t).abs() <= 1e-6 * torch.clamp(t.abs(), min=1.0 / math.sqrt(plan.n_coded))
    return near


def _rows_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = (a.double() - b.double()).norm(dim=-1)
    scale = b.double().norm(dim=-1)
    bad = err > rel * scale + 1e-30
    assert not bool(bad.any()), f"rows {bad.nonzero().flatten()[:8].tolist()}: rel err {(err / scale).max():.3g}"


def _close_in_dtype(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        _rows_close(a, b)
        return
    a, b = a.float(), b.float()
    tol = HALF_ULP[dtype] * b.abs() + 1e-6 * b.abs().amax(dim=-1, keepdim=True)
    bad = (a - b).abs() > tol
    assert not bool(bad.any()), f"{int(bad.sum())} elements beyond one ulp of {dtype}"


def check_ops(
    variant: str, dim: int, bits: int, dtype: torch.dtype, n: int, device: str, seed: int = 0, strided: bool = False
) -> None:
    """Quantize, dequantize (all three output dtypes) and round trip of n random rows vs the reference."""
    q = Quantizer(variant, dim, bits, seed=seed + 7, device=device, backend="torch")
    plan = q.plan
    gen = torch.Generator().manual_seed(1000 * dim + 10 * bits + seed)
    base = torch.randn(n, dim + 3 if strided else dim, generator=gen) * 3.0
    base[0] = 0.0 if n > 2 else base[0]  # a zero vector: norm 0, reconstruction exactly 0
    x = base.to(dtype).to(device)
    if strided:
        x = x[:, 1 : dim + 1]  # row stride dim + 3, offset start: no copy is made by the launcher
    case = f"{variant} d={dim} b={bits} {str(dtype)[6:]} n={n}{' strided' if strided else ''}"

    codes, norms = kt.quantize(x, plan)
    ref_codes, ref_norms = reference.quantize(x, plan)
    assert codes.shape == ref_codes.shape and codes.dtype == torch.uint8
    torch.testing.assert_close(norms, ref_norms, rtol=1e-6, atol=0)

    idx = unpack_codes(codes, bits, plan.n_coded).long()
    ref_idx = unpack_codes(ref_codes, bits, plan.n_coded).long()
    differ = idx != ref_idx
    near = _near_boundary(_rotated(x, plan), plan)  # [n, n_coded]: where either code is allowed
    n_diff = int(differ.sum())
    CODE_DIFF_STATS.append((case, n_diff, idx.numel()))
    if n_diff:
        assert bool(near[differ].all()), f"{case}: a code differs off a boundary"
        assert n_diff <= max(1, 1e-4 * idx.numel()), f"{case}: {n_diff} of {idx.numel()} codes differ"
    # Packing: the bytes are exactly the reference packing of the kernel's own indices.
    assert torch.equal(codes.cpu(), reference.pack_codes(idx.to(torch.uint8).cpu(), bits))

    for out_dtype in DTYPES.values():
        got = kt.dequantize(ref_codes, ref_norms, plan, out_dtype)
        want = reference.dequantize(ref_codes, ref_norms, plan, out_dtype)
        assert got.dtype == out_dtype and got.shape == (n, dim)
        _close_in_dtype(got.cpu(), want.cpu(), out_dtype)

    x_hat, sq_err = kt.roundtrip(x, plan)
    ref_hat, ref_err = reference.roundtrip(x, plan)
    # Rows whose codes match (a flipped code changes that row's reconstruction), less rows with a rotated
    # value within the boundary tolerance: the round-trip kernel searches its own rotated values, and where
    # its tile differs from quantize's (its norm sums in another order) such a code may fall the other way.
    same = ~differ.any(dim=1) & ~near.any(dim=1)
    assert int(same.sum()) >= n // 2, f"{case}: {n - int(same.sum())} rows sit on a boundary"  # not vacuous
    _rows_close(x_hat[same].cpu(), ref_hat[same].cpu())
    scale = x.float().square().sum(-1)
    assert bool(((sq_err - ref_err).abs()[same] <= 1e-5 * scale[same] + 1e-30).all())
    if n > 2:
        assert float(x_hat[0].abs().max()) == 0.0 and float(sq_err[0]) == 0.0

    # Round trip into a 16-bit output (the input's dtype, or float16 for float32 input): the error of the
    # float32 reconstruction (as close to the reference's as the float32 round trip's: the dense/hadamard
    # kernel compiled for a 16-bit output sums in another order, ~2e-7 relative on the GPU) and the
    # reference's reconstruction cast to that dtype.
    low = dtype if dtype != torch.float32 else torch.float16
    low_hat, low_err = kt.roundtrip(x, plan, low)
    assert low_hat.dtype == low and low_hat.shape == (n, dim)
    _close_in_dtype(low_hat[same].cpu(), reference.roundtrip(x, plan, low)[0][same].cpu(), low)
    assert bool(((low_err - ref_err).abs()[same] <= 1e-5 * scale[same] + 1e-30).all())


# Every variant x every bits value, with odd dims (padding in every variant) and the three input dtypes
# cycled so that each dtype meets every variant; 6 x 8 = 48 cases, ~0.3 s each on the interpreter.
_ODD_DIMS = (5, 13, 3, 7, 30, 2, 9, 21)
INTERPRETER_CASES = [
    (variant, _ODD_DIMS[(i + b) % len(_ODD_DIMS)], b, list(DTYPES)[(i + b) % 3])
    for i, variant in enumerate(VARIANTS)
    for b in range(1, 9)
]


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("variant,dim,bits,dtype", INTERPRETER_CASES)
def test_ops_match_reference_interpreter(variant, dim, bits, dtype):
    check_ops(variant, dim, bits, DTYPES[dtype], n=19, device="cpu")


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("variant", VARIANTS)
def test_strided_rows_interpreter(variant):
    check_ops(variant, 11, 4, torch.float32, n=7, device="cpu", strided=True)


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("variant,dim", [("full", 64), ("2d", 96), ("identity", 160), ("fast", 96)])
def test_bits3_word_path_interpreter(variant, dim):
    """bits 3 with code_bytes a multiple of 12 (3 aligned 32-bit words per 32 codes); dim 96 leaves
    padding quads in the tile (W = 128), 160 a tile of 256 columns with 3 padding quads."""
    check_ops(variant, dim, 3, torch.float16, n=21, device="cpu", seed=5)
    check_ops(variant, dim, 3, torch.float32, n=9, device="cpu", seed=6, strided=True)
    # Codes that are not 4-byte aligned (a view at an odd offset) take the byte path.
    plan = Quantizer(variant, dim, 3, seed=1, backend="torch").plan
    codes, norms = reference.quantize(torch.randn(9, dim), plan)
    buf = torch.zeros(9, plan.code_bytes + 1, dtype=torch.uint8)
    buf[:, 1:] = codes
    odd = buf[:, 1:]
    _rows_close(kt.dequantize(odd, norms, plan, torch.float32), reference.dequantize(codes, norms, plan, torch.float32))


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("variant", ["full", "2d", "identity", "dense"])
def test_wider_tile_interpreter(variant):
    """A dim that spans several groups of 8 and several dot tiles (dense: 2 output tiles of 64)."""
    check_ops(variant, 77, 3, torch.float16, n=40, device="cpu", seed=3)


# Walsh-Hadamard blocks of 64 columns and more (several butterfly stages across threads), hadamard padded
# (100 -> 128) and kronecker with three blocks of 64 (the mix across blocks in the fused kernel).
@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize(
    "variant,dim,bits,dtype",
    [("hadamard", 64, 3, "float16"), ("hadamard", 100, 2, "float32"), ("kronecker", 192, 4, "bfloat16")],
)
def test_walsh_hadamard_blocks_interpreter(variant, dim, bits, dtype):
    check_ops(variant, dim, bits, DTYPES[dtype], n=18, device="cpu", seed=5)


# full/fast rows wider than CHUNK_COLUMNS (128) go through the kernels in chunks of 128 columns: a last
# chunk of mostly padding (130 -> n_coded 132), three chunks with a partial last one (300, odd code_bytes
# 113: byte path), the bits 3 word path across chunks (384: 144 bytes, 48 a chunk), bits 5 (binary search,
# byte path), bits 1 and 8, and a strided view.
CHUNKED_CASES = [
    ("full", 130, 4, "float16"),
    ("fast", 300, 3, "bfloat16"),
    ("full", 384, 3, "float16"),
    ("fast", 257, 2, "float32"),
    ("full", 512, 5, "float16"),
    ("full", 200, 1, "bfloat16"),
    ("fast", 129, 8, "float32"),
]


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("variant,dim,bits,dtype", CHUNKED_CASES)
def test_chunked_rows_interpreter(variant, dim, bits, dtype, monkeypatch):
    from kernels.triton import _launch
    from kernels.triton._launch import CHUNK_COLUMNS, fused_tile

    # Every op's kernel has the chunk loop; the tests run all three chunked whatever CHUNKED_OPS picks.
    monkeypatch.setattr(_launch, "CHUNKED_OPS", ("quantize", "dequantize", "roundtrip"))
    plan = Quantizer(variant, dim, bits, backend="torch").plan
    assert all(fused_tile(plan, 21, op)[0] == CHUNK_COLUMNS for op in ("quantize", "dequantize", "roundtrip"))
    check_ops(variant, dim, bits, DTYPES[dtype], n=21, device="cpu", seed=dim)
    if bits in (3, 4):
        check_ops(variant, dim, bits, torch.float32, n=5, device="cpu", seed=dim + 1, strided=True)


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("variant,dim", [("identity", 24), ("full", 24), ("2d", 24), ("fast", 260)])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_exact_zero_coordinates_interpreter(variant, dim, bits):
    """Rotated coordinates exactly 0 (zero blocks of 4 in nonzero rows) sit on the middle boundary 0 and take
    the code below it (the negative centroid) in the round trip's select-based centroid as in the reference."""
    plan = Quantizer(variant, dim, bits, seed=4, backend="torch").plan
    x = torch.randn(6, dim, generator=torch.Generator().manual_seed(bits))
    x[:, :8] = 0.0  # two zero blocks (full/fast), four zero pairs (2d), eight zero coordinates (identity)
    x[1::2, 12:16] = 0.0
    x_hat, err = kt.roundtrip(x, plan)
    ref_hat, ref_err = reference.roundtrip(x, plan)
    assert torch.equal(kt.quantize(x, plan)[0], reference.quantize(x, plan)[0])
    _rows_close(x_hat, ref_hat)
    torch.testing.assert_close(err, ref_err, rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
@needs_interpreter
def test_quantizer_backend_triton_leading_shape_interpreter(monkeypatch):
    # Quantizer refuses backend="triton" on the CPU; let it through to run the interpreted kernels.
    monkeypatch.setattr(Quantizer, "_resolve_backend", lambda self, backend: backend)
    q = Quantizer("fast", 10, 3, seed=2, backend="triton")
    ref = Quantizer("fast", 10, 3, seed=2, backend="torch")
    assert q.backend == "triton"
    x = torch.randn(2, 3, 10)
    packed, want = q.quantize(x), ref.quantize(x)
    assert packed.codes.shape == (2, 3, q.code_bytes) and packed.norms.shape == (2, 3)
    assert torch.equal(packed.codes, want.codes)
    _rows_close(q.dequantize(packed).reshape(-1, 10), ref.dequantize(want).reshape(-1, 10))
    x_hat, err = q.roundtrip(x)
    assert x_hat.shape == (2, 3, 10) and err.shape == (2, 3)


@pytest.mark.interpreter
@needs_interpreter
def test_empty_batch_and_bad_inputs_interpreter():
    plan = Quantizer("full", 8, 2, backend="torch").plan
    codes, norms = kt.quantize(torch.empty(0, 8), plan)
    assert codes.shape == (0, plan.code_bytes) and norms.shape == (0,)
    assert kt.dequantize(codes, norms, plan, torch.float16).shape == (0, 8)
    assert kt.roundtrip(torch.empty(0, 8), plan)[0].shape == (0, 8)
    with pytest.raises(TypeError):
        kt.quantize(torch.zeros(3, 8, dtype=torch.float64), plan)
    with pytest.raises(ValueError):
        kt.quantize(torch.zeros(3, 9), plan)
    with pytest.raises(ValueError):
        kt.dequantize(torch.zeros(3, plan.code_bytes + 1, dtype=torch.uint8), torch.zeros(3), plan, torch.float32)
    with pytest.raises(TypeError):
        kt.dequantize(torch.zeros(3, plan.code_bytes, dtype=torch.uint8), torch.zeros(3), plan, torch.int32)
    with pytest.raises(TypeError):
        kt.roundtrip(torch.zeros(3, 8), plan, torch.float64)


@pytest.mark.interpreter
def test_import_kernels_without_triton():
    """``import kernels`` works where triton is missing, and ``kernels.triton`` raises ImportError."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes "import triton" raise ImportError
        import kernels
        q = kernels.Quantizer("full", 16, 2)
        assert q.backend == "torch"
        try:
            import kernels.triton
        except ImportError:
            print("ok")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("variant,dim", [("identity", 2048), ("2d", 1100)])
def test_rows_wider_than_the_tile_interpreter(variant, dim):
    """A row of 2048 or more padded columns is wider than the smallest tile: one row a program (the tile
    rows once halved to 0 and the launch divided by zero)."""
    check_ops(variant, dim, 2, torch.float32, n=3, device="cpu", seed=dim)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "variant,dim",
    [("full", 64), ("full", 128), ("fast", 256), ("full", 512), ("2d", 1024), ("identity", 13), ("identity", 2048),
     ("hadamard", 256)],  # fmt: skip
)
def test_launch_batches_reach_every_tile(variant, dim):
    """Quantizer.warm_batches (kernels.triton.launch_batches) names batch sizes that reach each launch
    configuration any batch of 1..max_rows gets, for every op, starting at 1 and ascending..."""
    from kernels.triton._launch import FUSED_TILES, fused_tile, launch_batches

    plan = Quantizer(variant, dim, 3, backend="torch").plan
    max_rows = 65536
    sizes = launch_batches(plan, max_rows)
    assert sizes[0] == 1 and sizes == sorted(set(sizes)) and sizes[-1] <= max_rows
    for op in FUSED_TILES:
        every = {fused_tile(plan, n, op) for n in range(1, max_rows + 1, 5)} | {fused_tile(plan, max_rows, op)}
        assert every <= {fused_tile(plan, n, op) for n in sizes}, op

    # ... for N a multiple of 16 and not (Triton specializes N on it), and N == 1 besides.
    def kind(n):
        return "one" if n == 1 else n % 16 == 0

    for op in FUSED_TILES:
        configs = {(fused_tile(plan, n, op), kind(n)) for n in sizes}
        wanted = {(c, k) for c, _ in configs for k in (False, True)} | {(fused_tile(plan, 1, op), "one")}
        assert configs == wanted, op

    def klass(n):
        return tuple(fused_tile(plan, n, op) for op in FUSED_TILES), kind(n)

    for n in sizes:  # each size is the first of its class: none of the 16 sizes before it shares it
        assert all(klass(m) != klass(n) for m in range(max(1, n - 16), n)), n
    assert launch_batches(Quantizer("dense", dim, 3, backend="torch").plan, max_rows) == [1, 2, 16]
    assert Quantizer(variant, dim, 3, backend="torch").warm_batches(max_rows) == [1]  # nothing to compile


# ---------------------------------------------------------------------------------------------------
# GPU: the same checks with larger N and the benchmark's dims.

# Five cases a variant (each compiles 6 kernels): the benchmark's shapes plus odd dims and bits 5..8.
GPU_CASES = [
    (variant, dim, bits, dtype)
    for i, variant in enumerate(VARIANTS)
    for dim, bits, dtype in [
        (128, 4, "float16"),
        (256, 1 + i % 3, "bfloat16"),
        (37, 5 + i % 4, "float32"),
        (130, 3 + (i % 2) * 5, "bfloat16"),
        (96, 3, "float16"),  # bits 3 word path with padding quads (code_bytes 36)
    ]
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant,dim,bits,dtype", GPU_CASES)
def test_ops_match_reference_gpu(variant, dim, bits, dtype):
    check_ops(variant, dim, bits, DTYPES[dtype], n=4099, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_strided_rows_gpu(variant):
    check_ops(variant, 128, 4, torch.float16, n=1000, device="cuda", strided=True)


@pytest.mark.gpu
@needs_cuda
def test_auto_backend_on_cuda_is_triton():
    q = Quantizer("full", 128, 4, device="cuda")
    assert q.backend == "triton"
    x = torch.randn(3, 5, 128, device="cuda", dtype=torch.float16)
    ref = Quantizer("full", 128, 4, device="cuda", backend="torch")
    packed = q.quantize(x)
    assert packed.codes.shape == (3, 5, q.code_bytes)
    _rows_close(q.dequantize(packed).reshape(-1, 128).cpu(), ref.dequantize(packed).reshape(-1, 128).cpu())
