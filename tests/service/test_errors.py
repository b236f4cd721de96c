"""Every bad-input class: exact status, the one error shape, the field, and a message that says what is
allowed. Nothing here may produce a 500."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from kernels import Quantizer
from service.app import create_app
from tests.service.conftest import SAFETENSORS, assert_error, b64, running, settings

pytestmark = pytest.mark.anyio

X = torch.randn(4, 128)
GOOD = {"vectors": b64(X.half()), "variant": "full", "bits": 3}


async def _quantized(client, n=4, dim=128, bits=3) -> dict:
    r = await client.post("/quantize", json={"vectors": b64(torch.randn(n, dim)), "variant": "full", "bits": bits})
    assert r.status_code == 200
    return r.json()


async def test_malformed_json(client):
    r = await client.post("/quantize", content=b'{"vectors": [1, 2', headers={"content-type": "application/json"})
    assert_error(r, 400, "malformed_body", "body", "not valid JSON")
    r = await client.post("/quantize", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_error(r, 400, "malformed_body", "body", "JSON object")
    r = await client.post("/quantize", content=b"", headers={"content-type": "application/json"})
    assert_error(r, 400, "malformed_body", "body", "empty")


async def test_malformed_safetensors(client):
    headers = {"content-type": SAFETENSORS}
    assert_error(
        await client.post("/quantize", content=b"\x01\x02", headers=headers), 400, "malformed_body", "body", "shorter"
    )
    huge = struct.pack("<Q", 1 << 40) + b"{}"
    assert_error(
        await client.post("/quantize", content=huge, headers=headers), 400, "malformed_body", "body", "header length"
    )
    bad_json = struct.pack("<Q", 5) + b"{nope"
    assert_error(
        await client.post("/quantize", content=bad_json, headers=headers),
        400,
        "malformed_body",
        "body",
        "not valid JSON",
    )
    # A valid header whose offsets point past the data.
    header = json.dumps({"vectors": {"dtype": "F32", "shape": [2, 128], "data_offsets": [0, 1024]}}).encode()
    truncated = struct.pack("<Q", len(header)) + header + b"\0" * 100
    assert_error(
        await client.post("/quantize", content=truncated, headers=headers),
        400,
        "malformed_body",
        "body",
        "malformed safetensors",
    )


async def test_wrong_content_type(client):
    r = await client.post("/quantize", content=b"vectors=1", headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type", "content-type", "text/plain", "application/json", SAFETENSORS)
    r = await client.post("/dequantize", content=b"x")
    assert_error(r, 415, "unsupported_media_type", "content-type")


async def test_not_acceptable(client):
    r = await client.post("/quantize", json=GOOD, headers={"accept": "text/html"})
    assert_error(r, 406, "not_acceptable", "accept", "text/html")


async def test_body_over_the_limit(client):
    # 4 MiB limit in these tests: refused from Content-Length before the body is read.
    big = b"0" * ((4 << 20) + 1)
    r = await client.post("/quantize", content=big, headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large", "body", str(4 << 20))

    async def chunks():  # no Content-Length: refused while streaming
        for _ in range(5):
            yield b"0" * (1 << 20)

    r = await client.post("/quantize", content=chunks(), headers={"content-type": SAFETENSORS})
    assert_error(r, 413, "payload_too_large", "body", "exceeds the limit")


async def test_slow_body_times_out(monkeypatch):
    from service import codec

    monkeypatch.setattr(codec, "BODY_TIMEOUT_S", 0.3)
    app = create_app(settings(warm_dims=[64]))
    async with running(app) as client:

        async def trickle():
            yield b'{"vectors": '
            await asyncio.sleep(2)
            yield b"[[1.0]]}"

        r = await client.post("/quantize", content=trickle(), headers={"content-type": "application/json"})
        assert_error(r, 408, "request_timeout", "body", "0.3 s")
        assert "isoquant_queue_depth 0.0" in (await client.get("/metrics")).text


async def test_too_many_vectors(client):
    x = torch.zeros(4097, 32, dtype=torch.float16)  # max_vectors=4096 in these tests
    r = await client.post("/quantize", json={"vectors": b64(x), "variant": "full", "bits": 3})
    assert_error(r, 413, "too_many_vectors", "vectors", "4097", "4096")
    r = await client.post("/quantize", json={"vectors": b64(torch.zeros(0, 32)), "variant": "full", "bits": 3})
    assert_error(r, 422, "invalid_value", "vectors", "no vectors")


@pytest.mark.parametrize(
    "request_kwargs, shape",
    [
        ({"json": {"vectors": []}}, "[0]"),  # once "dim 0 is not served"
        ({"json": {"vectors": [[]]}}, "[1, 0]"),
        ({"json": {"vectors": {"data": "", "dtype": "float16", "shape": [0, 768]}}}, "[0, 768]"),
        # An empty .npy of 768-dim vectors as the SDK sends it: once a 400 because 768 exceeded the body's size.
        ({"content": st_save({"vectors": torch.zeros(0, 768)}), "headers": {"content-type": SAFETENSORS}}, "[0, 768]"),
        ({"content": st_save({"vectors": torch.zeros(3, 0)}), "headers": {"content-type": SAFETENSORS}}, "[3, 0]"),
    ],
)
async def test_an_empty_batch_is_a_422_that_says_so(client, request_kwargs, shape):
    r = await client.post("/quantize", **request_kwargs)
    assert_error(r, 422, "invalid_value", "vectors", f"the request holds no vectors (shape {shape}); send at least one")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
async def test_non_finite(client, bad):
    x = torch.randn(6, 64)
    x[4, 7] = bad
    r = await client.post("/quantize", json={"vectors": b64(x), "variant": "full", "bits": 3})
    assert_error(r, 422, "non_finite", "vectors", "NaN or Inf", "[4]")
    r = await client.post(
        "/quantize",
        content=b'{"vectors": [[1, 2, 3, NaN]], "variant": "2d", "bits": 2}',
        headers={"content-type": "application/json"},
    )
    # Python's JSON reads NaN; the value is refused by the same check.
    assert r.status_code == 422 and r.json()["error"]["field"] == "vectors"


async def test_norm_overflow(client):
    x = torch.full((2, 64), 6e4, dtype=torch.float16)  # finite fp16 values; the norm overflows no fp32
    big = torch.full((2, 64), 3e38)  # but here it does
    assert (await client.post("/quantize", json={"vectors": b64(x), "bits": 3})).status_code == 200
    r = await client.post("/quantize", json={"vectors": b64(big), "bits": 3})
    assert_error(r, 422, None, "vectors", "overflows float32")


async def test_ragged_and_non_numeric_lists(client):
    r = await client.post("/quantize", json={"vectors": [[1.0] * 64, [1.0] * 63], "bits": 3})
    assert_error(r, 422, "invalid_value", "vectors", "ragged")
    r = await client.post("/quantize", json={"vectors": [["a"] * 64], "bits": 3})
    assert_error(r, 422, "invalid_value", "vectors", "only numbers")
    r = await client.post("/quantize", json={"vectors": "AAAA", "bits": 3})
    assert_error(r, 422, "invalid_value", "vectors", "array object")
    r = await client.post("/quantize", json={"vectors": [[1e39] * 64], "bits": 3})
    assert_error(r, 422, "non_finite", "vectors", "NaN or Inf")


@pytest.mark.parametrize(
    "change, field, fragments",
    [
        ({"variant": "rotor"}, "variant", ["'rotor'", "full, fast, 2d, dense, hadamard, identity, kronecker"]),
        ({"bits": 9}, "bits", ["9", "1, 2, 3, 4, 5, 6, 7, 8"]),
        ({"bits": "three"}, "bits", ["bits"]),
        ({"vectors": b64(torch.randn(2, 4100))}, "vectors", ["dim 4100 is not served; allowed: 2-4096"]),
        ({"vectors": [[1.0]]}, "vectors", ["dim 1 is not served; allowed: 2-4096"]),
        ({"vectors": b64(torch.randn(2, 64).double())}, "vectors.dtype", ["float64", "float16, bfloat16, float32"]),
        ({"seed": -1}, "seed", ["2^64-1"]),
        ({"seed": 1 << 64}, "seed", ["2^64-1"]),
    ],
)
async def test_unsupported_values(client, change, field, fragments):
    body = {**GOOD, **change}
    if field == "vectors.dtype":
        body["vectors"]["dtype"] = "float64"  # b64 helper wrote the torch name
    error = assert_error(await client.post("/quantize", json=body), 422, None, field, *fragments)
    assert error["type"] in ("unsupported_value", "invalid_value")


async def test_unknown_and_missing_fields(client):
    assert_error(await client.post("/quantize", json={**GOOD, "bit": 3}), 422, "unknown_field", "bit", "not a known")
    assert_error(await client.post("/quantize", json={"variant": "full"}), 422, "missing_field", "vectors")
    r = await client.post("/quantize", json={**GOOD, "vectors": {"data": "", "dtype": "float32"}})
    assert_error(r, 422, "missing_field", "vectors.shape")


async def test_bad_base64_and_sizes(client):
    vec = b64(torch.randn(2, 64))
    r = await client.post("/quantize", json={**GOOD, "vectors": {**vec, "data": "!" * len(vec["data"])}})
    assert_error(r, 422, "invalid_value", "vectors.data", "not valid base64")
    r = await client.post("/quantize", json={**GOOD, "vectors": {**vec, "data": vec["data"][:-8]}})
    assert_error(r, 422, "invalid_value", "vectors.data", "truncated")
    r = await client.post("/quantize", json={**GOOD, "vectors": {**vec, "shape": [2, -64]}})
    assert_error(r, 422, "invalid_value", "vectors.shape", "non-negative")


async def test_truncated_codes_and_wrong_dim(client):
    q = await _quantized(client)
    codes = base64.b64decode(q["codes"]["data"])
    short = {"data": base64.b64encode(codes[:-1]).decode(), "dtype": "uint8", "shape": [4, 48]}
    assert_error(
        await client.post("/dequantize", json={**q, "codes": short}), 422, "invalid_value", "codes.data", "truncated"
    )
    # Codes of 47 bytes a vector: not the 48 that dim=128, bits=3 needs.
    cut = {"data": base64.b64encode(codes[: 4 * 47]).decode(), "dtype": "uint8", "shape": [4, 47]}
    assert_error(
        await client.post("/dequantize", json={**q, "codes": cut}), 422, "shape_mismatch", "codes.shape", "[..., 48]"
    )
    # Claiming dim 64 for codes of dim 128 changes the expected width too.
    wrong_dim = {**q, "quantizer": {**q["quantizer"], "dim": 64}}
    assert_error(await client.post("/dequantize", json=wrong_dim), 422, "shape_mismatch", "codes.shape", "dim=64")
    norms = {"data": base64.b64encode(b"\0" * 12).decode(), "dtype": "float32", "shape": [3]}
    assert_error(
        await client.post("/dequantize", json={**q, "norms": norms}), 422, "shape_mismatch", "norms.shape", "[4]"
    )
    codes_f16 = {**q["codes"], "dtype": "float16"}
    assert_error(
        await client.post("/dequantize", json={**q, "codes": codes_f16}), 422, "invalid_value", "codes.dtype", "uint8"
    )
    assert_error(
        await client.post("/dequantize", json={**q, "dtype": "int8"}),
        422,
        "unsupported_value",
        "dtype",
        "float16, bfloat16, float32",
    )
    ref = b64(torch.randn(4, 64))
    assert_error(
        await client.post("/dequantize", json={**q, "reference": ref}), 422, "shape_mismatch", "reference", "[4, 128]"
    )


async def test_wrong_fingerprint(client):
    q = await _quantized(client)
    bad = {**q, "quantizer": {**q["quantizer"], "fingerprint": "0123456789abcdef"}}
    server = Quantizer("full", 128, 3).fingerprint
    assert_error(
        await client.post("/dequantize", json=bad),
        422,
        "fingerprint_mismatch",
        "quantizer.fingerprint",
        "0123456789abcdef",
        server,
    )
    # Codes made with seed 0 presented as seed 5: the fingerprint no longer matches seed 5's quantizer.
    other_seed = {**q, "quantizer": {**q["quantizer"], "seed": 5}}
    assert_error(
        await client.post("/dequantize", json=other_seed), 422, "fingerprint_mismatch", "quantizer.fingerprint"
    )
    version = {**q, "quantizer": {**q["quantizer"], "format_version": 99}}
    assert_error(
        await client.post("/dequantize", json=version), 422, "format_mismatch", "quantizer.format_version", "99"
    )
    missing = {**q, "quantizer": {k: v for k, v in q["quantizer"].items() if k != "fingerprint"}}
    assert_error(await client.post("/dequantize", json=missing), 422, "missing_field", "quantizer.fingerprint")


async def test_non_finite_norms_and_reference_in_dequantize(client):
    """NaN norms and a NaN reference each get their own 422; with something else wrong too, the reference's
    error comes first, as it did before the service's jobs deferred the check to after their one sync."""
    q = await _quantized(client)
    norms = torch.ones(4)
    norms[2] = float("nan")
    ref = torch.randn(4, 128)
    ref[1, 3] = float("inf")
    bad_norms, bad_ref = {**q, "norms": b64(norms)}, {**q, "reference": b64(ref)}
    assert_error(await client.post("/dequantize", json=bad_norms), 422, "non_finite", "norms", "NaN or Inf", "[2]")
    assert_error(await client.post("/dequantize", json=bad_ref), 422, "non_finite", "reference", "NaN or Inf")
    assert_error(
        await client.post("/dequantize", json={**bad_ref, "norms": b64(norms)}), 422, "non_finite", "reference"
    )
    wrong = {**bad_ref, "quantizer": {**q["quantizer"], "fingerprint": "0123456789abcdef"}}
    assert_error(await client.post("/dequantize", json=wrong), 422, "non_finite", "reference")
    ok = await client.post("/dequantize", json={**q, "reference": b64(torch.randn(4, 128))})
    assert ok.status_code == 200 and "distortion" in ok.json()


