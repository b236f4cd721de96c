"""``PackedCodes`` as an array of vectors, offline (no server): len, shape, selection and concatenation with
the exact bytes of the container, the recorded dtype and distortion, and files that are not codes."""

from __future__ import annotations

import numpy as np
import pytest

from clients import Distortion, PackedCodes
from clients._codec import NotCodesError, write_safetensors
from isoquant_format import parse

DESCRIPTOR = {"variant": "full", "dim": 64, "bits": 3, "seed": 0, "fingerprint": "0123456789abcdef"}


def _packed(batch=(6,), dtype="float16", seed=0) -> PackedCodes:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (*batch, 24), dtype=np.uint8)
    norms = rng.random(batch).astype(np.float32)
    n = int(np.prod(batch))
    return PackedCodes(codes, norms, **DESCRIPTOR, bytes_in=n * 64 * 2, dtype=dtype)


def _made_from(codes, norms, dtype="float16") -> PackedCodes:
    """What quantizing exactly those vectors gives: the same codes and norms, bytes_in of that many vectors."""
    return PackedCodes(np.array(codes), np.array(norms, dtype=np.float32), **DESCRIPTOR,
                       bytes_in=int(np.prod(norms.shape)) * 64 * 2, dtype=dtype)


def test_shape_len_and_sizes():
    p = _packed((3, 5))
    assert p.shape == (3, 5, 64) and p.batch_shape == (3, 5) and len(p) == 3 and p.n_vectors == 15
    assert p.code_bytes == 24 and p.nbytes == 15 * 28 and p.compression_ratio == 15 * 128 / (15 * 28)
    single = p[1, 2]
    assert single.shape == (64,) and single.batch_shape == () and single.codes.shape == (24,)
    with pytest.raises(TypeError, match="single vector"):
        len(single)
    assert list(p[0]) and len(list(p)) == 3  # iterates over the first axis
    assert [q.norms.tolist() for q in p] == p.norms.tolist()


@pytest.mark.parametrize(
    "key",
    [slice(1, 4), 2, -1, slice(None, None, 2), [0, 5, 5], np.array([True, False, True, False, False, True]),
     (Ellipsis,), (None, slice(2, 3)), slice(6, 6)],
    ids=["slice", "int", "negative", "step", "list", "mask", "ellipsis", "newaxis", "empty"],
)
def test_selection_is_the_exact_bytes_of_those_vectors(key):
    p = _packed((6,))
    key_tuple = key if isinstance(key, tuple) else (key,)
    selected = p[key]
    expected = _made_from(p.codes[(*key_tuple, slice(None))], p.norms[key_tuple])
    assert selected.to_bytes() == expected.to_bytes()
    assert selected.descriptor() == p.descriptor() and selected.dtype == "float16" and selected.distortion is None


def test_selection_of_a_batch_with_several_axes():
    p = _packed((4, 3))
    assert p[:, 1].to_bytes() == _made_from(p.codes[:, 1], p.norms[:, 1]).to_bytes()
    assert p[..., 0].shape == (4, 64) and p[2, ...].shape == (3, 64)
    assert p[p.norms > 0.5].n_vectors == int((p.norms > 0.5).sum())
    with pytest.raises(IndexError, match="index the leading axes"):
        p[0, 0, 0]  # a third index would reach into a vector's code bytes


def test_concatenate_is_the_exact_bytes_of_the_whole():
    p = _packed((7,))
    parts = [p[:2], p[2:3], p[3:]]
    assert PackedCodes.concatenate(parts).to_bytes() == p.to_bytes()
    grid = _packed((2, 5))
    joined = PackedCodes.concatenate([grid[:, :2], grid[:, 2:]], axis=1)
    assert joined.to_bytes() == grid.to_bytes()
    assert PackedCodes.concatenate([grid[:, :2], grid[:, 2:]], axis=-1).to_bytes() == grid.to_bytes()
    assert PackedCodes.concatenate([p]).to_bytes() == p.to_bytes()


def test_concatenate_refuses_what_cannot_be_one_batch():
    p = _packed((4,))
    other_seed = PackedCodes(p.codes, p.norms, **{**DESCRIPTOR, "seed": 1, "fingerprint": "f" * 16})
    with pytest.raises(ValueError, match="different quantizers or dtypes"):
        PackedCodes.concatenate([p, other_seed])
    with pytest.raises(ValueError, match="different quantizers or dtypes"):
        PackedCodes.concatenate([p, _packed((4,), dtype="float32")])
    with pytest.raises(ValueError, match="at least one"):
        PackedCodes.concatenate([])
    with pytest.raises(ValueError, match="no axis to join"):
        PackedCodes.concatenate([p[0], p[1]])
    with pytest.raises(ValueError, match="axis 1 is out of range"):
        PackedCodes.concatenate([p, p], axis=1)
    with pytest.raises(TypeError):
        PackedCodes.concatenate([p, p.codes])
    unknown = PackedCodes(p.codes, p.norms, **DESCRIPTOR, dtype="float16")  # bytes_in unknown
    assert PackedCodes.concatenate([p, unknown]).bytes_in is None


def test_the_container_records_dtype_and_distortion():
    stats = Distortion(0.03, 0.18, 0.22, 4, 0.98, 0.97)
    p = _packed((4,), dtype="bfloat16")
    p.distortion = stats
    _, meta = parse(p.to_bytes())
    assert meta["dtype"] == "bfloat16" and meta["shape"] == "[4, 64]" and float(meta["min_cosine_similarity"]) == 0.97
    back = PackedCodes.from_bytes(p.to_bytes())
    assert back.dtype == "bfloat16" and back.distortion == stats and back.to_bytes() == p.to_bytes()


def test_a_container_without_dtype_is_float32_and_a_bad_one_is_refused():
    p = _packed((2,))
    meta = {k: v for k, v in p.metadata().items() if k != "dtype"}
    old = write_safetensors({"codes": p.codes, "norms": p.norms}, meta)
    assert PackedCodes.from_bytes(old).dtype == "float32"
    bad = write_safetensors({"codes": p.codes, "norms": p.norms}, {**meta, "dtype": "float64"})
    with pytest.raises(ValueError, match="metadata 'dtype' must be one of float16, bfloat16, float32"):
        PackedCodes.from_bytes(bad, source="bad.safetensors")
    with pytest.raises(ValueError, match="dtype must be one of"):
        PackedCodes(p.codes, p.norms, **DESCRIPTOR, dtype="int8")


def test_vectors_files_are_not_codes(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((3, 64), np.float16))
    with pytest.raises(NotCodesError, match=r"x.npy is a .npy array \(vectors\), not codes"):
        PackedCodes.load(path)
    container = write_safetensors({"vectors": np.zeros((3, 64), np.float16)}, {})
    with pytest.raises(NotCodesError, match=r"is a vectors file \(tensor 'vectors' float16 \[3, 64\]\), not codes"):
        PackedCodes.from_bytes(container)
    assert issubclass(NotCodesError, ValueError)


def test_the_codes_of_a_single_vector_survive_the_file(tmp_path):
    """A single vector's norm is 0-d; the container keeps it 0-d (it was written [1], and could not be read back)."""
    p = _packed((5,))[3]
    path = tmp_path / "one.safetensors"
    p.save(path)
    back = PackedCodes.load(path)
    assert back.norms.shape == () and back.shape == (64,) and back.to_bytes() == p.to_bytes()
    assert parse(path.read_bytes())[0]["norms"].shape == ()
