"""isoquant_format: the worked example's exact bytes, writer -> parser round trips, every limit and
malformed header as a FormatError naming its field, agreement with the safetensors package, and no torch
or numpy behind the import."""

from __future__ import annotations

import doctest
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import isoquant_format
from isoquant_format import (
    DTYPE_CODES,
    DTYPE_NAMES,
    ITEMSIZES,
    FormatError,
    RawTensor,
    UnsupportedDtype,
    meta_bool,
    meta_int,
    meta_str,
    parse,
    write_header,
    write_parts,
)
from isoquant_format import safetensors as container_module

ALL_DTYPES = tuple(DTYPE_NAMES)

# The module docstring's worked example: tensor x, U8 [3] = 1, 2, 3, metadata {"bits": "3"}.
EXAMPLE = (
    b"\x58\x00\x00\x00\x00\x00\x00\x00"  # header length 88, little-endian
    b'{"__metadata__":{"bits":"3"},"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}'
    b"       "  # 7 spaces: 81 + 7 = 88, a multiple of 8
    b"\x01\x02\x03"
)


def _container(entries: object, data: bytes = b"", pad_to: int = 8) -> bytearray:
    """A container with exactly this header (any JSON value) and data, written by hand."""
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % pad_to)
    return bytearray(struct.pack("<Q", len(header)) + header + data)


def test_worked_example_exact_bytes():
    parts = write_parts({"x": RawTensor("uint8", (3,), b"\x01\x02\x03")}, {"bits": 3})
    assert b"".join(parts) == EXAMPLE and len(EXAMPLE) == 99
    tensors, metadata = parse(EXAMPLE)
    assert list(tensors) == ["x"] and metadata == {"bits": "3"}
    assert tensors["x"].dtype == "uint8" and tensors["x"].shape == (3,) and bytes(tensors["x"].data) == b"\x01\x02\x03"
    # The package's reference reader agrees on the same bytes.
    assert safetensors.numpy.load(EXAMPLE)["x"].tolist() == [1, 2, 3]


