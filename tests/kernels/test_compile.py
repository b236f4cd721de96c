"""torch.compile(fullgraph=True) over code that calls Quantizer: the ops are torch.library custom ops
(kernels/ops.py) with fake implementations, so the compiler traces them without a graph break, and the
compiled function gives the eager results."""

from __future__ import annotations

import pytest
import torch

from kernels import VARIANTS, Quantizer


def _pipeline(q: Quantizer):
    def step(x):
        packed = q.quantize(x * 2.0, check=False)
        decoded = q.dequantize(packed, torch.float16, check=False)
        x_hat, sq_err = q.roundtrip(x, check=False)
        return packed.codes, packed.norms, decoded, x_hat + 1.0, sq_err

    return step


@pytest.mark.parametrize("variant", VARIANTS)
def test_fullgraph_trace_matches_eager(variant):
    torch._dynamo.reset()
    q = Quantizer(variant, 48, 3, seed=4)
    step = _pipeline(q)
    x = torch.randn(3, 5, 48)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x), step(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_compiles_on_the_cpu():
    torch._dynamo.reset()
    q = Quantizer("full", 48, 3)
    step = _pipeline(q)
    x = torch.randn(5, 48)
    for got, want in zip(torch.compile(step, fullgraph=True)(x), step(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["full", "hadamard"])
def test_inductor_compiles_the_triton_ops(variant):
    torch._dynamo.reset()
    q = Quantizer(variant, 128, 3, device="cuda")
    step = _pipeline(q)
    x = torch.randn(1000, 128, device="cuda", dtype=torch.float16)
    for got, want in zip(torch.compile(step, fullgraph=True)(x), step(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
