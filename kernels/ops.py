"""The three ops as ``torch.library`` custom ops, so that code calling ``Quantizer`` compiles with
``torch.compile(fullgraph=True)``: the compiler sees one opaque op per call, with a fake implementation that
gives the output shapes and dtypes, and the real one runs the backend (Triton kernels or the torch reference).

A custom op takes tensors and plain values, not a ``Plan``: the plan travels as its tensors (codebook, rotation
parameters and the kernels' derived forms, ``Plan.op_tensors``) and whether its symmetric search applies, and is
rebuilt around them inside the op, without copies and without deriving anything again. ``Quantizer`` routes
through these ops only while ``torch.compile`` traces; in eager it calls the backend directly, so an eager call
pays no dispatcher cost.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from kernels import reference
from kernels.plan import Plan


def _backend(name: str):
    if name == "torch":
        return reference
    import kernels.triton as triton_ops

    return triton_ops


@custom_op("isoquant::quantize", mutates_args=())
def quantize(
    x: torch.Tensor,
    tensors: list[torch.Tensor],
    names: str,
    symmetric: bool,
    variant: str,
    dim: int,
    bits: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [N, dim] -> (codes uint8 [N, code_bytes], norms float32 [N])."""
    plan = Plan.from_op_tensors(variant, dim, bits, names, symmetric, tensors)
    return _backend(backend).quantize(x, plan)


@quantize.register_fake
def _(x, tensors, names, symmetric, variant, dim, bits, backend):
    code_bytes = Plan.code_bytes_of(variant, dim, bits)
    return x.new_empty((x.shape[0], code_bytes), dtype=torch.uint8), x.new_empty((x.shape[0],), dtype=torch.float32)


@custom_op("isoquant::dequantize", mutates_args=())
def dequantize(
    codes: torch.Tensor,
    norms: torch.Tensor,
    tensors: list[torch.Tensor],
    names: str,
    symmetric: bool,
    variant: str,
    dim: int,
    bits: int,
    backend: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Codes uint8 [N, code_bytes] and norms float32 [N] -> reconstruction [N, dim] in ``dtype``."""
    plan = Plan.from_op_tensors(variant, dim, bits, names, symmetric, tensors)
    return _backend(backend).dequantize(codes, norms, plan, dtype)


@dequantize.register_fake
def _(codes, norms, tensors, names, symmetric, variant, dim, bits, backend, dtype):
    return codes.new_empty((codes.shape[0], dim), dtype=dtype)


@custom_op("isoquant::roundtrip", mutates_args=())
def roundtrip(
    x: torch.Tensor,
    tensors: list[torch.Tensor],
    names: str,
    symmetric: bool,
    variant: str,
    dim: int,
    bits: int,
    backend: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [N, dim] -> (reconstruction [N, dim] in ``dtype``, squared error float32 [N])."""
    plan = Plan.from_op_tensors(variant, dim, bits, names, symmetric, tensors)
    return _backend(backend).roundtrip(x, plan, dtype)


@roundtrip.register_fake
def _(x, tensors, names, symmetric, variant, dim, bits, backend, dtype):
    return x.new_empty((x.shape[0], dim), dtype=dtype), x.new_empty((x.shape[0],), dtype=torch.float32)
