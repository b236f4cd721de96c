"""KV-cache recipes (kernels/kv_cache.py): validation, the stored-bits arithmetic, the codec's round trip."""

import pytest
import torch

from kernels import Quantizer
from kernels.kv_cache import PRESETS, KeyCalibration, KVCacheConfig, KVCodec


def test_bits_per_coordinate_counts_codes_norms_sink_and_window():
    # head_dim 64, 512 tokens, 2 layers: 1 sink token exact (16 bits), 64 window tokens at 8 bits (64 bytes of
    # codes + a 2-byte norm), 447 tokens at 4 bits for keys (32 + 2 bytes) and 3 bits for values (24 + 2 bytes).
    config = KVCacheConfig(key_bits=4, value_bits=3, window=64, window_bits=8, sink=1)
    keys = 1 * 64 * 16 + 64 * (64 + 2) * 8 + 447 * (32 + 2) * 8
    values = 1 * 64 * 16 + 64 * (64 + 2) * 8 + 447 * (24 + 2) * 8
    expected = 2 * (keys + values) / (2 * 2 * 512 * 64)
    assert config.stored_bits_per_coordinate(64, 512, 2) == pytest.approx(expected)
    assert KVCacheConfig(key_bits=3, value_bits=3, norm_dtype="float32").stored_bits_per_coordinate(64, 100, 1) == 3.5
    # A full-precision layer costs 16 bits; a window longer than the text holds every token.
    assert KVCacheConfig(full_precision_layers=(0,)).stored_bits_per_coordinate(64, 10, 1) == 16
    assert KVCacheConfig(window=32).stored_bits_per_coordinate(64, 10, 1) == 16


def test_presets_stay_within_their_budgets_at_512_tokens():
    for name, config in PRESETS.items():
        budget = float(name.removeprefix("kv-"))
        assert config.stored_bits_per_coordinate(64, 512, 30) <= budget, name


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"key_variant": "quaternion"}, "key_variant"),
        ({"value_bits": 9}, "value_bits"),
        ({"key_bits": True}, "key_bits"),
        ({"window": -1}, "window"),
        ({"window_bits": 12}, "window_bits"),
        ({"norm_dtype": "bfloat16"}, "norm_dtype"),
    ],
)
def test_bad_recipes_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        KVCacheConfig(**changes)


def test_codec_encodes_packed_codes_as_the_library_makes_them():
    codec = KVCodec(KVCacheConfig(key_variant="full", key_bits=3, seed=5), head_dim=64, num_layers=2, num_kv_heads=3)
    keys = torch.randn(2, 3, 7, 64)
    codes = codec.encode(1, "key", keys)
    packed = Quantizer("full", 64, 3, seed=5).quantize(keys)
    assert torch.equal(codes.codes, packed.codes)
    assert codes.norms.dtype == torch.float16 and torch.equal(codes.norms, packed.norms.half())
    assert codes.nbytes == 2 * 3 * 7 * (24 + 2)
    decoded = codec.decode(1, "key", codes, torch.float32)
    with_half_norms = (
        Quantizer("full", 64, 3, seed=5).dequantize(packed) * (packed.norms.half().float() / packed.norms)[..., None]
    )
    torch.testing.assert_close(decoded, with_half_norms)


def test_values_use_their_own_seed():
    codec = KVCodec(KVCacheConfig(seed=3), head_dim=32, num_layers=1, num_kv_heads=1)
    assert codec.quantizer("key").seed == 3 and codec.quantizer("value").seed == 4


def test_smoothing_is_undone_on_decode_and_shrinks_the_error_of_offset_keys():
    torch.manual_seed(0)
    heads, dim = 2, 64
    offset = torch.zeros(heads, dim)
    offset[:, :4] = 20.0  # a large per-channel mean shared by every token, as post-RoPE keys have
    keys = torch.randn(1, heads, 4096, dim) + offset[:, None, :]
    calibration = KeyCalibration.from_statistics([offset], [torch.ones(heads, dim)], [torch.ones(heads, dim)])
    smooth = KVCodec(KVCacheConfig(key_bits=3, smooth_keys=True), dim, 1, heads, calibration=calibration)
    plain = KVCodec(KVCacheConfig(key_bits=3), dim, 1, heads)
    smooth_err = (smooth.roundtrip(0, "key", keys) - keys).square().sum()
    plain_err = (plain.roundtrip(0, "key", keys) - keys).square().sum()
    assert smooth_err < plain_err / 10
    # Values are never smoothed.
    torch.testing.assert_close(smooth.roundtrip(0, "value", keys), plain.roundtrip(0, "value", keys))


def test_smoothing_needs_a_calibration_of_the_right_depth():
    with pytest.raises(ValueError, match="KeyCalibration"):
        KVCodec(KVCacheConfig(smooth_keys=True), 64, 2, 3)
    calibration = KeyCalibration([torch.zeros(3, 64)], [torch.ones(3, 64)])
    with pytest.raises(ValueError, match="1 layers; the model has 2"):
        KVCodec(KVCacheConfig(smooth_keys=True), 64, 2, 3, calibration=calibration)


def test_window_tier_requantizes_from_its_own_reconstruction():
    codec = KVCodec(KVCacheConfig(key_bits=2, window=4, window_bits=8), 32, 1, 1)
    x = torch.randn(1, 1, 9, 32)
    windowed, main = codec.window_and_main(0, "key", x)
    torch.testing.assert_close(windowed, codec.roundtrip(0, "key", x, "window"))
    torch.testing.assert_close(main, codec.roundtrip(0, "key", windowed))
    assert (windowed - x).square().sum() < (main - x).square().sum() / 100
