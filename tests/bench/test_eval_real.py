"""The real-activation evaluation (bench/eval_real.py) on a few passages and one layer.

Checks that the extracted tensors are the model's own, that dense and block rotations are
statistically equivalent on isotropic input while the real keys are measurably anisotropic, and that
every metric agrees with a direct float64 numpy recomputation. Statistics are printed (pytest -s) and
recorded as test properties.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import eval_real as ev
from kernels import Quantizer

LAYER = 2  # a middle layer: one layer keeps CI fast
N_PASSAGES, N_SENTENCES = 8, 150
Z99 = 2.5758  # two-sided 99% normal quantile; with one-sided 0.5% tests this is TOST at alpha = 0.005
# Equivalence margin: a 2% relative difference in mean error. It is 4x the 0.5% tolerance to which the
# codebooks reproduce METHOD.md's table and far below the gaps that decide a choice of variant on real
# data (identity vs dense on these keys differ by well over 50%); 20,000 vectors make the 99% interval of
# the paired difference about +-1% wide at d = 32, so the test has the power to show equivalence.
MARGIN = 0.02


@pytest.fixture(scope="module")
def model():
    return ev.load_model()


@pytest.fixture(scope="module")
def corpus():
    grouped, source = ev.load_text()
    assert "pydoc_data/topics.py" in source
    passages = ev.spread(ev.make_passages(grouped), N_PASSAGES)
    sentences = ev.spread(ev.make_sentences(grouped), N_SENTENCES)
    return passages, sentences


@pytest.fixture(scope="module")
def acts(model, corpus):
    return ev.extract_activations(model, corpus[0], [LAYER], keep_context=True)


def paired_ci(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Mean of a - b, its 99% half-width, and the mean of b (float64 per-vector errors [n])."""
    diff = a - b
    return float(diff.mean()), Z99 * float(diff.std(ddof=1)) / math.sqrt(len(diff)), float(b.mean())


# ---------------------------------------------------------------------------------------------------
# The data is the model's


def test_corpus_is_real_prose(corpus):
    passages, sentences = corpus
    assert len(passages) == N_PASSAGES and len(sentences) == N_SENTENCES
    assert len(set(sentences)) == len(sentences)
    assert all(6 <= len(s.split()) <= 60 and s[-1] in ".!?:" for s in sentences)
    # Prose, not code: mostly letters and spaces.
    assert np.mean([sum(c.isalpha() or c.isspace() for c in s) / len(s) for s in sentences]) > 0.9
    assert all(">>>" not in p and "::=" not in p for p in passages)


