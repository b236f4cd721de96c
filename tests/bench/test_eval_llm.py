"""bench/eval_llm.py on a small slice of the real model and text: the scores are the model's own, the rows are
what the table prints, and the evaluation and calibration texts do not overlap."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import eval_llm as ev
from kernels.hf import calibration_text


def test_evaluation_and_calibration_texts_are_disjoint_prose():
    scored, calibration = ev.eval_text(), calibration_text()
    assert len(scored) > 100_000 and len(calibration) > 100_000
    assert scored[:2000] not in calibration and calibration[:2000] not in scored


@pytest.mark.slow
def test_small_run_scores_and_tables(tmp_path):
    out = tmp_path / "llm.json"
    ev.main(
        [
            "--windows",
            "1",
            "--length",
            "256",
            "--seeds",
            "0",
            "--variants",
            "hadamard,identity",
            "--bits",
            "3",
            "--modes",
            "kv,v",
            "--presets",
            "kv-4.5",
            "--calibration-tokens",
            "512",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "llm.png"),
        ]
    )
    result = json.loads(out.read_text())
    rows = {(r["section"], r["name"]): r for r in result["rows"]}
    assert result["predicted_tokens"] == 255
    # Full precision: the perplexity of the model on this window, recomputed directly.
    tokenizer, model = ev.load_model()
    ids = ev.eval_windows(tokenizer, 1, 256)
    with torch.no_grad():
        logp = model(ids).logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean().item()
    assert result["full_precision_ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    # Quantizing hurts, more without a rotation, and values alone hurt less than keys and values.
    hadamard, identity = rows["grid", "hadamard 3-bit kv"], rows["grid", "identity 3-bit kv"]
    assert 0 < hadamard["ppl_increase"] < identity["ppl_increase"]
    assert rows["grid", "hadamard 3-bit v"]["ppl_increase"] < hadamard["ppl_increase"]
    assert hadamard["bits_per_coordinate"] == 3.5 and rows["grid", "hadamard 3-bit v"]["bits_per_coordinate"] == 9.75
    # The preset beats the anchor it is ablated from, within its budget.
    preset = rows["preset", "kv-4.5"]
    anchor = next(r for r in result["rows"] if r["section"] == "ablation")
    assert preset["ppl_increase"] < anchor["ppl_increase"]
    assert 0 <= preset["kl"] < anchor["kl"] and preset["top1"] > anchor["top1"]
    table = ev.tables(result)
    assert "| 3 | 3.50 | kv |" in table and "**preset kv-4.5**" in table and "KIVI-style 3-bit" in table
    assert (tmp_path / "llm.png").stat().st_size > 10_000


def test_kivi_anchor_quantizes_keys_per_channel_and_values_per_token():
    kivi = ev.KiviCodec(bits=2, window=0, sink=0, num_layers=1, head_dim=4, group=2)
    keys = torch.tensor([[[[0.0, 10.0, 0.0, 0.0], [3.0, 13.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]]])
    # Channel 1 over tokens 0-1 spans 10..13: 2 bits give steps of 1.0, so both ends are exact.
    out = kivi.roundtrip(0, "key", keys)
    torch.testing.assert_close(out[0, 0, :2, :2], keys[0, 0, :2, :2])
    torch.testing.assert_close(out[0, 0, 2], keys[0, 0, 2])  # a group of one token (replicated) is exact
    values = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]])
    torch.testing.assert_close(kivi.roundtrip(0, "value", values), values)
    assert kivi.stored_bits_per_coordinate(512) == 2 + 32 / 2
