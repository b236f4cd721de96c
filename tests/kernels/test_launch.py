"""The launchers' direct launch of compiled kernels (``_launch.launch``) and the kernels' bad-row flag.

A direct launch skips Triton's dispatch for a launch class it has seen; it is only correct if the class tells
apart every launch that Triton would compile differently. The CPU tests check that property against Triton's
own specialization (``native_specialize_impl``) over launches of varied inputs; the GPU tests run the direct
path and check its results, and the flag's, against the reference.
"""

from __future__ import annotations

import sys

import pytest
import torch

from kernels import Quantizer, reference
from tests.conftest import INTERPRETED

kt = pytest.importorskip("kernels.triton")
from kernels.triton import _launch  # noqa: E402

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="kernels are compiled for CUDA, not interpreted")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _spec(value):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, value, False, True, True)


INTS = [1, 0, 2, 3, 15, 16, 17, 31, 32, 48, 100, 128, 1 << 20, (1 << 31) - 16, (1 << 31) - 1, 1 << 31, 1 << 40, -16, -3]


def test_int_class_matches_tritons_specialization():
    """Two ints share an ``int_class`` exactly when Triton specializes them alike."""
    for a in INTS:
        for b in INTS:
            assert (_launch.int_class(a) == _launch.int_class(b)) == (_spec(a) == _spec(b)), (a, b)


def test_aligned_matches_tritons_specialization():
    base = torch.empty(64, dtype=torch.float16)
    for offset in range(9):
        t = base[offset:]
        assert _spec(t) == ("*fp16", "D" if _launch.aligned(t) else ""), offset


def _inputs(dim: int):
    """Inputs that vary every argument the launchers pass through from the caller: dtype, 16-byte alignment,
    row and column strides, and N around 1 and multiples of 16."""
    out = []
    for dtype in (torch.float16, torch.float32):
        for n in (1, 2, 16, 17, 32, 33):
            base = torch.randn(n, dim + 8, dtype=dtype)
            out.append(base[:, :dim].contiguous())  # contiguous, aligned
            out.append(base[:, :dim])  # row stride dim + 8
            out.append(base[:, 1 : dim + 1])  # unaligned start
            out.append(torch.randn(dim, n, dtype=dtype).t())  # column stride n
    return out


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("variant", ["full", "hadamard"])
def test_launch_class_separates_what_triton_specializes(variant, monkeypatch):
    """Over launches of varied inputs, with and without a flag, and through the plain and the Gluon kernels
    (the Gluon launches forced and recorded, as the CPU cannot run them: hadamard's, and full's quantize):
    launches with one launch class always have the same constexprs and the same specialization of every
    argument."""
    from kernels.triton import _gluon

    plan = Quantizer(variant, 40, 3, seed=2, backend="torch").plan
    kt.prepare(plan)
    seen: dict = {}

    def record(cache, key, kernel, grid, args, meta):
        spec = tuple(_spec(a) if isinstance(a, (int, torch.Tensor)) else a for a in args)
        signature = (spec, tuple(sorted((k, repr(v)) for k, v in meta.items())))
        assert seen.setdefault(key, signature) == signature, key

    monkeypatch.setattr(_launch, "launch", record)  # (launch_fused and launch_gluon call it by this name)
    def forced(plan, device, w, r, warps, stored=None, exchange=True, loaded=None):  # what lane_layout gives on a GPU
        if plan.lane_signs is None and (exchange or plan.kernel not in _gluon.LANE_QUANTIZE_KERNELS):
            return None  # full: its quantize only
        return _gluon._lane_plan(w, r, warps, 4 if stored == torch.float32 else 8, exchange)

    monkeypatch.setattr(_gluon, "lane_layout", forced)
    flag = torch.zeros(1, dtype=torch.int32)
    for x in _inputs(plan.dim):
        for f in (None, flag):
            kt.quantize(x, plan, flag=f)
            kt.roundtrip(x, plan, x.dtype, flag=f)
            codes, norms = reference.quantize(x, plan)
            kt.dequantize(codes, norms, plan, torch.float16, flag=f)
            wide = torch.zeros(codes.shape[0], codes.shape[1] + 3, dtype=torch.uint8)
            wide[:, 1 : 1 + codes.shape[1]] = codes  # strided, unaligned codes
            kt.dequantize(wide[:, 1 : 1 + codes.shape[1]], norms, plan, torch.float32, flag=f)
    assert len(seen) > 40  # many classes were met, each with one specialization


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("variant", ["full", "hadamard", "dense", "2d"])
def test_flag_is_set_by_a_non_finite_norm_only(variant):
    """The flag stays 0 on finite rows and becomes 1 for NaN, Inf and an overflowing norm, in each op."""
    plan = Quantizer(variant, 48, 3, seed=5, backend="torch").plan
    kt.prepare(plan)
    x = torch.randn(21, 48)
    codes, norms = reference.quantize(x, plan)

    def flagged(run) -> int:
        flag = torch.zeros(1, dtype=torch.int32)
        run(flag)
        return int(flag)

    assert flagged(lambda f: kt.quantize(x, plan, flag=f)) == 0
    assert flagged(lambda f: kt.roundtrip(x, plan, torch.float16, flag=f)) == 0
    assert flagged(lambda f: kt.dequantize(codes, norms, plan, torch.float32, flag=f)) == 0
    for bad in (float("nan"), float("inf"), 3e38):
        y = x.clone()
        y[13, 7] = bad
        if bad == 3e38:
            y[13, 8] = bad  # two squares of 9e76 overflow float32
        assert flagged(lambda f, y=y: kt.quantize(y, plan, flag=f)) == 1, bad
        assert flagged(lambda f, y=y: kt.roundtrip(y, plan, torch.float32, flag=f)) == 1, bad
    for bad in (float("nan"), float("inf"), -float("inf")):
        n2 = norms.clone()
        n2[20] = bad
        assert flagged(lambda f, n2=n2: kt.dequantize(codes, n2, plan, torch.float16, flag=f)) == 1, bad