def test_extracted_tensors_have_the_models_shapes_and_values(model, corpus, acts):
    bert = model[0].auto_model
    config = bert.config
    assert (config.num_attention_heads, config.hidden_size) == (ev.HEADS, ev.HIDDEN)
    assert config.hidden_size // config.num_attention_heads == ev.HEAD_DIM
    assert config.num_hidden_layers == ev.LAYERS
    # Token counts from an independent tokenization of each passage on its own (no padding).
    lengths = [len(model.tokenizer(p, truncation=True, max_length=ev.MAX_TOKENS)["input_ids"]) for p in corpus[0]]
    assert acts.lengths.tolist() == lengths
    n = sum(lengths)
    for tensors in (acts.q, acts.k, acts.v):
        assert list(tensors) == [LAYER]
        assert tensors[LAYER].shape == (n, ev.HIDDEN) and tensors[LAYER].dtype == torch.float32
    attention = bert.encoder.layer[LAYER].attention.self
    with torch.inference_mode():
        hidden = acts.hidden[LAYER]
        # The hooks saw this layer's projections of the hidden state that entered it.
        torch.testing.assert_close(acts.k[LAYER], attention.key(hidden), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(acts.q[LAYER], attention.query(hidden), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(acts.v[LAYER], attention.value(hidden), atol=1e-4, rtol=1e-4)
    # Our attention (head split, 1/sqrt(32), softmax over the passage) is the model's own.
    ours = ev.attention_output(acts.q[LAYER], acts.k[LAYER], acts.v[LAYER], acts.lengths)
    torch.testing.assert_close(ours, acts.context[LAYER], atol=1e-4, rtol=1e-4)
    embeddings = ev.embed(model, corpus[1][:20])
    assert embeddings.shape == (20, ev.HIDDEN) and embeddings.dtype == torch.float32
    torch.testing.assert_close(torch.linalg.vector_norm(embeddings, dim=-1), torch.ones(20), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Isotropic input cannot tell rotations apart; the real keys can


@pytest.mark.parametrize("dim", [ev.HEAD_DIM, ev.HIDDEN])
def test_dense_and_block_rotations_are_equivalent_on_isotropic_input(dim, record_property):
    n = 20_000 if dim == ev.HEAD_DIM else 5_000  # per-vector error spreads less at d = 384
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(7))
    bits = 3
    dense = ev.relative_sq_error(x, Quantizer("dense", dim, bits, 0).roundtrip(x)[0]).numpy()
    others = ["full", "fast", "2d", "identity"] + (["hadamard"] if dim == 32 else [])  # 384 pads for hadamard
    for variant in others:
        errs = ev.relative_sq_error(x, Quantizer(variant, dim, bits, 0).roundtrip(x)[0]).numpy()
        mean, half, base = paired_ci(errs, dense)
        print(f"isotropic d={dim} {variant}-dense: {mean / base:+.4%} +- {half / base:.4%} (99% CI), "
              f"margin {MARGIN:.0%}")
        record_property(f"isotropic_d{dim}_{variant}_minus_dense_rel", f"{mean / base:+.5f} +- {half / base:.5f}")
        # TOST: the whole 99% interval lies inside the margin.
        assert abs(mean) + half < MARGIN * base, (variant, mean, half, base)


def test_real_keys_are_measurably_anisotropic(acts, record_property):
    keys = acts.k[LAYER]
    n = keys.shape[0]
    generator = torch.Generator().manual_seed(11)
    # Null distribution of the statistics for isotropic vectors of the same count and dimension.
    replicates = 100
    null_ratio, null_kurt = [], []
    for _ in range(replicates):
        g = torch.randn(n, ev.HIDDEN, generator=generator)
        null_ratio.append(ev.channel_energy_ratio(g))
        null_kurt.append(ev.coordinate_kurtosis(g))
    ratio, kurt = ev.channel_energy_ratio(keys), ev.coordinate_kurtosis(keys)
    head_ratios = [ev.channel_energy_ratio(keys.reshape(n, ev.HEADS, ev.HEAD_DIM)[:, h]) for h in range(ev.HEADS)]
    print(f"layer {LAYER} keys ({n} tokens): channel-energy ratio {ratio:.2f} (isotropic null max of "
          f"{replicates}: {max(null_ratio):.3f}), kurtosis {kurt:.2f} (null max {max(null_kurt):.3f}); "
          f"per-head ratios {[round(r, 2) for r in head_ratios]}")
    record_property("key_channel_energy_ratio_d384", ratio)
    record_property("key_channel_energy_ratio_null_max", max(null_ratio))
    record_property("key_kurtosis_d384", kurt)
    # Above every one of 100 isotropic replicates: p < 1/101 under isotropy.
    assert ratio > max(null_ratio)
    assert kurt > max(null_kurt)
    # The operational meaning: on these keys the rotation matters. Same paired test as above, now the
    # difference between no rotation and a dense one lies outside the equivalence margin.
    x = keys
    errs = {v: ev.relative_sq_error(x, Quantizer(v, ev.HIDDEN, 3, 0).roundtrip(x)[0]).numpy()
            for v in ("identity", "dense")}
    mean, half, base = paired_ci(errs["identity"], errs["dense"])
    print(f"real keys d=384 identity-dense: {mean / base:+.2%} +- {half / base:.2%} (99% CI)")
    record_property("real_keys_identity_minus_dense_rel", mean / base)
    assert abs(mean) - half > MARGIN * base


# ---------------------------------------------------------------------------------------------------
# The metrics are what they say


def _np_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def _np_roundtrip(quantizer: Quantizer, x: np.ndarray) -> np.ndarray:
    """Reconstruction of rows x [n, 384] by the quantizer through its stored form (quantize, dequantize)."""
    rows = torch.from_numpy(x.reshape(-1, quantizer.dim).astype(np.float32))
    return quantizer.dequantize(quantizer.quantize(rows)).numpy().astype(np.float64).reshape(x.shape)


def test_metrics_agree_with_a_direct_recomputation(model, corpus, acts):
    passages, sentences = corpus
    variants, bits = ("full", "dense", "hadamard"), (2, 4)  # block, dense, padded; two widths
    result = ev.evaluate(model, passages, sentences, [LAYER], variants, bits, seeds=(0,), log=lambda *_: None,
                         isotropic_n=500)
    q, k, v = (t[LAYER].numpy().astype(np.float64) for t in (acts.q, acts.k, acts.v))
    bounds = np.cumsum(acts.lengths.numpy())[:-1]
    assert result["n_tokens"] == len(k)
    # Exact logits [heads, T, T] and outputs [heads, T, 32] of every passage, computed once.
    def passages(x: np.ndarray) -> list[np.ndarray]:
        """Rows [n, 384] -> per passage [T, 12, 32]."""
        return np.split(x.reshape(len(x), ev.HEADS, ev.HEAD_DIM), bounds)

    reference = []
    for qp, kp, vp in zip(passages(q), passages(k), passages(v), strict=True):
        exact = np.einsum("tha,sha->hts", qp, kp) / math.sqrt(ev.HEAD_DIM)
        reference.append((exact, _np_softmax(exact) @ vp.transpose(1, 0, 2)))
    for row in result["attention"]:
        quantizer = Quantizer(row["variant"], row["dim"], row["bits"], row["seed"])
        k_hat, v_hat = _np_roundtrip(quantizer, k), _np_roundtrip(quantizer, v)
        for name, x, x_hat in (("k", k, k_hat), ("v", v, v_hat)):
            a, b = x.reshape(-1, row["dim"]), x_hat.reshape(-1, row["dim"])
            expected = np.mean(((a - b) ** 2).sum(1) / (a**2).sum(1))
            (got,) = [r["rel_err"] for r in result["kv"] if r["tensor"] == name and
                      all(r[key] == row[key] for key in ("dim", "variant", "bits", "seed"))]
            assert got == pytest.approx(expected, rel=1e-5)
        # Attention passage by passage, head by head, in float64.
        sums = np.zeros(4)
        for (exact, out), qp, khp, vhp in zip(reference, passages(q), passages(k_hat), passages(v_hat), strict=True):
            approx = np.einsum("tha,sha->hts", qp, khp) / math.sqrt(ev.HEAD_DIM)
            out_hat = _np_softmax(approx) @ vhp.transpose(1, 0, 2)
            sums += [((approx - exact) ** 2).sum(), (exact**2).sum(), ((out_hat - out) ** 2).sum(), (out**2).sum()]
        assert row["logit_rel"] == pytest.approx(sums[0] / sums[1], rel=1e-3)
        assert row["output_rel"] == pytest.approx(sums[2] / sums[3], rel=1e-3)
        # Bytes from first principles: padded coordinates times bits, rounded up to bytes, plus a float32 norm.
        padded = 512 if (row["variant"], row["dim"]) == ("hadamard", 384) else row["dim"]
        assert row["bytes"] == math.ceil(padded * row["bits"] / 8) + 4
    # Recall@10 with numpy: exact top-10 sets against top-10 over the quantized database.
    embeddings = ev.embed(model, sentences).numpy().astype(np.float64)
    is_query = np.arange(len(sentences)) % 5 == 0
    queries, database = embeddings[is_query], embeddings[~is_query]
    assert (result["n_queries"], result["n_database"]) == (len(queries), len(database))
    exact_top = np.argsort(-(queries @ database.T), axis=1)[:, :10]
    for row in result["recall"]:
        quantizer = Quantizer(row["variant"], ev.HIDDEN, row["bits"], row["seed"])
        approx_top = np.argsort(-(queries @ _np_roundtrip(quantizer, database).T), axis=1)[:, :10]
        expected = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_top, approx_top, strict=True)])
        assert row["recall"] == pytest.approx(expected, abs=1e-9)
        assert row["bytes"] == quantizer.code_bytes + 4
    # Recall can fail: fewer bits must not search better on average over the variants here.
    mean_recall = {b: np.mean([r["recall"] for r in result["recall"] if r["bits"] == b]) for b in bits}
    assert mean_recall[4] >= mean_recall[2]


def test_command_writes_tables_and_plot(tmp_path, capsys):
    png = tmp_path / "eval.png"
    result = ev.main(["--passages", "3", "--sentences", "40", "--layers", "5", "--bits", "2", "3", "--seeds", "1",
                      "--variants", "full", "dense", "hadamard", "--isotropic-n", "200", "--plot", str(png)])
    printed = capsys.readouterr().out
    assert "pydoc_data/topics.py" in printed and "| full | 2 |" in printed and "recall@10" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["layer"] for r in result["kv"]} == {5}
    assert len(result["recall"]) == 3 * 2
