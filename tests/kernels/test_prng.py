"""The parameter generator is pinned: another implementation must reproduce these values from FORMAT.md."""

import numpy as np
import pytest

from kernels import Quantizer, prng
from kernels.rotations import ROTATIONS


def test_splitmix64_matches_the_published_reference_stream():
    # Vigna's splitmix64.c seeded with 0 prints these three outputs first.
    assert [int(v) for v in prng.splitmix64(0, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_counter_form_equals_the_sequential_generator():
    state = prng.stream_state(ROTATIONS["full"].variant_id, 128, 12345)
    expected = []
    s = state
    for _ in range(50):
        s = (s + prng.GOLDEN) % 2**64
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        expected.append(z ^ (z >> 31))
    assert [int(v) for v in prng.splitmix64(state, 50)] == expected
    assert [int(v) for v in prng.splitmix64(state, 10, start=40)] == expected[40:]


def test_uniforms_are_in_the_open_interval_and_normals_are_standard():
    u = prng.uniforms(prng.stream_state(ROTATIONS["2d"].variant_id, 64, 0), 200_000)
    assert u.min() > 0.0 and u.max() < 1.0
    n = prng.normals(prng.stream_state(ROTATIONS["dense"].variant_id, 64, 0), 200_000)
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1.0) < 0.01


def test_stream_tag_separates_variants_dims_and_seeds():
    ids = [r.variant_id for r in ROTATIONS.values()]
    states = {prng.stream_state(v, d, s) for v in ids for d in (4, 5, 128) for s in (0, 1)}
    assert len(states) == len(ids) * 3 * 2


def test_variant_ids_are_the_ones_format_md_pins():
    assert {name: r.variant_id for name, r in ROTATIONS.items()} == {
        "full": 1, "fast": 2, "2d": 3, "dense": 4, "hadamard": 5, "identity": 6, "kronecker": 7,
    }


def test_first_parameters_of_seed_zero_are_pinned():
    q = Quantizer("full", 128, 3, seed=0)
    np.testing.assert_allclose(
        q.rotation.tensors["q_left"][0].tolist(),
        [-0.8655709624290466, 0.22973257303237915, -0.07522129267454147, -0.43857908248901367],
        rtol=0, atol=1e-7,
    )
    np.testing.assert_allclose(
        q.rotation.tensors["q_right"][0].tolist(),
        [-0.7766987085342407, -0.4561919569969177, -0.15992042422294617, -0.40379881858825684],
        rtol=0, atol=1e-7,
    )
    theta = Quantizer("2d", 8, 3, seed=7).rotation.tensors["theta"].tolist()
    np.testing.assert_allclose(theta, [2.250511407852173, 6.2212748527526855, 3.7383482456207275, 3.4375486373901367],
                               rtol=0, atol=1e-6)
    assert Quantizer("hadamard", 6, 3, seed=7).rotation.tensors["signs"].tolist() == [-1, 1, 1, 1, -1, -1, 1, -1]


@pytest.mark.parametrize("variant", ["full", "fast"])
def test_quaternions_are_unit_and_roughly_haar(variant):
    q = Quantizer(variant, 4096, 2, seed=3).rotation.tensors["q_left"].double()
    np.testing.assert_allclose(q.norm(dim=-1).numpy(), 1.0, atol=1e-6)
    # Haar on S^3: each component has mean 0 and variance 1/4.
    assert q.mean(0).abs().max() < 0.05
    np.testing.assert_allclose(q.var(0).numpy(), 0.25, atol=0.03)