def test_flag_argument_is_checked():
    plan = Quantizer("full", 16, 3, backend="torch").plan
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="flag must be an int32 tensor of one element"):
        kt.quantize(x, plan, flag=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="flag must be an int32 tensor of one element"):
        kt.roundtrip(x, plan, flag=torch.zeros(1, dtype=torch.int64))


# -- GPU -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", ["full", "hadamard", "2d", "kronecker"])
def test_direct_launches_match_the_reference_gpu(variant, monkeypatch):
    """Each input of ``_inputs`` three times: the first launch of a class goes through Triton, the next ones
    straight to the compiled kernel (the plan's cache grows by the classes met, not by the calls); every
    result equals the reference's (codes within the boundary tolerance)."""
    plan = Quantizer(variant, 64, 3, seed=3, device="cuda").plan
    kt.prepare(plan)
    plan.launches.clear()
    inputs = [x.cuda() if x.is_contiguous() else _same_strides_on_cuda(x) for x in _inputs(plan.dim)]
    for rep in range(3):
        for x in inputs:
            codes, norms = kt.quantize(x, plan)
            want_codes, want_norms = reference.quantize(x.float(), plan)
            torch.testing.assert_close(norms, want_norms, rtol=2e-6, atol=0)
            assert (codes != want_codes).float().mean() < 0.02
            out = kt.dequantize(codes, norms, plan, torch.float32)
            torch.testing.assert_close(
                out, reference.dequantize(codes, norms, plan, torch.float32), rtol=1e-5, atol=1e-5
            )
            x_hat, err = kt.roundtrip(x, plan, torch.float32)
            assert torch.isfinite(x_hat).all() and (err >= 0).all()
        if rep == 0:
            classes = len(plan.launches)
            dispatched = _count_triton_dispatch(monkeypatch)
        else:
            assert len(plan.launches) == classes  # no new class on the repeats
    assert classes > 10 and dispatched == []  # ... and none went through Triton's dispatch


def _count_triton_dispatch(monkeypatch) -> list:
    """From now on, the names of the fused and Gluon kernels that Triton's own ``run`` launches (the direct
    path does not call it)."""
    from kernels.triton import _gluon

    calls = []
    ops = ("quantize", "dequantize", "roundtrip")  # (the package's names are the functions: sys.modules)
    kernels = [getattr(sys.modules[f"kernels.triton.{op}"], f"_{op}_fused_kernel") for op in ops]
    kernels += [_gluon._quantize_kernel, _gluon._dequantize_kernel, _gluon._roundtrip_kernel]
    for kernel in kernels:

        def run(*args, kernel=kernel, original=kernel.run, **kwargs):
            calls.append(kernel.fn.__name__)
            return original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return calls


