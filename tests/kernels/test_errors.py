"""Typed library errors: every input a Quantizer refuses raises a QuantizerError (still a ValueError) that
names the refused argument (``field``) and the reason (``kind``), so callers need not read the message."""

from __future__ import annotations

import copy
import pickle
from dataclasses import replace

import pytest
import torch

import kernels
from kernels import FORMAT_VERSION, Quantizer, QuantizerError
from kernels.errors import KINDS


@pytest.fixture(scope="module")
def q16() -> Quantizer:
    return Quantizer("full", dim=16, bits=2, seed=0)


@pytest.fixture(scope="module")
def packed(q16):
    return q16.quantize(torch.randn(3, 16))


def _refusal(fn) -> QuantizerError:
    """The QuantizerError ``fn()`` raises, checked for the invariants every one of them keeps."""
    with pytest.raises(QuantizerError) as info:
        fn()
    exc = info.value
    assert isinstance(exc, ValueError)  # existing ``except ValueError`` callers keep working
    assert exc.kind in KINDS
    assert str(exc) == exc.message
    if exc.field is not None:  # every message starts with the name of what it is about
        assert exc.message.startswith(exc.field) and exc.message[len(exc.field)] in " :", exc.message
    return exc


def _assert_refused(fn, field: str | None, kind: str) -> QuantizerError:
    exc = _refusal(fn)
    assert (exc.field, exc.kind) == (field, kind), repr(exc)
    return exc


# -- constructor arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"variant": "rotor"}, "variant"),
        ({"dim": 1}, "dim"),
        ({"dim": 4097}, "dim"),
        ({"dim": "128"}, "dim"),
        ({"dim": True}, "dim"),
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 2.0}, "bits"),
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 64}, "seed"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_constructor_argument_is_a_value_error_of_that_field(kwargs, field):
    _assert_refused(lambda: Quantizer(**{"dim": 16, **kwargs}), field, "value")


def test_triton_backend_on_cpu_is_a_value_error_of_backend():
    exc = _assert_refused(lambda: Quantizer(dim=16, backend="triton"), "backend", "value")
    assert "needs a CUDA device" in exc.message


# -- quantize / roundtrip input ------------------------------------------------------------------------


def test_not_a_tensor_is_a_type_error_of_x(q16):
    _assert_refused(lambda: q16.quantize([[0.0] * 16]), "x", "type")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_input_dtype_is_a_dtype_error_of_x(q16, dtype):
    _assert_refused(lambda: q16.quantize(torch.zeros(2, 16, dtype=dtype)), "x", "dtype")
    _assert_refused(lambda: q16.roundtrip(torch.zeros(2, 16, dtype=dtype)), "x", "dtype")


@pytest.mark.parametrize("shape", [(4, 15), (16, 4), ()])
def test_last_dimension_is_a_shape_error_of_x(q16, shape):
    _assert_refused(lambda: q16.quantize(torch.zeros(shape)), "x", "shape")


def test_input_on_another_device_is_a_device_error_of_x(q16):
    # The meta device stands in for a GPU on a CPU-only machine: it has dtypes and shapes but no data.
    _assert_refused(lambda: q16.quantize(torch.empty(2, 16, device="meta")), "x", "device")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_rows_are_non_finite_errors_of_x(q16, bad):
    x = torch.randn(2, 3, 16)
    x[1, 0, 5] = bad
    exc = _assert_refused(lambda: q16.quantize(x), "x", "non_finite")
    assert "[3]" in exc.message  # the flat row index
    _assert_refused(lambda: q16.roundtrip(x), "x", "non_finite")


def test_rows_whose_squared_norm_overflows_are_overflow_errors_of_x(q16):
    x = torch.randn(4, 16)
    x[2] = 1e30  # finite float32 values whose squares (1e60) are not
    exc = _assert_refused(lambda: q16.quantize(x), "x", "overflow")
    assert "[2]" in exc.message
    _assert_refused(lambda: q16.roundtrip(x), "x", "overflow")


