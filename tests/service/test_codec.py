"""codec: arrays survive base64 and safetensors unchanged for every dtype and shape; content negotiation."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service import codec
from service.errors import InvalidInput, MalformedBody, NotAcceptable, UnsupportedMediaType

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.uint8]


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_array_round_trip_is_exact(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) * torch.empty((), dtype=dtype).element_size(),),
                        generator=g, dtype=torch.uint8)  # fmt: skip
    t = raw.view(dtype).reshape(shape) if raw.numel() else torch.empty(shape, dtype=dtype)
    array = codec.tensor_to_array(t)
    back = codec.array_to_tensor(array, "x", tuple(codec.DTYPES))
    assert back.dtype == dtype and list(back.shape) == shape
    assert back.reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist()  # NaN-safe
    tensors, meta = codec.parse_safetensors(codec.dump_safetensors({"t": t}, {"k": 1, "f": 0.5, "b": True}))
    assert torch.equal(tensors["t"].view(torch.uint8), t.contiguous().view(torch.uint8))
    assert meta == {"k": "1", "f": "0.5", "b": "true"}


def test_nested_lists():
    assert codec.nested_to_tensor([[1, 2.5], [3, 4]], "v").tolist() == [[1.0, 2.5], [3.0, 4.0]]
    assert codec.nested_to_tensor([[1e39]], "v").isinf().all()
    for bad in ([[1, 2], [3]], [["a"]], [[None]], [[True, False]], 5):
        with pytest.raises(InvalidInput) as info:
            codec.nested_to_tensor(bad, "v")
        assert info.value.field == "v"


@pytest.mark.parametrize(
    "content_type, expected",
    [("application/json", "json"), ("application/json; charset=utf-8", "json"), ("application/vnd.x+json", "json"),
     ("application/x-safetensors", "safetensors"), ("application/octet-stream", "safetensors")],
)  # fmt: skip
def test_request_format(content_type, expected):
    assert codec.request_format(content_type) == expected


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "multipart/form-data"])
def test_request_format_refuses(content_type):
    with pytest.raises(UnsupportedMediaType):
        codec.request_format(content_type)


@pytest.mark.parametrize(
    "accept, request_fmt, expected",
    [
        (None, "json", "json"),
        ("*/*", "safetensors", "safetensors"),
        ("application/x-safetensors", "json", "safetensors"),
        ("application/json;q=0.5, application/x-safetensors", "json", "safetensors"),
        ("application/x-safetensors;q=0, application/json", "safetensors", "json"),
        ("text/html, application/*;q=0.1", "json", "json"),
    ],
)
def test_response_format(accept, request_fmt, expected):
    assert codec.response_format(accept, request_fmt) == expected


def test_response_format_refuses():
    with pytest.raises(NotAcceptable):
        codec.response_format("text/html, image/png", "json")


def _container(entries: dict, data: bytes, pad_to: int = 8) -> bytearray:
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % pad_to)
    return bytearray(struct.pack("<Q", len(header)) + header + data)


def test_parse_safetensors_views_the_body_without_copies():
    """The tensors share the body's memory (what keeps a 16 MiB request at one copy: socket -> buffer)."""
    x = torch.randn(3, 8).to(torch.float16)
    body = torch.frombuffer(bytearray(codec.dump_safetensors({"vectors": x}, {"bits": 3})), dtype=torch.uint8)
    tensors, meta = codec.parse_safetensors(body)
    vectors = tensors["vectors"]
    assert torch.equal(vectors, x) and meta == {"bits": "3"}
    start = body.data_ptr()
    assert start <= vectors.data_ptr() < start + body.numel()


