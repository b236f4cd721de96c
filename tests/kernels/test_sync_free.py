"""The public ops without an extra pass over the input, and without a host sync when asked (check=False), so
that they can be captured in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kernels import Packed, Quantizer, QuantizerError


class _CountNorms(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.linalg.vector_norm:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_valid_input_is_read_once_for_its_norms():
    q = Quantizer("full", 64, 3, backend="torch")
    x = torch.randn(100, 64)
    with _CountNorms() as counter:
        q.quantize(x)
    assert counter.calls == 1  # the op's own norms; the check reads them, not the input
    with _CountNorms() as counter:
        q.roundtrip(x)
    assert counter.calls == 1


@pytest.mark.parametrize("op", ["quantize", "roundtrip"])
def test_bad_rows_are_named_from_the_ops_own_results(op):
    q = Quantizer("hadamard", 32, 2, backend="torch")
    x = torch.randn(6, 32)
    x[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"x holds NaN or Inf in vectors \[2\]"):
        getattr(q, op)(x)
    big = torch.full((5, 32), 1e20)
    big[:3] = 1.0
    with pytest.raises(ValueError, match=r"the norm of vectors \[3, 4\] overflows float32"):
        getattr(q, op)(big)
    # A large but finite norm is not refused.
    near = torch.zeros(2, 32)
    near[:, 0] = 1.5e19  # its square, 2.25e38, is still a float32
    getattr(q, op)(near)


def test_check_false_skips_the_check():
    q = Quantizer("full", 16, 3, backend="torch")
    x = torch.randn(4, 16)
    x[1, 0] = float("inf")
    packed = q.quantize(x, check=False)
    assert not torch.isfinite(packed.norms[1]) and torch.isfinite(packed.norms[[0, 2, 3]]).all()
    _, sq_err = q.roundtrip(x, check=False)
    assert not torch.isfinite(sq_err[1])
    out = q.dequantize(packed, check=False)
    assert torch.isfinite(out[[0, 2, 3]]).all()


def _error(call, *args):
    """(field, kind, message) of the QuantizerError that call(*args) raises, or None."""
    try:
        call(*args)
    except QuantizerError as exc:
        return exc.field, exc.kind, str(exc)
    return None


def _bad_inputs(dim: int, device="cpu"):
    nan = torch.randn(6, dim)
    nan[2, 5] = float("nan")
    nan[4, 0] = float("-inf")
    big = torch.full((5, dim), 1e20)
    big[:3] = 1.0
    return {"nan": nan.to(device), "overflow": big.to(device), "good": torch.randn(3, 4, dim).to(device)}


@pytest.mark.parametrize("variant", ["full", "hadamard"])
def test_the_deferred_check_raises_what_the_default_call_raises(variant):
    q = Quantizer(variant, 32, 2, backend="torch")
    for name, x in _bad_inputs(32).items():
        packed = q.quantize(x, check=False)
        expected = _error(q.quantize, x)
        assert _error(q.check, packed.norms, x) == expected, name
        _, sq_err = q.roundtrip(x, check=False)
        assert _error(q.check, sq_err, x) == _error(q.roundtrip, x), name
        assert (expected is None) == (name == "good")
    # dequantize: the norms it is given
    packed = q.quantize(torch.randn(4, 32))
    norms = packed.norms.clone()
    norms[3] = float("nan")
    bad = Packed(codes=packed.codes, norms=norms, **q.descriptor())
    assert _error(q.check, bad.norms) == _error(q.dequantize, bad)
    assert _error(q.check, bad.norms)[:2] == ("norms", "non_finite")
    assert _error(q.check, packed.norms) is None


def test_the_deferred_check_keeps_a_row_whose_squared_error_alone_overflows():
    """||x - x_hat||^2 <= 4 ||x||^2 can overflow float32 beside a finite norm: like the checked round trip, the
    deferred check then looks at the row itself and lets it through."""
    q = Quantizer("full", 16, 2, backend="torch")
    x = torch.zeros(3, 16)
    x[:, 0] = 1.8e19  # ||x||^2 = 3.24e38, still a float32
    assert _error(q.check, torch.tensor([1.0, float("inf"), 2.0]), x) is None
    x[1, 0] = float("nan")
    assert _error(q.check, torch.tensor([1.0, float("inf"), 2.0]), x)[:2] == ("x", "non_finite")


def test_the_deferred_check_refuses_mismatched_arguments():
    q = Quantizer("full", 16, 3, backend="torch")
    x = torch.randn(4, 16)
    norms = q.quantize(x).norms
    assert _error(q.check, norms[:3], x) == (
        "x",
        "shape",
        "x must be [..., 16] with one vector per value of per_row (3); got shape [4, 16]",
    )
    assert _error(q.check, norms, x[:, :8])[:2] == ("x", "shape")
    meta = torch.empty(4, 16, device="meta")
    assert _error(q.check, norms, meta) == (
        "per_row",
        "device",
        "per_row is on cpu but x is on meta: give both on one device",
    )


@pytest.mark.gpu
def test_the_deferred_check_runs_on_host_copies_of_gpu_results():
    """What the service does: check=False on the GPU, one copy to the host, the check there (no device sync)."""
    q = Quantizer("full", 64, 3, device="cuda")
    for name, x in _bad_inputs(64).items():
        packed = q.quantize(x.cuda(), check=False)
        expected = _error(q.quantize, x.cuda())
        assert _error(q.check, packed.norms.cpu(), x) == expected, name


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["full", "hadamard", "identity"])
def test_ops_capture_in_a_cuda_graph_and_replay_like_eager(variant):
    q = Quantizer(variant, 128, 3, device="cuda")
    assert q.backend == "triton"
    x = torch.randn(8192, 128, device="cuda", dtype=torch.float16)
    packed = q.quantize(x)  # eager (compiles the kernels first)
    eager = (packed.codes.clone(), packed.norms.clone(), q.dequantize(packed), *q.roundtrip(x))
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm the graph's allocations on a side stream, as torch advises
        q.quantize(static_x, check=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = q.quantize(static_x, check=False)
        decoded = q.dequantize(captured, check=False)
        x_hat, sq_err = q.roundtrip(static_x, check=False)
    static_x.copy_(torch.randn_like(x))  # replay reads the new input
    graph.replay()
    fresh = q.quantize(static_x)
    torch.testing.assert_close(captured.codes, fresh.codes, rtol=0, atol=0)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip((captured.codes, captured.norms, decoded, x_hat, sq_err), eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _rows_independent_of_batch(q: Quantizer, dtype: torch.dtype, device: str) -> None:
    """What the service's dynamic batching relies on: a row's codes, norm and reconstruction do not depend on
    the batch it came in (its size picks another tile, warps and elements a thread on the GPU)."""
    sizes = [1, 3, 17, 64, 250, 4099, 9000]  # spans the small-batch, shrunken and full tiles
    parts = [torch.randn(n, q.dim, device=device).to(dtype) for n in sizes]
    joined = q.quantize(torch.cat(parts))
    decoded = q.dequantize(joined, dtype)
    start = 0
    for x in parts:
        alone = q.quantize(x)
        rows = slice(start, start + x.shape[0])
        start += x.shape[0]
        assert torch.equal(alone.codes, joined.codes[rows]) and torch.equal(alone.norms, joined.norms[rows])
        assert torch.equal(q.dequantize(alone, dtype), decoded[rows])


@pytest.mark.parametrize("variant", ["full", "hadamard"])
def test_rows_do_not_depend_on_their_batch(variant):
    _rows_independent_of_batch(Quantizer(variant, 64, 3), torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["full", "fast", "2d", "identity", "hadamard", "kronecker", "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rows_do_not_depend_on_their_batch_gpu(variant, dtype):
    _rows_independent_of_batch(Quantizer(variant, 128, 3, device="cuda"), dtype, "cuda")


def test_the_quantizer_docstring_examples_run():
    """The module's and ``Quantizer.check``'s examples (the deferred check raising for a NaN row) stay true."""
    import doctest

    import kernels.quantizer

    assert doctest.testmod(kernels.quantizer).failed == 0