def test_overflow_and_nan_together_are_reported_as_non_finite(q16):
    """A NaN row is the more specific fault: the library names it rather than the overflow."""
    x = torch.randn(4, 16)
    x[0] = 1e30
    x[3, 0] = float("nan")
    _assert_refused(lambda: q16.quantize(x), "x", "non_finite")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8])
def test_output_dtype_is_a_dtype_error_of_dtype(q16, packed, dtype):
    _assert_refused(lambda: q16.dequantize(packed, dtype), "dtype", "dtype")
    _assert_refused(lambda: q16.roundtrip(torch.randn(2, 16), dtype), "dtype", "dtype")


# -- dequantize input ---------------------------------------------------------------------------------


def test_not_a_packed_is_a_type_error_of_packed(q16, packed):
    _assert_refused(lambda: q16.dequantize(packed.codes), "packed", "type")


def test_codes_of_another_quantizer_are_a_fingerprint_error(q16):
    other = Quantizer("full", dim=16, bits=2, seed=1).quantize(torch.randn(3, 16))
    _assert_refused(lambda: q16.dequantize(other), "fingerprint", "fingerprint")


def test_another_format_version_is_a_fingerprint_error(q16, packed):
    _assert_refused(
        lambda: q16.dequantize(replace(packed, format_version=FORMAT_VERSION + 1)), "fingerprint", "fingerprint"
    )


def test_codes_dtype_and_shape(q16, packed):
    _assert_refused(lambda: q16.dequantize(replace(packed, codes=packed.codes.to(torch.int16))), "codes", "dtype")
    _assert_refused(lambda: q16.dequantize(replace(packed, codes=packed.codes[:, :-1])), "codes", "shape")


def test_norms_dtype_and_shape_are_told_apart(q16, packed):
    _assert_refused(lambda: q16.dequantize(replace(packed, norms=packed.norms.double())), "norms", "dtype")
    _assert_refused(lambda: q16.dequantize(replace(packed, norms=packed.norms[:-1])), "norms", "shape")


def test_codes_and_norms_on_another_device_are_device_errors(q16, packed):
    on_meta = replace(packed, codes=packed.codes.to("meta"))
    _assert_refused(lambda: q16.dequantize(on_meta), "codes", "device")
    on_meta = replace(packed, norms=packed.norms.to("meta"))
    _assert_refused(lambda: q16.dequantize(on_meta), "norms", "device")


def test_nan_norms_are_non_finite_errors_of_norms(q16, packed):
    norms = packed.norms.clone()
    norms[1] = float("nan")
    _assert_refused(lambda: q16.dequantize(replace(packed, norms=norms)), "norms", "non_finite")


# -- the class itself ----------------------------------------------------------------------------------


def test_exported_from_the_package():
    assert kernels.QuantizerError is QuantizerError and "QuantizerError" in kernels.__all__


def test_message_calling_renames_only_the_subject(q16):
    exc = _refusal(lambda: q16.quantize(torch.full((2, 16), float("nan"))))
    assert exc.message_calling("vectors") == "vectors" + exc.message[1:]
    assert exc.message_calling("vectors").count("vectors") == 2  # "... NaN or Inf in vectors [0, 1] ..."
    exc = _refusal(lambda: q16.quantize(torch.full((2, 16), 1e30)))
    assert exc.message_calling("vectors").startswith("vectors: the norm of vectors [0, 1] overflows float32")
    assert QuantizerError("no subject here", field=None, kind="value").message_calling("y") == "no subject here"
    # A message not led by its field is left as it is rather than given a wrong word.
    assert QuantizerError("xs are bad", field="x", kind="value").message_calling("vectors") == "xs are bad"


def test_unknown_kind_is_refused_at_the_raise_site():
    with pytest.raises(TypeError, match="kind must be one of"):
        QuantizerError("x is odd", field="x", kind="odd")


def test_survives_pickle_and_copy_with_field_and_kind():
    exc = QuantizerError("codes must be uint8, got int16", field="codes", kind="dtype")
    for twin in (pickle.loads(pickle.dumps(exc)), copy.copy(exc), copy.deepcopy(exc)):
        assert type(twin) is QuantizerError
        assert (str(twin), twin.field, twin.kind) == (str(exc), "codes", "dtype")