def test_parse_safetensors_aligns_an_unpadded_header_by_copying():
    """A writer that does not pad its header to 8 bytes still parses: misaligned tensors are copied."""
    norms = torch.tensor([1.5, -2.0, 3.25])
    body = _container({"norms": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, norms.numpy().tobytes(), 1)
    header_len = len(body) - 8 - 12
    body = bytearray(struct.pack("<Q", header_len + 1)) + body[8 : 8 + header_len] + b" " + body[8 + header_len :]
    assert (8 + header_len + 1) % 4  # the data starts off a 4-byte boundary
    tensors, _ = codec.parse_safetensors(body)
    assert tensors["norms"].tolist() == [1.5, -2.0, 3.25]
    assert tensors["norms"].data_ptr() % 4 == 0


@pytest.mark.parametrize(
    "entries, data_len, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, "needs 8 bytes"),
        ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, 4, "starts at byte 2"),
        ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
          "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, 4, "starts at byte 2"),
        ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, 6, "cover 2 bytes of data, the body holds 6"),
        ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, 1, "cover 2 bytes of data, the body holds 1"),
        ({"a": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}}, 2, "shape"),
        ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 0]}}, 2, "data_offsets"),
        ({"a": {"dtype": "U8", "shape": [2], "data_offsets": "0-2"}}, 2, "data_offsets"),
        ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 10**4000]}}, 2, "data_offsets"),
        # Hostile shapes: dimensions beyond the body (huge integers), zero-size with a 2^63 dimension,
        # more than 8 dimensions.
        ({"a": {"dtype": "U8", "shape": [10**4000] * 10, "data_offsets": [0, 2]}}, 2, "at most 8 dimensions"),
        ({"a": {"dtype": "U8", "shape": [0, 2**63, 64], "data_offsets": [0, 0]}}, 0, "each from 0 to the body"),
        ({"a": {"dtype": "U8", "shape": [1] * 9, "data_offsets": [0, 1]}}, 1, "at most 8 dimensions"),
        ({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(17)}, 0, "at most 16"),
        ({"__metadata__": False, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, 1, "__metadata__"),
    ],
)  # fmt: skip
def test_parse_safetensors_refuses_bad_layouts(entries, data_len, message):
    """Gaps, overlaps, sizes that disagree with the shape, data short or long: 400 naming the tensor."""
    with pytest.raises(MalformedBody) as info:
        codec.parse_safetensors(_container(entries, b"\0" * data_len))
    assert info.value.field == "body" and message in info.value.message


def test_safetensors_parts_are_views_of_the_tensors():
    """The answer's tensor bytes are sent from the tensors' own memory: parts after the header share it."""
    codes = torch.randint(0, 256, (5, 48), dtype=torch.uint8)
    norms = torch.rand(5)
    parts = codec.safetensors_parts({"codes": codes, "norms": norms}, {"bits": 3})
    assert len(parts) == 3 and bytes(parts[1]) == codes.numpy().tobytes() and bytes(parts[2]) == norms.numpy().tobytes()
    assert np.shares_memory(np.asarray(parts[1]), codes.numpy())
    assert np.shares_memory(np.asarray(parts[2]), norms.numpy())
    tensors, meta = codec.parse_safetensors(b"".join(parts))
    assert torch.equal(tensors["codes"], codes) and torch.equal(tensors["norms"], norms) and meta == {"bits": "3"}


def test_safetensors_parts_of_strided_scalar_and_bfloat16_tensors_hold_their_c_order_values():
    """A transposed tensor goes out in C order, a 0-dim or empty tensor as its 2 or 0 bytes, bfloat16 (which
    numpy has no dtype for) as its raw little-endian bits."""
    base = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    tensors = {
        "strided": base.t(),
        "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
        "bf16": torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.bfloat16),
        "empty": torch.empty(0, 4),
    }
    parts = codec.safetensors_parts(tensors, {})
    assert [bytes(p) for p in parts[1:]] == [
        base.t().contiguous().numpy().tobytes(),
        struct.pack("<H", 0x3FC0),  # bfloat16 1.5: the high half of float32 0x3FC00000
        struct.pack("<4H", 0x3F80, 0xC000, 0x3F00, 0x4040),
    ]  # (the empty tensor has no part)
    back, _ = codec.parse_safetensors(b"".join(parts))
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t)


def test_parse_safetensors_refuses_deep_nesting_and_non_string_dtypes():
    """A header nested too deeply for the JSON parser is a 400, not a RecursionError; a dtype that is not
    a string is a 422 naming the tensor, not a TypeError."""
    nested = b"[" * 60000
    body = bytearray(struct.pack("<Q", len(nested)) + nested)
    with pytest.raises(MalformedBody) as info:
        codec.parse_safetensors(body)
    assert "not valid JSON" in info.value.message
    with pytest.raises(InvalidInput) as info:
        codec.parse_safetensors(_container({"vectors": {"dtype": [1], "shape": [1], "data_offsets": [0, 1]}}, b"\0"))
    assert info.value.field == "vectors" and "F16" not in info.value.message and "float16" in info.value.message
    with pytest.raises(MalformedBody):
        codec.parse_json(b"[" * 60000)


@pytest.mark.parametrize("shape", [[0, 768], [0, 4096], [2, 0, 1536], [0]])
def test_parse_safetensors_takes_an_empty_batch_of_any_dim(shape):
    """A tensor without elements takes no bytes, so a small body may hold a [0, 768] batch: it parses (and the
    route answers 422 "no vectors"), where the body's size once bounded every dimension (a 400)."""
    body = codec.dump_safetensors({"vectors": torch.zeros(shape)}, {"variant": "full"})
    assert len(body) < 768
    tensors, meta = codec.parse_safetensors(body)
    assert list(tensors["vectors"].shape) == shape and meta == {"variant": "full"}
    header = json.dumps({"vectors": {"dtype": "F32", "shape": [0, (1 << 32) + 1], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(MalformedBody, match="without elements"):  # still bounded: 2^32 at most
        codec.parse_safetensors(struct.pack("<Q", len(header)) + header)
