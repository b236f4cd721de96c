"""The uniform-grid code search of the Gluon quantize at bits 4 (``Plan.search_grid``, ``_jit._grid_magnitude``):
the table's exact bits, its invariants for every codebook the service can build, and the search itself against
the select tree it replaces, on the CPU under TRITON_INTERPRET=1 (the Gluon kernels that call it run on the GPU
only: tests/kernels/test_gluon.py and test_triton_ops.py check their codes there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import Quantizer
from kernels.codebook import lloyd_max
from kernels.plan import search_grid
from tests.conftest import INTERPRETED

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
_code_search = pytest.importorskip("kernels.triton._jit")._code_search
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="kernels are compiled for CUDA, not interpreted")


def test_search_grid_docstring_example():
    """The worked example of ``search_grid``'s docstring, entry by entry: boundaries +-0.5, +-1.5 (bits 3 shape)
    give G = 4 cells, G / U = 2, so T = 1.0 in cell 1 and 3.0 in cell 3; the counts below each cell 0, 0, 1,
    1, 2."""
    table = search_grid(np.array([-1.5, -0.5, 0.0, 0.5, 1.5]))
    assert table.dtype == np.int64
    low = (table & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    high = table >> 32
    assert low[0] == 2.0 and high[0] == 0x4B000000 + 4
    assert list(low[1:]) == [np.inf, 1.0, np.inf, 3.0, np.inf]
    assert list(high[1:]) == [0, 0, 1, 1, 2]
    assert [hex(int(v)) for v in table] == [
        "0x4b00000440000000", "0x7f800000", "0x3f800000", "0x17f800000", "0x140400000", "0x27f800000",
    ]  # fmt: skip


@pytest.mark.parametrize("n", [2, 3, 8, 64, 100, 128, 384, 1024, 4096])
def test_search_grid_holds_at_most_one_boundary_a_cell(n):
    """For the bits-4 codebook of every sampled dimension: G a power of two, every positive boundary in exactly
    one cell's threshold, within a cell's width of its center, and the counts consistent (each cell's count is
    the number of thresholds in the cells before it)."""
    boundaries = lloyd_max(n, 4).boundaries
    table = search_grid(boundaries)
    cells = int(table[0] >> 32) - 0x4B000000
    assert cells >= 4 and cells & (cells - 1) == 0 and len(table) == cells + 2
    scale = np.array([table[0] & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0]
    thresholds = (table[1:] & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    counts = table[1:] >> 32
    finite = np.isfinite(thresholds)
    positive = boundaries[len(boundaries) // 2 + 1 :]
    assert finite.sum() == len(positive)
    np.testing.assert_allclose(thresholds[finite], positive * scale, rtol=1e-6)
    assert np.all(np.abs(thresholds[finite] - np.nonzero(finite)[0]) <= 0.501)
    assert list(counts) == list(np.concatenate([[0], np.cumsum(finite)[:-1]]))
    assert counts[-1] == len(positive) and not finite[-1]  # saturated values: every boundary below


def test_only_bits_4_symmetric_plans_have_a_grid():
    assert Quantizer("full", 128, 4, backend="torch").plan.search_grid is not None
    for variant, bits in (("full", 3), ("identity", 2), ("2d", 5), ("hadamard", 8)):
        plan = Quantizer(variant, 128, bits, backend="torch").plan
        assert plan.search_grid is None and plan.search_table is plan.boundaries, (variant, bits)


@triton.jit
def _search_kernel(y_ptr, scale_ptr, table_ptr, out_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    y = tl.load(y_ptr + i, mask=ok, other=0.0)
    scale = tl.load(scale_ptr + i, mask=ok, other=1.0)
    tl.store(out_ptr + i, _code_search(y, table_ptr, 4, True, scale), mask=ok)


def _search(y: torch.Tensor, scale: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    out = torch.empty(y.shape, dtype=torch.int32)
    _search_kernel[(triton.cdiv(y.numel(), 256),)](y, scale, table, out, y.numel(), BLOCK=256)
    return out


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("n", [8, 128, 1000])
def test_grid_search_matches_the_select_tree(n):
    """``_code_search`` with the grid table against the same function with the boundaries (the select tree):
    random values over the whole codebook at several row scales, every boundary exactly and one ulp either side,
    zeros, huge and tiny values, infinities and NaN (whose codes are unspecified but must not read outside the
    table: the index is clamped). Codes may differ only within 1e-6 relative of a boundary."""
    plan = Quantizer("full", n, 4, backend="torch").plan
    bnd = plan.boundaries
    gen = torch.Generator().manual_seed(n)
    scale = torch.tensor([0.37, 1.0, 3.1e-5, 2.5e4]).repeat_interleave(1024)
    y = torch.randn(scale.numel(), generator=gen) * scale * float(bnd[-1]) * 0.6
    edges = torch.cat([bnd, torch.nextafter(bnd, torch.tensor(np.inf)), torch.nextafter(bnd, torch.tensor(-np.inf))])
    specials = torch.tensor([0.0, -0.0, 1e30, -1e30, 1e-30, -1e-30, np.inf, -np.inf, np.nan])
    y = torch.cat([y, edges * 0.37, specials])
    scale = torch.cat([scale, torch.full((edges.numel(),), 0.37), torch.ones(specials.numel())])
    tree = _search(y, scale, bnd)
    grid = _search(y, scale, plan.search_grid)
    assert grid.min() >= 0 and grid.max() <= 15
    # A bad row's scale (NaN, inf, 0, and a negative one, which the kernels never pass): codes stay in range.
    for bad in (np.nan, np.inf, 0.0, -0.37):
        odd = _search(y[:512], torch.full((512,), bad), plan.search_grid)
        assert odd.min() >= 0 and odd.max() <= 15, bad
    finite = torch.isfinite(y)
    differ = (tree != grid) & finite
    near = ((y[:, None] / scale[:, None] - bnd[None, :]).abs() <= 1e-6 * bnd.abs().clamp_min(1e-30)).any(1)
    assert not (differ & ~near).any(), (y[differ & ~near], tree[differ & ~near], grid[differ & ~near])
    assert differ.sum() <= 2 * bnd.numel()
    assert torch.equal(tree[~finite & ~y.isnan()], grid[~finite & ~y.isnan()])  # +-inf: the outermost codes