def test_module_docstring_example_runs():
    """The docstring shows the same bytes: its doctest must pass, so the two cannot drift apart."""
    result = doctest.testmod(container_module, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


def test_dtype_tables_agree():
    assert {DTYPE_CODES[name] for name in DTYPE_CODES} == set(DTYPE_NAMES)
    assert all(DTYPE_NAMES[DTYPE_CODES[name]] == name for name in DTYPE_CODES)
    assert set(ITEMSIZES) == set(DTYPE_CODES)
    assert isoquant_format.WIRE_DTYPES == ("F16", "BF16", "F32", "U8")
    assert isoquant_format.FORMAT_VERSION == 1
    assert isoquant_format.DESCRIPTOR_FIELDS == ("variant", "dim", "bits", "seed", "fingerprint", "format_version")
    for name, size in ITEMSIZES.items():  # numpy agrees on every size it has
        if name != "bfloat16":
            assert np.dtype(name).itemsize == size


# ------------------------------------------------------------------------------------------------
# Round trips


@settings(max_examples=80, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(tuple(DTYPE_CODES)), st.lists(st.integers(0, 4), min_size=0, max_size=4)),
        min_size=0,
        max_size=6,
    ),
    metadata=st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(st.integers(), st.text(), st.booleans())),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_writer_to_parser(specs, metadata, seed):
    rng = np.random.default_rng(seed)
    tensors = {}
    for i, (dtype, shape) in enumerate(specs):
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZES[dtype]
        tensors[f"t{i}"] = RawTensor(dtype, tuple(shape), rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    parts = write_parts(tensors, metadata)
    assert (len(parts[0]) - 8) % 8 == 0  # the header is padded: the data starts aligned
    # The header alone, from the layout (what the service keeps for answers of one layout): the same bytes.
    assert write_header({name: (t.dtype, t.shape) for name, t in tensors.items()}, metadata) == parts[0]
    assert len(parts) == 1 + sum(1 for t in tensors.values() if len(t.data))  # empty tensors add no part
    back, meta = parse(b"".join(parts), dtypes=ALL_DTYPES)
    assert meta == {str(k): meta_str(v) for k, v in metadata.items()}
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert bytes(back[name].data) == tensor.data


def test_parse_views_the_buffer_and_write_parts_views_the_tensors():
    """No copies either way: the parser's slices share the container's memory, the writer's parts the
    tensors'."""
    data = bytearray(b"\x00\x00\x80\x3f\x00\x00\x00\x40")  # float32 1.0, 2.0
    parts = write_parts({"v": RawTensor("float32", (2,), data)})
    assert parts[1].obj is data
    body = bytearray(b"".join(parts))
    tensors, _ = parse(body)
    view = tensors["v"].data
    assert isinstance(view, memoryview) and not view.readonly
    view[0:4] = b"\x00\x00\x40\x40"  # write through the slice: the container changes
    assert body[-8:-4] == b"\x00\x00\x40\x40"
    assert np.frombuffer(view, dtype="<f4").tolist() == [3.0, 2.0]
    # A numpy array is a buffer too: parsed in place, whatever its shape.
    as_array = np.frombuffer(bytes(body), dtype=np.uint8).reshape(-1, 1)
    assert np.frombuffer(parse(as_array)[0]["v"].data, dtype="<f4").tolist() == [3.0, 2.0]


def test_a_repeated_header_is_read_once_and_its_checks_still_hold():
    """parse keeps the checked layout of small headers, keyed by the header's bytes and the container's size:
    a second container with the same header reads its own data without reading the header again; the same
    header over data of another size is refused as before, and a refused header is not kept."""
    cache = container_module._read_header_cached
    entries = {"__metadata__": {"bits": "3"}, "v": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    first = _container(entries, struct.pack("<2f", 1.0, 2.0))
    second = _container(entries, struct.pack("<2f", 3.0, 4.0))
    tensors, metadata = parse(first)
    hits = cache.cache_info().hits
    again, metadata_again = parse(second)
    assert cache.cache_info().hits == hits + 1
    assert np.frombuffer(again["v"].data, dtype="<f4").tolist() == [3.0, 4.0]
    assert np.frombuffer(tensors["v"].data, dtype="<f4").tolist() == [1.0, 2.0]
    metadata_again["bits"] = "8"  # each call gets its own metadata dict
    assert parse(first)[1] == {"bits": "3"} == metadata
    with pytest.raises(FormatError, match="cover 8 bytes of data, the body holds 12") as info:
        parse(_container(entries, struct.pack("<3f", 1.0, 2.0, 3.0)))
    assert info.value.field == "data"
    misses = cache.cache_info().misses
    bad = _container({"v": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8)
    for _ in range(2):
        with pytest.raises(FormatError, match="needs 12 bytes"):
            parse(bad)
    assert cache.cache_info().misses == misses + 2  # read (and refused) both times


def test_write_parts_takes_integer_like_dimensions_as_ints_and_refuses_float_ones():
    """A shape of numpy integers writes the header an int shape writes (the header cache holds plain ints);
    a float dimension is refused, even after the equal int shape was written."""
    data = b"\x00" * 8
    ints = write_parts({"v": RawTensor("float32", (2,), data)})[0]
    assert write_parts({"v": RawTensor("float32", (np.int64(2),), data)})[0] == ints
    with pytest.raises(TypeError):
        write_parts({"v": RawTensor("float32", (2.0,), data)})


def test_unpadded_header_parses():
    """A writer that does not pad its header still parses (the slices are then not aligned)."""
    body = _container({"n": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00\x00\x80\x3f", pad_to=1)
    tensors, metadata = parse(body)
    assert bytes(tensors["n"].data) == b"\x00\x00\x80\x3f" and metadata == {}


def test_write_parts_refuses_bad_tensors():
    with pytest.raises(FormatError) as info:
        write_parts({"a": RawTensor("complex64", (1,), b"\0" * 8)})
    assert info.value.field == "a.dtype"
    with pytest.raises(FormatError) as info:
        write_parts({"a": RawTensor("float32", (2,), b"\0" * 4)})
    assert info.value.field == "a.data" and "needs 8 bytes" in info.value.message
    with pytest.raises(FormatError):
        write_parts({"__metadata__": RawTensor("uint8", (0,), b"")})


# ------------------------------------------------------------------------------------------------
# Limits and malformed containers


def _u8(n: int, offsets: list | None = None) -> dict:
    return {"dtype": "U8", "shape": [n], "data_offsets": offsets if offsets is not None else [0, n]}


DEEP = json.loads("[" * 500 + "]" * 500)  # nested past reprlib's depth, within json's

MALFORMED = [
    # (container, field, fragment of the message)
    (b"\x01\x02", "header", "shorter than its 8-byte header length"),
    (struct.pack("<Q", 1 << 40) + b"{}", "header", "header length"),
    (struct.pack("<Q", (64 << 10) + 8) + b"{}" + b" " * ((64 << 10) + 6), "header", "65536 bytes"),
    (struct.pack("<Q", 5) + b"{nope", "header", "not valid JSON"),
    (struct.pack("<Q", 4) + b'{"\xff"', "header", "not valid JSON"),  # not UTF-8
    (struct.pack("<Q", 60000) + b"[" * 60000, "header", "not valid JSON"),  # nested too deeply
    (_container([1, 2]), "header", "must be a JSON object"),
    (_container({"__metadata__": False}), "__metadata__", "strings to strings"),
    (_container({"__metadata__": {"bits": 3}}), "__metadata__", "strings to strings"),
    (_container({f"t{i}": _u8(0) for i in range(17)}), "header", "at most 16"),
    (_container({"a": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}}, b"\0\0"), "a.shape", "shape"),
    (_container({"a": {"dtype": "U8", "shape": "2", "data_offsets": [0, 2]}}, b"\0\0"), "a.shape", "shape"),
    (_container({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0"), "a.shape", "shape"),
    (_container({"a": {"dtype": "U8", "shape": [2.0], "data_offsets": [0, 2]}}, b"\0\0"), "a.shape", "shape"),
    (_container({"a": {"dtype": "U8", "shape": [1] * 9, "data_offsets": [0, 1]}}, b"\0"), "a.shape", "at most 8"),
    (_container({"a": {"dtype": "U8", "shape": [10**4000] * 10, "data_offsets": [0, 2]}}, b"\0\0"), "a.shape",
     "at most 8"),
    (_container({"a": {"dtype": "U8", "shape": [0, 2**63, 64], "data_offsets": [0, 0]}}), "a.shape", "each from 0"),
    (_container({"a": {"dtype": "U8", "shape": DEEP, "data_offsets": [0, 0]}}), "a.shape", "[[[...]]]"),
    (_container({"a": _u8(2, [2, 0])}, b"\0\0"), "a.data_offsets", "data_offsets [2, 0]"),
    (_container({"a": _u8(2, "0-2")}, b"\0\0"), "a.data_offsets", "data_offsets"),
    (_container({"a": _u8(2, [0, 1, 2])}, b"\0\0"), "a.data_offsets", "data_offsets"),
    (_container({"a": _u8(2, [False, 2])}, b"\0\0"), "a.data_offsets", "data_offsets"),
    (_container({"a": _u8(2, [0, 10**4000])}, b"\0\0"), "a.data_offsets", "data_offsets [0, 1000"),
    (_container({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "a.data_offsets",
     "needs 8 bytes"),
    (_container({"a": _u8(2, [2, 4])}, b"\0" * 4), "a.data_offsets", "starts at byte 2"),
    (_container({"a": _u8(4), "b": _u8(2, [2, 4])}, b"\0" * 4), "b.data_offsets", "starts at byte 2"),
    (_container({"a": _u8(2, [0, 5000])}, b"\0\0"), "a.data_offsets", "data_offsets [0, 5000]"),  # past the body
    (_container({"a": _u8(2)}, b"\0" * 6), "data", "cover 2 bytes of data, the body holds 6"),
    (_container({"a": _u8(2)}, b"\0"), "data", "cover 2 bytes of data, the body holds 1"),
]  # fmt: skip


@pytest.mark.parametrize("body, field, fragment", MALFORMED)
def test_malformed_containers_name_the_field(body, field, fragment):
    with pytest.raises(FormatError) as info:
        parse(body)
    assert not isinstance(info.value, UnsupportedDtype)
    assert info.value.field == field and fragment in info.value.message, info.value.message
    assert len(info.value.message) < 400  # huge or deep values are shown shortened
    assert str(info.value) == info.value.message and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "info, shown",
    [
        ({"dtype": [1], "shape": [1], "data_offsets": [0, 1]}, "[1]"),
        ({"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}, "'F64'"),
        ({"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}, "'f32'"),
        ({"shape": [1], "data_offsets": [0, 1]}, "None"),
        ("not an entry", "None"),
        ({"dtype": DEEP, "shape": [1], "data_offsets": [0, 1]}, "[[[[...]]]]"),
    ],
)
def test_unsupported_dtypes_name_the_tensor(info, shown):
    """A dtype outside the accepted ones (or not a string) is UnsupportedDtype naming the tensor, and the
    message lists the accepted dtypes by name: the service answers it with a 422 for that tensor."""
    with pytest.raises(UnsupportedDtype) as caught:
        parse(_container({"vectors": info}, b"\0" * 8))
    error = caught.value
    assert error.tensor == "vectors" and error.field == "vectors.dtype"
    assert f"has dtype {shown}; allowed: float16, bfloat16, float32, uint8" in error.message


def test_dtypes_and_limits_are_the_callers():
    """The defaults are the service's bounds; a reader of files passes its own."""
    f64 = _container({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert parse(f64, dtypes=ALL_DTYPES)[0]["a"].dtype == "float64"
    with pytest.raises(UnsupportedDtype, match="allowed: uint8$"):
        parse(f64, dtypes=("U8",))
    many = _container({f"t{i}": _u8(0) for i in range(40)})
    assert len(parse(many, max_tensors=None)[0]) == 40
    deep = _container({"a": {"dtype": "U8", "shape": [1] * 20, "data_offsets": [0, 1]}}, b"\0")
    assert parse(deep, max_ndim=20)[0]["a"].shape == (1,) * 20
    big = _container({"__metadata__": {"k": "x" * (70 << 10)}})
    with pytest.raises(FormatError, match="65536 bytes"):
        parse(big)
    assert parse(big, max_header_bytes=1 << 20)[1]["k"] == "x" * (70 << 10)


# ------------------------------------------------------------------------------------------------
# Agreement with the safetensors package


def _reference_containers() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [
        safetensors.numpy.save({"x": np.arange(3, dtype=np.uint8)}),
        safetensors.numpy.save({"codes": rng.integers(0, 256, (5, 24), dtype=np.uint8),
                                "norms": rng.random(5, dtype=np.float32)},
                               metadata={"variant": "full", "dim": "64", "bits": "3"}),
        safetensors.numpy.save({"a": rng.standard_normal((2, 3)).astype(np.float16),
                                "b": rng.standard_normal(4),
                                "c": np.zeros((0, 7), dtype=np.float32),
                                "d": np.array([True, False]),
                                "e": np.array(-5, dtype=np.int64)}),
        safetensors.numpy.save({}, metadata={"only": "metadata"}),
    ]  # fmt: skip


@pytest.mark.parametrize("body", _reference_containers())
def test_parser_agrees_with_the_safetensors_package(body):
    ours, metadata = parse(body, dtypes=ALL_DTYPES)
    theirs = dict(safetensors.deserialize(body))
    assert set(ours) == set(theirs)
    for name, info in theirs.items():
        assert DTYPE_CODES[ours[name].dtype] == info["dtype"]
        assert list(ours[name].shape) == info["shape"]
        assert bytes(ours[name].data) == bytes(info["data"])
    header_len = struct.unpack("<Q", body[:8])[0]
    assert metadata == json.loads(body[8 : 8 + header_len]).get("__metadata__", {})


@pytest.mark.parametrize("body", _reference_containers())
def test_safetensors_package_reads_what_we_write(body, tmp_path):
    """Parse a reference container, write its tensors back with ``write_parts``: the package reads the
    same tensors and metadata from our bytes."""
    ours, metadata = parse(body, dtypes=ALL_DTYPES)
    rewritten = b"".join(write_parts(ours, metadata))
    expected = safetensors.numpy.load(body)
    got = safetensors.numpy.load(rewritten)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and np.array_equal(got[name], expected[name])
    path = tmp_path / "rewritten.safetensors"  # safe_open, which gives the metadata, wants a file
    path.write_bytes(rewritten)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert (f.metadata() or {}) == metadata


@pytest.mark.parametrize(
    "body",
    [
        _container({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
        _container({"a": _u8(2, [2, 4])}, b"\0" * 4),
        _container({"a": _u8(4), "b": _u8(2, [2, 4])}, b"\0" * 4),
        _container({"a": _u8(2)}, b"\0" * 6),
        _container({"a": _u8(2)}, b"\0"),
        _container([1, 2]),
        struct.pack("<Q", 5) + b"{nope",
        struct.pack("<Q", 1 << 40) + b"{}",
    ],
)
def test_both_refuse_what_breaks_the_format(body):
    with pytest.raises(FormatError):
        parse(body, dtypes=ALL_DTYPES)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(bytes(body))


# ------------------------------------------------------------------------------------------------
# Metadata values


def test_meta_str():
    assert meta_str(True) == "true" and meta_str(False) == "false"
    assert meta_str(0.1) == "0.1" and meta_str(np.float64(0.5)) == "0.5" and meta_str(1e-30) == "1e-30"
    assert meta_str(3) == "3" and meta_str("full") == "full"
    # docs/FORMAT.md: ``shape`` is a JSON list, whether a list or a tuple was given.
    assert meta_str([2, 64]) == "[2, 64]" and meta_str((2, 64)) == "[2, 64]"
    assert json.loads(meta_str((2, 64))) == [2, 64]
    assert b"".join(write_parts({}, {"skip": None, "k": 1}))[8:].strip() == b'{"__metadata__":{"k":"1"}}'


def test_meta_int_and_meta_bool():
    meta = {"bits": " 3 ", "seed": "x", "on": "Yes", "off": "0", "odd": "maybe"}
    assert meta_int(meta, "bits") == 3 and meta_int(meta, "absent", 7) == 7 and meta_int(meta, "absent") is None
    with pytest.raises(FormatError) as info:
        meta_int(meta, "seed")
    assert info.value.field == "seed" and "must be an integer" in info.value.message
    assert meta_bool(meta, "on") is True and meta_bool(meta, "off") is False and meta_bool(meta, "absent") is False
    with pytest.raises(FormatError) as info:
        meta_bool(meta, "odd")
    assert info.value.field == "odd" and "true or false" in info.value.message


# ------------------------------------------------------------------------------------------------
# Standard library only


def test_imports_neither_torch_nor_numpy():
    code = (
        "import sys, isoquant_format, isoquant_format.safetensors\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'safetensors'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "header, reason",
    [
        (b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}}',
         "appears more than once"),
        (b'{"x":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', "NaN is not a JSON value"),
        (b'{"x":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}', "Infinity is not a JSON value"),
        (b'{"x\\udc00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "unpaired surrogate"),
        (b'\xef\xbb\xbf{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "not valid JSON"),
    ],
)
def test_headers_the_reference_library_refuses_are_refused(header, reason):
    from isoquant_format import FormatError, parse

    body = struct.pack("<Q", len(header)) + header + bytes(4)
    with pytest.raises(FormatError, match=reason) as info:
        parse(body)
    assert info.value.field == "header"


# ------------------------------------------------------------------------------------------------
# Differential: generated containers, valid and mutated, against the safetensors package

_NP_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8, "I32": np.int32}


@st.composite
def _containers(draw) -> bytes:
    count = draw(st.integers(0, 4))
    names = draw(st.lists(st.text("abcxyz_.0123", min_size=1, max_size=6), min_size=count, max_size=count,
                          unique=True))
    tensors = {}
    for name in names:
        code = draw(st.sampled_from(sorted(_NP_DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        data = draw(st.binary(min_size=int(np.prod(shape, dtype=np.int64)) * np.dtype(_NP_DTYPES[code]).itemsize,
                              max_size=int(np.prod(shape, dtype=np.int64)) * np.dtype(_NP_DTYPES[code]).itemsize))
        tensors[name] = np.frombuffer(data, dtype=_NP_DTYPES[code]).reshape(shape)
    metadata = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)) or None
    return safetensors.numpy.save(tensors, metadata=metadata)


def _mutate(body: bytes, data) -> bytes:
    """One of: flip a byte, truncate, extend, or rewrite the header length (the mutations a broken writer
    or a hostile client make)."""
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "length"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(body) - 1))
        return body[:at] + bytes([body[at] ^ data.draw(st.integers(1, 255))]) + body[at + 1 :]
    if kind == "truncate":
        return body[: data.draw(st.integers(0, len(body) - 1))]
    if kind == "extend":
        return body + data.draw(st.binary(min_size=1, max_size=8))
    return struct.pack("<Q", data.draw(st.integers(0, len(body)))) + body[8:]


def _reference(body: bytes):
    try:
        return {name: (info["dtype"], list(info["shape"]), bytes(info["data"]))
                for name, info in safetensors.deserialize(body)}
    except Exception:  # noqa: BLE001  (the package refuses with SafetensorError, sometimes other errors)
        return None


@settings(max_examples=300, deadline=None)
@given(_containers(), st.data())
def test_differential_every_container_we_accept_the_package_accepts_identically(body, data):
    if data.draw(st.booleans()):
        body = _mutate(body, data)
    try:
        ours, _ = parse(body, dtypes=ALL_DTYPES, max_header_bytes=1 << 20, max_tensors=None, max_ndim=64)
    except FormatError:
        return  # refusing is always allowed (the package may accept: our limits are stricter by design)
    theirs = _reference(body)
    assert theirs is not None, "we accepted a container the safetensors package refuses"
    assert {name: (DTYPE_CODES[t.dtype], list(t.shape), bytes(t.data)) for name, t in ours.items()} == theirs


# ------------------------------------------------------------------------------------------------
# Empty tensors and the recorded dtype


@pytest.mark.parametrize("shape", [[0, 768], [0, 4096], [3, 0], [0, 1 << 32]])
def test_a_tensor_without_elements_may_have_dimensions_beyond_the_body(shape):
    """[0, 768] takes no bytes: the body's size cannot bound its 768. Up to MAX_EMPTY_DIM; the package agrees."""
    body = _container({"vectors": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    assert len(body) < 768
    tensors, _ = parse(body)
    assert tensors["vectors"].shape == tuple(shape) and bytes(tensors["vectors"].data) == b""
    assert safetensors.numpy.load(bytes(body))["vectors"].shape == tuple(shape)


def test_a_tensor_without_elements_is_still_bounded():
    assert isoquant_format.MAX_EMPTY_DIM == 1 << 32
    body = _container({"vectors": {"dtype": "F32", "shape": [0, (1 << 32) + 1], "data_offsets": [0, 0]}})
    with pytest.raises(FormatError) as info:
        parse(body)
    assert info.value.field == "vectors.shape" and "to 4294967296 in a tensor without elements" in info.value.message
    # With elements, the body's size stays the bound (the byte count could not match anyway).
    body = _container({"vectors": {"dtype": "U8", "shape": [1, 200], "data_offsets": [0, 200]}}, b"\0" * 100)
    with pytest.raises(FormatError, match="each from 0 to the body's size"):
        parse(body)


def test_vector_dtype_reads_the_recorded_dtype_and_defaults_to_float32():
    from isoquant_format import DEFAULT_VECTOR_DTYPE, VECTOR_DTYPES, vector_dtype

    assert VECTOR_DTYPES == ("float16", "bfloat16", "float32") and DEFAULT_VECTOR_DTYPE == "float32"
    assert [vector_dtype({"dtype": d}) for d in VECTOR_DTYPES] == list(VECTOR_DTYPES)
    assert vector_dtype({}) == "float32"  # a container written before the key existed
    assert vector_dtype({"dtype": " float16 "}) == "float16"
    for bad in ("float64", "uint8", "", "F16"):
        with pytest.raises(FormatError) as info:
            vector_dtype({"dtype": bad})
        assert info.value.field == "dtype" and "float16, bfloat16, float32" in info.value.message