@pytest.mark.gpu
@gpu
def test_a_launch_hook_sends_launches_through_triton_gpu():
    """With a launch hook installed (a profiler's), every launch goes through Triton, which calls the hook."""
    from triton import knobs

    q = Quantizer("full", 128, 3, device="cuda")
    x = torch.randn(64, 128, device="cuda")
    q.quantize(x)  # the class is known: later launches would go direct
    seen = []

    def hook(metadata):
        seen.append(metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(3):
            q.quantize(x)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 3
    q.quantize(x)
    assert len(seen) == 3


def _same_strides_on_cuda(x: torch.Tensor) -> torch.Tensor:
    """x on the GPU with the same strides and the same offset modulo 16 bytes (a view of a padded copy)."""
    base = x.as_strided((x.untyped_storage().nbytes() // x.element_size(),), (1,), 0)
    return base.cuda().as_strided(x.shape, x.stride(), x.storage_offset())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", ["full", "hadamard", "dense"])
@pytest.mark.parametrize("op", ["quantize", "roundtrip", "dequantize"])
def test_public_check_names_bad_rows_from_the_kernel_flag_gpu(variant, op):
    """The default check reads the kernels' flag in pinned memory: bad rows are named as on the CPU, the flag is
    cleared after an error (the next good call passes), and good calls launch no reduction or copy."""
    q = Quantizer(variant, 64, 3, device="cuda")
    x = torch.randn(40, 64, device="cuda")
    packed = q.quantize(x)
    if op == "dequantize":
        norms = packed.norms.clone()
        norms[[3, 17]] = float("nan")
        tampered = type(packed)(codes=packed.codes, norms=norms, **q.descriptor())
        with pytest.raises(ValueError, match=r"norms holds NaN or Inf in vectors \[3, 17\]"):
            q.dequantize(tampered)
        q.dequantize(packed)  # the flag was cleared
        return
    y = x.clone()
    y[[5, 30], 2] = float("inf")
    with pytest.raises(ValueError, match=r"x holds NaN or Inf in vectors \[5, 30\]"):
        getattr(q, op)(y)
    big = torch.full((4, 64), 1e20, device="cuda")
    big[0] = 1.0
    with pytest.raises(ValueError, match=r"the norm of vectors \[1, 2, 3\] overflows float32"):
        getattr(q, op)(big)
    getattr(q, op)(x)  # the flag was cleared
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        getattr(q, op)(x)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if variant != "dense":  # (the matrix kernels write no flag: a reduction and an async copy set it)
        assert not any("reduce" in n.lower() or "memcpy" in n.lower() for n in names), names


@needs_interpreter
@pytest.mark.interpreter
def test_checked_calls_read_the_kernels_flag_interpreter(monkeypatch):
    """The public check through the flag path (the Triton backend forced onto the interpreted kernels): bad
    rows are named, and the flag is cleared after each error so that the next good call passes."""
    monkeypatch.setattr(Quantizer, "_resolve_backend", lambda self, backend: backend)
    q = Quantizer("full", 16, 3, seed=1, backend="triton")
    x = torch.randn(8, 16)
    y = x.clone()
    y[[2, 6], 1] = float("nan")
    for op in ("quantize", "roundtrip"):
        with pytest.raises(ValueError, match=r"x holds NaN or Inf in vectors \[2, 6\]"):
            getattr(q, op)(y)
        assert q._host_flag().tensor.item() == 0
        getattr(q, op)(x)
    packed = q.quantize(x)
    norms = packed.norms.clone()
    norms[5] = -float("inf")
    tampered = type(packed)(codes=packed.codes, norms=norms, **q.descriptor())
    with pytest.raises(ValueError, match=r"norms holds NaN or Inf in vectors \[5\]"):
        q.dequantize(tampered)
    torch.testing.assert_close(q.dequantize(packed), Quantizer("full", 16, 3, seed=1).dequantize(packed))


@pytest.mark.gpu
@gpu
def test_flag_for_cuda_data_must_be_pinned_gpu():
    plan = Quantizer("full", 16, 3, device="cuda").plan
    x = torch.randn(3, 16, device="cuda")
    with pytest.raises(ValueError, match="flag must be on cuda:0 or in pinned host memory, got cpu"):
        kt.quantize(x, plan, flag=torch.zeros(1, dtype=torch.int32))
    pinned = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    for _ in range(2):  # (the second call finds it among the known pinned flags)
        kt.quantize(x, plan, flag=pinned)
        torch.cuda.synchronize()
        assert pinned.item() == 0
    x[1, 1] = float("nan")
    kt.quantize(x, plan, flag=pinned)
    torch.cuda.synchronize()
    assert pinned.item() == 1
