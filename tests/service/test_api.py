"""The API surface in process: /quantize, /dequantize, /quantizer, /info, /docs, auth, formats."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from fastapi import Header, Request
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kernels import Packed, Quantizer
from service.app import create_app
from tests.service.conftest import SAFETENSORS, assert_error, b64, running, settings, unb64

pytestmark = pytest.mark.anyio


def _vectors(n: int, dim: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dim, generator=g) * 3).to(dtype)


async def test_quantize_json_matches_library(client):
    x = _vectors(37, 128)
    r = await client.post("/quantize", json={"vectors": b64(x), "variant": "full", "bits": 3})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    q = Quantizer("full", 128, 3, 0)
    packed = q.quantize(x)
    assert body["quantizer"] == q.descriptor()
    codes, norms = unb64(body["codes"]), unb64(body["norms"])
    assert codes.dtype == torch.uint8 and list(codes.shape) == [37, q.code_bytes]
    assert codes.numpy().tobytes() == packed.codes.numpy().tobytes()
    assert torch.equal(norms, packed.norms)
    assert body["shape"] == [37, 128] and body["dtype"] == "float16"
    assert body["bytes_in"] == 37 * 128 * 2
    assert body["bytes_out"] == 37 * q.code_bytes + 37 * 4
    assert body["compression_ratio"] == pytest.approx(body["bytes_in"] / body["bytes_out"])
    assert "reconstruction" not in body and "distortion" not in body


async def test_nested_lists_are_float32(client):
    x = _vectors(5, 64, torch.float32)
    r = await client.post("/quantize", json={"vectors": x.tolist(), "variant": "2d", "bits": 3})
    assert r.status_code == 200, r.text
    packed = Quantizer("2d", 64, 3).quantize(x)
    assert unb64(r.json()["codes"]).numpy().tobytes() == packed.codes.numpy().tobytes()
    assert r.json()["bytes_in"] == 5 * 64 * 4 and r.json()["dtype"] == "float32"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", ["full", "fast", "2d"])
async def test_json_and_safetensors_give_identical_codes(client, variant, dtype):
    x = _vectors(3 * 17, 128, dtype, seed=7).reshape(3, 17, 128)  # leading shape [3, 17] is kept
    j = await client.post("/quantize", json={"vectors": b64(x), "variant": variant, "bits": 4, "seed": 11})
    body = st_save({"vectors": x}, metadata={"variant": variant, "bits": "4", "seed": "11"})
    s = await client.post("/quantize", content=body, headers={"content-type": SAFETENSORS})
    assert j.status_code == 200 and s.status_code == 200, (j.text, s.text[:300])
    assert s.headers["content-type"] == SAFETENSORS
    binary = st_load(s.content)
    codes_json = unb64(j.json()["codes"])
    assert list(binary["codes"].shape) == [3, 17, codes_json.shape[-1]]
    assert binary["codes"].numpy().tobytes() == codes_json.numpy().tobytes()
    assert binary["norms"].numpy().tobytes() == unb64(j.json()["norms"]).numpy().tobytes()
    meta = _metadata(s.content)
    assert {k: meta[k] for k in ("variant", "dim", "bits", "seed", "fingerprint", "format_version")} == {
        k: str(v) for k, v in j.json()["quantizer"].items()
    }
    assert json.loads(meta["shape"]) == [3, 17, 128]
    assert float(meta["compression_ratio"]) == pytest.approx(j.json()["compression_ratio"])


def _metadata(container: bytes) -> dict:
    n = int.from_bytes(container[:8], "little")
    return json.loads(container[8 : 8 + n])["__metadata__"]


async def test_accept_header_picks_the_response_format(client):
    x = _vectors(4, 64)
    r = await client.post(
        "/quantize", json={"vectors": b64(x), "variant": "fast", "bits": 3}, headers={"accept": SAFETENSORS}
    )
    assert r.status_code == 200 and r.headers["content-type"] == SAFETENSORS
    assert st_load(r.content)["codes"].shape == (4, 24)
    body = st_save({"vectors": x}, metadata={"variant": "fast", "bits": "3"})
    r = await client.post(
        "/quantize", content=body, headers={"content-type": SAFETENSORS, "accept": "text/html;q=0.9, application/json"}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"


async def test_dequantize_of_quantize_json_response_equals_library(client):
    x = _vectors(33, 128, torch.float32, seed=3)
    r = await client.post(
        "/quantize", json={"vectors": b64(x), "variant": "full", "bits": 3, "return_reconstruction": True}
    )
    assert r.status_code == 200
    d = await client.post("/dequantize", content=r.content, headers={"content-type": "application/json"})
    assert d.status_code == 200, d.text
    q = Quantizer("full", 128, 3)
    expected = q.dequantize(q.quantize(x))
    got = unb64(d.json()["vectors"])
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    # The fused round trip's reconstruction is the same numbers.
    assert torch.allclose(unb64(r.json()["reconstruction"]), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
async def test_dequantize_of_quantize_safetensors_response(client, dtype):
    x = _vectors(20, 64, torch.bfloat16, seed=5)
    r = await client.post(
        "/quantize",
        content=st_save({"vectors": x}, metadata={"variant": "2d", "bits": "2"}),
        headers={"content-type": SAFETENSORS},
    )
    assert r.status_code == 200
    # The /quantize container records its input's dtype; a dtype in the metadata asks for another.
    assert _metadata(r.content)["dtype"] == "bfloat16"
    tensors, meta = st_load(r.content), {**_metadata(r.content), "dtype": dtype}
    d = await client.post("/dequantize", content=st_save(tensors, metadata=meta), headers={"content-type": SAFETENSORS})
    assert d.status_code == 200, d.text[:300]
    q = Quantizer("2d", 64, 2)
    expected = q.dequantize(q.quantize(x), getattr(torch, dtype))
    assert torch.equal(st_load(d.content)["vectors"], expected)


async def test_distortion_matches_recomputation(client):
    x = _vectors(300, 256, torch.float32, seed=9)
    x[5] = 0  # a zero vector has relative error 0 by definition
    r = await client.post(
        "/quantize",
        json={
            "vectors": b64(x),
            "variant": "fast",
            "bits": 2,
            "return_reconstruction": True,
            "return_distortion": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    x_hat = unb64(body["reconstruction"]).double()
    err = (x.double() - x_hat).square().sum(-1)
    norms = x.double().norm(dim=-1)
    rel = torch.where(norms > 0, err.sqrt() / norms, torch.zeros_like(norms))
    stats = body["distortion"]
    assert stats["mse"] == pytest.approx(float(err.sum()) / x.numel(), rel=1e-5)
    assert stats["mean_relative_error"] == pytest.approx(float(rel.mean()), rel=1e-5)
    assert stats["max_relative_error"] == pytest.approx(float(rel.max()), rel=1e-5)
    # 2 bits in dim 256: the expected squared error of a unit vector is ~0.1167 (METHOD.md).
    assert 0.25 < stats["mean_relative_error"] < 0.45

    # /dequantize with the reference: statistics of the returned vectors against it.
    req = {
        "quantizer": body["quantizer"],
        "codes": body["codes"],
        "norms": body["norms"],
        "reference": b64(x),
        "dtype": "float16",
    }
    d = await client.post("/dequantize", json=req)
    assert d.status_code == 200, d.text
    out = unb64(d.json()["vectors"])
    assert out.dtype == torch.float16
    err = (x.double() - out.double()).square().sum(-1)
    rel = torch.where(norms > 0, err.sqrt() / norms, torch.zeros_like(norms))
    assert d.json()["distortion"]["mse"] == pytest.approx(float(err.sum()) / x.numel(), rel=1e-6)
    assert d.json()["distortion"]["mean_relative_error"] == pytest.approx(float(rel.mean()), rel=1e-6)
    assert d.json()["distortion"]["max_relative_error"] == pytest.approx(float(rel.max()), rel=1e-6)


async def test_safetensors_distortion_and_reconstruction(client):
    x = _vectors(64, 128, torch.float16, seed=2)
    body = st_save(
        {"vectors": x},
        metadata={"variant": "full", "bits": "4", "return_reconstruction": "true", "return_distortion": "true"},
    )
    r = await client.post("/quantize", content=body, headers={"content-type": SAFETENSORS})
    assert r.status_code == 200
    tensors, meta = st_load(r.content), _metadata(r.content)
    assert set(tensors) == {"codes", "norms", "reconstruction"}
    err = (x.double() - tensors["reconstruction"].double()).square().sum(-1)
    assert float(meta["mse"]) == pytest.approx(float(err.sum()) / x.numel(), rel=1e-5)


async def test_single_vector_and_seeds(app, client):
    x = _vectors(1, 64, torch.float32)[0]  # shape [dim]: one vector, leading shape []
    fingerprints = set()
    for seed in (1, 2, 3):
        r = await client.post("/quantize", json={"vectors": b64(x), "variant": "full", "bits": 3, "seed": seed})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["norms"]["shape"] == [] and body["codes"]["shape"] == [24]
        q = Quantizer("full", 64, 3, seed)
        assert body["quantizer"]["fingerprint"] == q.fingerprint
        assert unb64(body["codes"]).numpy().tobytes() == q.quantize(x).codes.numpy().tobytes()
        fingerprints.add(body["quantizer"]["fingerprint"])
    assert len(fingerprints) == 3
    # seed_cache_size=2 in these tests: the LRU keeps the last two non-default seeds only.
    assert app.state.isoquant.engine.resident_count()["other_seeds"] == 2
    info = (await client.get("/info")).json()
    assert info["quantizers_resident"]["other_seeds"] == 2


async def test_quantizer_parameters_reproduce_the_fingerprint(client):
    """GET /quantizer gives enough to recompute the fingerprint (docs/FORMAT.md) from the JSON alone."""
    for variant, names in (("full", ("q_left", "q_right")), ("fast", ("q_left",)), ("2d", ("theta",))):
        r = await client.get("/quantizer", params={"variant": variant, "dim": 96, "bits": 3, "seed": 5})
        assert r.status_code == 200, r.text
        p = r.json()
        digest = hashlib.sha256(f"isoquant\0{p['format_version']}\0{variant}\0{96}\0{3}\0{5}\0".encode())
        arrays = [np.asarray(p["parameters"][n], dtype=np.float64) for n in names]
        arrays.append(np.asarray(p["codebook"]["centroids"], dtype=np.float64))
        for a in arrays:
            digest.update(np.round(a.reshape(-1) * float(1 << 24)).astype("<i8").tobytes())
        assert digest.hexdigest()[:16] == p["fingerprint"] == Quantizer(variant, 96, 3, 5).fingerprint
        c, t = p["codebook"]["centroids"], p["codebook"]["boundaries"]
        assert len(c) == 8 and t == pytest.approx([(a + b) / 2 for a, b in zip(c, c[1:], strict=False)], rel=1e-6)
        assert p["code_bytes"] == -(-p["n_coded"] * 3 // 8)


async def test_info_and_docs(client):
    info = (await client.get("/info")).json()
    assert info["device"] == "cpu" and info["backend"] == "torch" and info["ready"] is True
    assert info["variants"] == ["full", "fast", "2d", "dense", "hadamard", "identity", "kronecker"]
    assert info["dtypes"] == ["float16", "bfloat16", "float32"] and info["dims"] == "2-4096" and info["bits"][0] == 1
    assert info["warm_set"] == {
        "variants": ["full", "fast", "2d"],
        "dims": [64, 128],
        "bits": [3],
        "dtypes": ["float16", "float32"],
    }
    assert info["limits"]["max_vectors"] == 4096 and info["versions"]["torch"] == torch.__version__
    presets = info["kv_cache_presets"]
    assert list(presets) == ["kv-4.5", "kv-3.5", "kv-2.5"]
    assert presets["kv-3.5"]["key_variant"] == "hadamard" and presets["kv-3.5"]["key_bits"] == 3
    assert presets["kv-3.5"]["value_bits"] == 2 and presets["kv-3.5"]["window"] == 64
    assert (await client.get("/docs")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    content = schema["paths"]["/quantize"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", SAFETENSORS}
    assert "QuantizeRequest" in schema["components"]["schemas"]
    assert "ErrorBody" in schema["components"]["schemas"]


async def test_api_key():
    app = create_app(settings(api_key="s3cret", warm_variants=[], warm_dims=[], warm_bits=[], warm_dtypes=[]))
    async with running(app) as client:
        x = {"vectors": b64(_vectors(2, 64)), "variant": "full", "bits": 3}
        assert_error(await client.post("/quantize", json=x), 401, "unauthorized", "authorization", "missing")
        r = await client.post("/quantize", json=x, headers={"authorization": "Bearer wrong"})
        e = assert_error(r, 401, "unauthorized", "authorization", "invalid API key")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert_error(
            await client.get("/info", headers={"authorization": "Basic czNjcmV0"}),
            401,
            "unauthorized",
            "authorization",
            "Bearer",
        )
        assert (await client.post("/quantize", json=x, headers={"authorization": "Bearer s3cret"})).status_code == 200
        # Probes and scrapes stay open.
        assert (await client.get("/health/ready")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        assert e["message"]


def test_op_routes_middleware_refuses_a_dependency_it_would_skip():
    """The middleware runs only the API-key check before an op route's endpoint: a route that needs more
    stops the app from being built, naming the route and the dependency."""
    from fastapi import Depends
    from fastapi.routing import APIRoute

    from service.app import OpRoutesMiddleware
    from service.routes.common import authorized

    async def rate_limited() -> None: ...

    async def endpoint(request: Request) -> None: ...

    fine = APIRoute("/quantize", endpoint, methods=["POST"], dependencies=[Depends(authorized)])
    assert OpRoutesMiddleware(None, [fine], None).routes == {"/quantize": fine}
    more = APIRoute("/quantize", endpoint, methods=["POST"], dependencies=[Depends(authorized), Depends(rate_limited)])
    with pytest.raises(ValueError, match=r"/quantize: .*\['rate_limited'\]"):
        OpRoutesMiddleware(None, [more], None)

    async def with_header(request: Request, x_tenant: str = Header()) -> None: ...

    header = APIRoute("/dequantize", with_header, methods=["POST"], dependencies=[Depends(authorized)])
    with pytest.raises(ValueError, match="/dequantize: .* also needs parameters"):
        OpRoutesMiddleware(None, [header], None)


async def test_op_paths_keep_fastapis_answers_for_other_methods(client):
    """Only POST /quantize and /dequantize take the middleware's way: another method gets FastAPI's 405 in the
    one error shape, and an op answered on the short way is counted under its route template."""
    assert_error(await client.get("/quantize"), 405, "method_not_allowed", None, "Method Not Allowed")
    assert_error(await client.put("/dequantize", content=b"x"), 405, "method_not_allowed", None, "Method Not Allowed")
    x = _vectors(3, 64)
    body = st_save({"vectors": x}, metadata={"variant": "full", "bits": "2"})
    r = await client.post("/quantize", content=body, headers={"content-type": SAFETENSORS})
    assert r.status_code == 200
    metrics = (await client.get("/metrics")).text
    assert 'isoquant_requests_total{method="POST",route="/quantize",status="200"}' in metrics


async def test_packed_from_response_decodes_with_library(client):
    """A client holding only the JSON response can decode with the library (the format is the contract)."""
    x = _vectors(9, 128, torch.float32, seed=4)
    body = (await client.post("/quantize", json={"vectors": b64(x), "variant": "fast", "bits": 4})).json()
    q = Quantizer("fast", 128, 4)
    packed = Packed(codes=unb64(body["codes"]), norms=unb64(body["norms"]), **body["quantizer"])
    assert torch.equal(q.dequantize(packed), q.dequantize(q.quantize(x)))


async def test_openapi_describes_every_answer_and_the_served_values(client):
    schema = (await client.get("/openapi.json")).json()
    info = (await client.get("/info")).json()
    for path in ("/quantize", "/dequantize"):
        answers = schema["paths"][path]["post"]["responses"]
        assert {"application/json", "application/x-safetensors"} <= set(answers["200"]["content"])
        assert {"400", "401", "413", "422", "429", "503"} <= set(answers)
    assert "401" in schema["paths"]["/info"]["get"]["responses"]
    components = schema["components"]["schemas"]
    assert components["QuantizeRequest"]["properties"]["variant"]["enum"] == info["variants"]
    assert components["QuantizeRequest"]["properties"]["bits"]["enum"] == info["bits"]
    query = {p["name"]: p["schema"] for p in schema["paths"]["/quantizer"]["get"]["parameters"]}
    assert query["variant"]["enum"] == info["variants"] and query["bits"]["enum"] == info["bits"]
    # info["dims"] is "2-4096"; the schema's dim constraint is checked by the test below.
    assert "dtype" in components["QuantizeResponse"]["properties"]
    assert "mean_cosine_similarity" in components["Distortion"]["properties"]


def test_served_constraints_use_a_range_for_contiguous_dims():
    from service.schemas import served_constraints

    wide = served_constraints(settings())
    assert wide["dim"] == {"minimum": 2, "maximum": 4096} and wide["bits"] == {"enum": list(range(1, 9))}
    assert served_constraints(settings(dims="64-128", warm_dims=[64, 128]))["dim"] == {"minimum": 64, "maximum": 128}
    assert served_constraints(settings(dims=[64, 128], warm_dims=[64]))["dim"] == {"enum": [64, 128]}
    assert wide["variant"] == {"enum": ["full", "fast", "2d", "dense", "hadamard", "identity", "kronecker"]}


async def test_openapi_dim_is_a_range_not_an_enum_of_4095_values(client):
    schema = (await client.get("/openapi.json")).json()
    dim = schema["components"]["schemas"]["Descriptor"]["properties"]["dim"]  # (a request's dim is its shape)
    assert "enum" not in dim and (dim["minimum"], dim["maximum"]) == (2, 4096)
    query = {p["name"]: p["schema"] for p in schema["paths"]["/quantizer"]["get"]["parameters"]}
    assert "enum" not in query["dim"] and (query["dim"]["minimum"], query["dim"]["maximum"]) == (2, 4096)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
async def test_codes_restore_their_dtype_when_posted_back(client, dtype):
    """The codes remember the input's dtype: the /quantize answer posted back as it is (JSON or safetensors)
    answers in it, not in float32 at twice the size of float16."""
    x = _vectors(16, 768, dtype, seed=8)  # an embedding size, served by default
    q = Quantizer("full", 768, 3)
    expected = q.dequantize(q.quantize(x), dtype)
    j = await client.post("/quantize", json={"vectors": b64(x), "variant": "full", "bits": 3})
    assert j.status_code == 200, j.text
    d = await client.post("/dequantize", content=j.content, headers={"content-type": "application/json"})
    assert d.status_code == 200, d.text
    name = str(dtype).removeprefix("torch.")
    assert d.json()["vectors"]["dtype"] == name and torch.equal(unb64(d.json()["vectors"]), expected)
    b = await client.post("/quantize", content=st_save({"vectors": x}), headers={"content-type": SAFETENSORS})
    d = await client.post("/dequantize", content=b.content, headers={"content-type": SAFETENSORS})
    assert d.status_code == 200, d.text
    assert torch.equal(st_load(d.content)["vectors"], expected)
    assert _metadata(d.content)["dtype"] == str(dtype).removeprefix("torch.")


async def test_codes_without_a_dtype_decode_as_float32(client):
    """A container written before the dtype was recorded (or a JSON request without it) answers float32."""
    x = _vectors(4, 64, torch.float16)
    r = await client.post("/quantize", content=st_save({"vectors": x}), headers={"content-type": SAFETENSORS})
    meta = {k: v for k, v in _metadata(r.content).items() if k != "dtype"}
    d = await client.post(
        "/dequantize", content=st_save(st_load(r.content), metadata=meta), headers={"content-type": SAFETENSORS}
    )
    assert d.status_code == 200 and st_load(d.content)["vectors"].dtype == torch.float32
    body = (await client.post("/quantize", json={"vectors": b64(x)})).json()
    del body["dtype"]
    d = await client.post("/dequantize", json=body)
    assert d.status_code == 200 and d.json()["vectors"]["dtype"] == "float32"


async def test_cosine_similarity_in_the_distortion(client):
    x = _vectors(50, 384, torch.float32, seed=12)
    x[3] = 0  # both zero: cosine 1 by definition
    r = await client.post("/quantize", json={"vectors": b64(x), "variant": "full", "bits": 4,
                                             "return_reconstruction": True, "return_distortion": True})
    body = r.json()
    x_hat = unb64(body["reconstruction"]).double()
    cos = torch.nn.functional.cosine_similarity(x.double(), x_hat, dim=-1)
    cos[3] = 1.0
    assert body["distortion"]["mean_cosine_similarity"] == pytest.approx(float(cos.mean()), rel=1e-9)
    assert body["distortion"]["min_cosine_similarity"] == pytest.approx(float(cos.min()), rel=1e-9)
    assert 0.99 < body["distortion"]["mean_cosine_similarity"] < 1.0  # 4 bits: ~0.995 on random vectors


@pytest.mark.parametrize("dim", [2, 384, 768, 1000, 1536, 4096])
async def test_every_dim_the_library_supports_is_served(client, dim):
    """Embedding sizes once refused by default (384, 768, 1536), odd sizes, and the ends of the range; quantizers
    of dims outside the warm set are built on first use."""
    x = _vectors(3, dim, torch.float16, seed=dim)
    r = await client.post("/quantize", json={"vectors": b64(x), "variant": "fast", "bits": 3})
    assert r.status_code == 200, r.text
    q = Quantizer("fast", dim, 3)
    assert unb64(r.json()["codes"]).numpy().tobytes() == q.quantize(x).codes.numpy().tobytes()


async def test_root_points_to_the_docs_and_health(client):
    r = await client.get("/")
    assert r.status_code == 200
    body = r.json()
    assert body["docs"] == "/docs" and body["health"] == {"live": "/health/live", "ready": "/health/ready"}
    for path in (body["docs"], body["openapi"], body["health"]["live"], body["health"]["ready"], body["metrics"]):
        assert (await client.get(path)).status_code == 200, path