async def test_safetensors_field_errors(client):
    headers = {"content-type": SAFETENSORS}
    r = await client.post("/quantize", content=st_save({"x": torch.randn(2, 64)}), headers=headers)
    assert_error(r, 422, "missing_field", "vectors", "'vectors'")
    r = await client.post("/quantize", content=st_save({"vectors": torch.randn(2, 64).double()}), headers=headers)
    assert_error(r, 422, None, "vectors", "F64")
    r = await client.post(
        "/quantize", content=st_save({"vectors": torch.randn(2, 64)}, metadata={"bits": "three"}), headers=headers
    )
    assert_error(r, 422, "invalid_value", "bits", "integer")
    r = await client.post(
        "/quantize", content=st_save({"vectors": torch.randn(2, 64)}, metadata={"variant": "x"}), headers=headers
    )
    assert_error(r, 422, "unsupported_value", "variant", "full, fast")
    r = await client.post(
        "/dequantize",
        content=st_save(
            {"codes": torch.zeros(2, 24, dtype=torch.uint8), "norms": torch.ones(2)}, metadata={"variant": "full"}
        ),
        headers=headers,
    )
    assert_error(r, 422, "missing_field", "fingerprint", "descriptor")


async def test_unknown_route_and_method(client):
    assert_error(await client.get("/nope"), 404, "not_found", None)
    assert_error(await client.get("/quantize"), 405, "method_not_allowed", None)
    assert_error(
        await client.get("/quantizer", params={"variant": "full", "dim": "x", "bits": 3}), 422, "invalid_value", "dim"
    )
    assert_error(
        await client.get("/quantizer", params={"variant": "full", "dim": 5000, "bits": 3}),
        422,
        "unsupported_value",
        "dim",
        "dim 5000 is not served; allowed: 2-4096",
    )


