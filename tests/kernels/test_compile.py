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


def test_the_ops_rebuild_the_plan_without_deriving_anything():
    from kernels.plan import Plan

    q = Quantizer("full", 48, 3)
    q.plan.fused_params  # noqa: B018  (what the Triton backend builds at construction)
    tensors, names, symmetric, variant, dim, bits, _ = q._op_args()
    tensors = q.plan.op_tensors()
    plan = Plan.from_op_tensors(variant, dim, bits, names, symmetric, tensors)
    assert plan.__dict__["symmetric"] is symmetric is q.plan.symmetric
    assert all(a is b for a, b in zip(plan.__dict__["fused_params"], q.plan.fused_params, strict=True))
    assert all(plan.params[n] is q.plan.params[n] for n in q.plan.params) and plan.centroids is q.plan.centroids
    h = Quantizer("hadamard", 64, 3, backend="torch").plan  # the Gluon kernels' sign table rides along
    h.fused_params, h.lane_sign_table  # noqa: B018  (what kernels.triton.prepare builds)
    rebuilt = Plan.from_op_tensors(h.variant, h.dim, h.bits, h.op_names, h.symmetric, h.op_tensors())
    assert rebuilt.__dict__["lane_sign_table"] is h.lane_sign_table
    # ... and the lane signs with it (kronecker's are signs * mix: no device op at each call to find them)
    k = Quantizer("kronecker", 64, 3, backend="torch").plan
    k.fused_params, k.lane_sign_table  # noqa: B018
    rebuilt = Plan.from_op_tensors(k.variant, k.dim, k.bits, k.op_names, k.symmetric, k.op_tensors())
    signs = rebuilt.__dict__["lane_signs"]
    assert torch.equal(signs, k.lane_signs) and signs.data_ptr() == k.lane_sign_table.data_ptr()
    # The bits-4 grid search's table too (reading the boundaries to build it would sync inside a capture); a
    # plan without one gets None, not a table built at the call.
    for variant in ("hadamard", "identity"):
        g = Quantizer(variant, 64, 4, backend="torch").plan
        g.fused_params, g.lane_sign_table, g.search_grid  # noqa: B018
        rebuilt = Plan.from_op_tensors(g.variant, g.dim, g.bits, g.op_names, g.symmetric, g.op_tensors())
        assert rebuilt.__dict__["search_grid"] is g.search_grid is not None, variant
        assert rebuilt.__dict__.get("lane_sign_table") is g.lane_sign_table, variant
    assert Plan.from_op_tensors(k.variant, k.dim, k.bits, k.op_names, k.symmetric, k.op_tensors()).search_grid is None