async def test_client_disconnect_mid_body_is_not_a_500(app):
    """A client that goes away mid-body gets a 400 (nobody reads it) and its queue place back."""
    received = []

    async def receive():
        if not received:
            received.append(1)
            return {"type": "http.request", "body": b'{"vec', "more_body": True}
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/quantize", "raw_path": b"/quantize", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
        "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": "",
    }  # fmt: skip
    await app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert b"disconnected before the body was complete" in sent[1]["body"]
    assert "isoquant_queue_depth 0.0" in (await app.state.test_client.get("/metrics")).text


@pytest.mark.parametrize("content_type", [b"application/json", SAFETENSORS.encode()])
async def test_negative_content_length_is_a_400(app, content_type):
    """uvicorn refuses a negative Content-Length itself; behind another server the route does (400 naming
    content-length, not a 500 or a 503 from allocating a negative buffer), in both body formats."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/quantize", "raw_path": b"/quantize", "query_string": b"",
        "headers": [(b"content-type", content_type), (b"content-length", b"-5")],
        "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": "",
    }  # fmt: skip
    await app(scope, receive, send)
    assert sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error["type"] == "malformed_body" and error["field"] == "content-length" and "negative" in error["message"]


# ---------------------------------------------------------------------------------------------------
# Bodies that were answered 500, and JSON that was coerced silently


async def test_zero_size_tensor_at_a_misaligned_offset_is_not_a_500(client):
    body = struct.pack("<Q", 63) + b'{"vectors":{"dtype":"F16","shape":[0,4],"data_offsets":[0,0]}} '
    response = await client.post("/quantize", content=body, headers={"content-type": SAFETENSORS})
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["field"] is not None


async def test_unpaired_surrogate_in_a_tensor_name_is_a_400(client):
    header = b'{"a\\ud800":{"dtype":"F64","shape":[1,4],"data_offsets":[0,32]}}'
    body = struct.pack("<Q", len(header)) + header + bytes(32)
    response = await client.post("/quantize", content=body, headers={"content-type": SAFETENSORS})
    assert_error(response, 400, "malformed_body", "body", "unpaired surrogate")


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"bits": True}, "bits"),
        ({"bits": "3"}, "bits"),
        ({"bits": 3.0}, "bits"),
        ({"seed": True}, "seed"),
        ({"return_distortion": "yes"}, "return_distortion"),
        ({"vectors": {"data": "", "dtype": "float32", "shape": [True, 64]}}, "vectors.shape.0"),
    ],
)
async def test_json_types_are_strict(client, changes, field):
    request = {"vectors": [[1.0] * 64], **changes}
    assert_error(await client.post("/quantize", json=request), 422, "invalid_value", field)


async def test_descriptor_types_are_strict(client):
    answer = (await client.post("/quantize", json={"vectors": [[1.0] * 64]})).json()
    answer["quantizer"]["format_version"] = True
    assert_error(await client.post("/dequantize", json=answer), 422, "invalid_value", "quantizer.format_version")


async def test_an_unexpected_error_is_a_500_in_the_error_shape_that_closes_the_connection(monkeypatch):
    app = create_app(settings())

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    async with running(app):  # ready, warm-up done
        monkeypatch.setattr("service.codec.nested_to_tensor", broken)  # a bug outside every mapped error
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://isoquant.test") as client:
            response = await client.post("/quantize", json={"vectors": [[1.0] * 64]})
    assert_error(response, 500, "internal_error", None, "RuntimeError")
    assert response.headers["connection"] == "close"
