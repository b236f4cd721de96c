"""Hugging Face ``transformers`` integration: a KV cache stored as IsoQuant codes, key calibration, and a
one-pass emulation of decoding through the cache for perplexity scoring.

Needs the optional extra ``hf`` (transformers >= 5); ``import kernels`` never imports this module.

    from kernels.hf import IsoQuantCache, calibrate_keys
    calibration = calibrate_keys(model, tokenizer)          # once per model (the presets smooth keys)
    out = model.generate(**inputs, past_key_values=IsoQuantCache(model, "kv-3.5", calibration))

What the cache holds, per layer and sequence (``KVCacheConfig``): the first ``sink`` tokens and the most
recent ``window`` tokens in the model's dtype, every other token as packed codes plus a norm per head
vector, keys and values each with their own rotation and bits. A token is quantized when it leaves the
window (``window = 0``: as soon as it is written, so even the token being decoded reads its own key
back quantized). Each ``update`` returns the keys and values attention reads: sink, decoded codes,
window, in order. In a prefill every query of the prompt reads the same thing, the prompt's tokens
outside the sink and the last ``window`` decoded from their codes; in decoding, token t reads exactly
what it would read had the whole text been decoded one token at a time.

``quantized_attention`` is the same quantization applied as an attention hook over full-precision
keys and values, for scoring a whole text in one forward pass. With ``per_query=True`` each query t
sees keys j at full precision exactly when j < sink or t - j < window, i.e. what token t reads when the
text is decoded one token at a time through ``IsoQuantCache`` (the test suite checks both equalities).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kernels.kv_cache import PRESETS, HeadCodes, KeyCalibration, KVCacheConfig, KVCodec

__all__ = [
    "IsoQuantCache",
    "IsoQuantLayer",
    "calibrate_keys",
    "calibration_text",
    "codec_for",
    "observe_attention",
    "quantized_attention",
]

SIMULATED = "isoquant_simulated"
CAPTURE = "isoquant_capture"


def _geometry(model_or_config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def codec_for(
    model_or_config,
    config: KVCacheConfig | str,
    calibration: KeyCalibration | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> KVCodec:
    """The ``KVCodec`` of a recipe (or a preset's name: ``kernels.kv_cache.PRESETS``) for a model."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {config!r}")
        config = PRESETS[config]
    if device is None:
        device = next(model_or_config.parameters()).device if hasattr(model_or_config, "parameters") else "cpu"
    layers, kv_heads, head_dim = _geometry(model_or_config)
    return KVCodec(config, head_dim, layers, kv_heads, device=device, calibration=calibration, backend=backend)


# ---------------------------------------------------------------------------------------------------
# The cache


class _TokenStore:
    """A run of tokens of one layer, keys or values: exact (a tensor [batch, kv_heads, tokens, head_dim] in
    the model's dtype) or as ``HeadCodes`` of one tier of the codec."""

    def __init__(self, codec: KVCodec, layer: int, kind: str, tier: str | None, like: torch.Tensor):
        self.codec, self.layer, self.kind, self.tier = codec, layer, kind, tier
        self.dtype = like.dtype
        self.exact: torch.Tensor | None = like[..., :0, :] if tier is None else None
        self.codes: HeadCodes | None = None

    def __len__(self) -> int:
        if self.exact is not None:
            return self.exact.shape[-2]
        return 0 if self.codes is None else self.codes.norms.shape[-1]

    def append(self, x: torch.Tensor) -> None:
        if self.exact is not None:
            self.exact = torch.cat([self.exact, x], dim=-2)
            return
        new = self.codec.encode(self.layer, self.kind, x, self.tier)
        if self.codes is not None:
            new = HeadCodes(torch.cat([self.codes.codes, new.codes], -2), torch.cat([self.codes.norms, new.norms], -1))
        self.codes = new

    def read(self) -> torch.Tensor | None:
        if self.exact is not None:
            return self.exact
        return (
            None if self.codes is None else self.codec.decode(self.layer, self.kind, self.codes, self.dtype, self.tier)
        )

    def pop_oldest(self, count: int) -> torch.Tensor:
        """Remove the ``count`` oldest tokens and return them as read (decoded if coded)."""
        if self.exact is not None:
            oldest, self.exact = self.exact[..., :count, :], self.exact[..., count:, :]
            return oldest
        head = HeadCodes(self.codes.codes[..., :count, :], self.codes.norms[..., :count])
        self.codes = HeadCodes(self.codes.codes[..., count:, :], self.codes.norms[..., count:])
        return self.codec.decode(self.layer, self.kind, head, self.dtype, self.tier)

    @property
    def nbytes(self) -> int:
        if self.exact is not None:
            return self.exact.numel() * self.exact.element_size()
        return 0 if self.codes is None else self.codes.nbytes

    def index_select(self, index: torch.Tensor) -> None:
        if self.exact is not None:
            self.exact = self.exact.index_select(0, index)
        elif self.codes is not None:
            self.codes = HeadCodes(self.codes.codes.index_select(0, index), self.codes.norms.index_select(0, index))


class IsoQuantLayer(CacheLayerMixin):
    """One layer's cache, keys and values each in three runs of tokens: the sink (the first ``sink``
    tokens, exact), the main store (codes) and the window (the last ``window`` tokens, exact or codes at
    ``window_bits``). A full-precision layer keeps every token exact, as ``DynamicLayer`` does."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, codec: KVCodec, layer_idx: int):
        super().__init__()
        self.codec, self.layer_idx = codec, layer_idx
        self.quantized = codec.quantized(layer_idx)
        self.cumulative_length = 0
        self.stores: dict[str, dict[str, _TokenStore]] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]  # read by Cache.batch_size; absent until the first update
        window_tier = None if self.codec.config.exact_window else "window"
        for kind, like in (("key", key_states), ("value", value_states)):
            if not self.quantized:
                self.stores[kind] = {"window": _TokenStore(self.codec, self.layer_idx, kind, None, like)}
                continue
            self.stores[kind] = {
                "sink": _TokenStore(self.codec, self.layer_idx, kind, None, like),
                "main": _TokenStore(self.codec, self.layer_idx, kind, "main", like),
                "window": _TokenStore(self.codec, self.layer_idx, kind, window_tier, like),
            }
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [batch, kv_heads, new, head_dim] keys and values; return what attention reads, each
        [batch, kv_heads, all tokens, head_dim] in the model's dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        config = self.codec.config
        read = []
        for kind, x in (("key", key_states), ("value", value_states)):
            stores = self.stores[kind]
            if self.quantized:
                sink_room = max(0, config.sink - len(stores["sink"]))
                if sink_room:
                    stores["sink"].append(x[..., :sink_room, :])
                    x = x[..., sink_room:, :]
            stores["window"].append(x)
            leaving = len(stores["window"]) - config.window if self.quantized else 0
            if leaving > 0:
                stores["main"].append(stores["window"].pop_oldest(leaving))
            parts = [store.read() for store in stores.values()]
            read.append(torch.cat([part for part in parts if part is not None], dim=-2))
        return read[0], read[1]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        """Bytes this layer stores: exact tokens, codes and norms."""
        return sum(store.nbytes for stores in self.stores.values() for store in stores.values())

    def reset(self) -> None:
        self.__dict__.pop("batch_size", None)
        self.__init__(self.codec, self.layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search): codes move as they are, never re-quantized."""
        for stores in self.stores.values():
            for store in stores.values():
                store.index_select(beam_idx.to(self.device))
        if self.is_initialized:
            self.batch_size = len(beam_idx)


class IsoQuantCache(Cache):
    """A ``transformers`` cache that stores keys and values as IsoQuant codes (see the module docstring).

    model: the model (or its config); config: a ``KVCacheConfig`` or a preset name ("kv-4.5", "kv-3.5",
    "kv-2.5"); calibration: the ``KeyCalibration`` that recipes with ``smooth_keys`` need
    (``calibrate_keys``); device: where codes live (default: the model's first parameter's device);
    backend: the quantizers' backend (auto: Triton kernels on a CUDA device, the torch reference elsewhere).
    """

    def __init__(
        self,
        model,
        config: KVCacheConfig | str = "kv-4.5",
        calibration: KeyCalibration | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ):
        self.codec = codec_for(model, config, calibration, device, backend)
        super().__init__(layers=[IsoQuantLayer(self.codec, i) for i in range(self.codec.num_layers)])

    @property
    def config(self) -> KVCacheConfig:
        return self.codec.config

    @property
    def nbytes(self) -> int:
        """Bytes the cache stores now, all layers, keys and values."""
        return sum(layer.nbytes for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Stored bytes per token of one sequence (all layers, keys and values)."""
        return self.nbytes / max(1, self.get_seq_length() * max(1, self.batch_size))


# ---------------------------------------------------------------------------------------------------
# Calibration


def help_topics(half: int) -> str:
    """English prose that ships with Python: the help topics of ``pydoc_data.topics``, sorted by name, the
    first (``half`` 0) or second (1) half of them joined by blank lines."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    chosen = names[: len(names) // 2] if half == 0 else names[len(names) // 2 :]
    return "\n\n".join(topics[name] for name in chosen)


def calibration_text() -> str:
    """Default calibration text: the second half of the help topics (bench/eval_llm.py scores the first)."""
    return help_topics(1)


_OBSERVER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("isoquant_observer", default=None)
_SIMULATION: contextvars.ContextVar[_Simulation | None] = contextvars.ContextVar("isoquant_simulation", default=None)


def _capture_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention that shows its inputs to the active observer (``observe_attention``), then attends in full
    precision."""
    _OBSERVER.get()(module.layer_idx, query, key, value)
    return _attend(query, key, value, scaling, query.shape[2])


@contextlib.contextmanager
def observe_attention(model, observer: Callable) -> Iterator[None]:
    """Within the block, every attention layer of ``model`` calls ``observer(layer, query, key, value)``
    (query [batch, heads, tokens, head_dim], key and value [batch, kv_heads, tokens, head_dim], keys after
    RoPE) and then attends in full precision. Padded batches are not supported."""
    token = _OBSERVER.set(observer)
    try:
        with _attention_implementation(model, CAPTURE):
            yield
    finally:
        _OBSERVER.reset(token)


def _key_statistics(stats: dict, skip: int = 4) -> Callable:
    """An observer that sums, per layer, the keys' channel moments and the squared queries that read each KV
    head, skipping the first ``skip`` tokens (the attention sinks)."""

    def observe(layer, query, key, value) -> None:
        batch, q_heads, q_len, head_dim = query.shape
        kv_heads = key.shape[1]
        k = key[:, :, skip:].float()
        q = query.reshape(batch, kv_heads, q_heads // kv_heads, q_len, head_dim)[:, :, :, skip:].float()
        entry = stats.setdefault(layer, {"n": 0, "k": 0.0, "k2": 0.0, "q2": 0.0})
        entry["n"] += k.shape[0] * k.shape[2]
        entry["k"] = entry["k"] + k.sum((0, 2))
        entry["k2"] = entry["k2"] + k.square().sum((0, 2))
        entry["q2"] = entry["q2"] + q.square().sum((0, 3)).mean(1)  # mean over the group's query heads

    return observe


@torch.no_grad()
def calibrate_keys(
    model, tokenizer=None, text: str | None = None, tokens: int = 2048, length: int = 512
) -> KeyCalibration:
    """Key smoothing for ``model``: run ``tokens`` tokens of ``text`` (default ``calibration_text()``) in
    sequences of ``length`` and measure, per layer and KV head, the keys' channel mean and standard
    deviation and the RMS of the queries that read them. Needs ``tokenizer`` unless ``text`` is a tensor
    of token ids [n]."""
    text = calibration_text() if text is None else text
    ids = text if isinstance(text, torch.Tensor) else tokenizer(text, return_tensors="pt").input_ids[0]
    count = max(1, min(tokens, len(ids)) // length)
    if len(ids) < length:
        raise ValueError(f"calibration needs at least {length} tokens; got {len(ids)}")
    device = next(model.parameters()).device
    batch = ids[: count * length].reshape(count, length).to(device)
    stats: dict = {}
    with observe_attention(model, _key_statistics(stats)):
        model(batch)
    layers = [stats[i] for i in sorted(stats)]
    means = [entry["k"] / entry["n"] for entry in layers]
    stds = [(entry["k2"] / entry["n"] - m.square()).clamp_min(0).sqrt() for entry, m in zip(layers, means, strict=True)]
    query_rms = [(entry["q2"] / entry["n"]).sqrt() for entry in layers]
    return KeyCalibration.from_statistics(means, stds, query_rms)


# ---------------------------------------------------------------------------------------------------
# Attention hook: the cache's quantization over full-precision keys and values


@dataclass
class _Simulation:
    codec: KVCodec
    kinds: tuple[str, ...]
    per_query: bool


def _attend(query, key, value, scaling, q_len, reads=()):
    """softmax(q k^T * scaling) v with a causal mask over [batch, heads, tokens, head_dim] tensors (grouped
    query heads share a KV head). ``reads``: (mask, key_read, value_read) triples; where a mask
    [group * q_len or 1, k_len] is True (the first match wins) a query reads that key and value instead of
    the exact ones."""
    batch, q_heads, _, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    q = query.reshape(batch, kv_heads, group * q_len, head_dim)
    sources = [(mask, k, v) for mask, k, v in reads if k is not key or v is not value]
    chosen = torch.zeros((1, k_len), dtype=torch.bool, device=key.device)
    masks = []
    for mask, _, _ in sources:
        mask = mask & ~chosen
        masks.append(mask)
        chosen = chosen | mask
    scores = torch.matmul(q, key.transpose(-1, -2))
    for mask, (_, k, _) in zip(masks, sources, strict=True):
        scores = torch.where(mask, torch.matmul(q, k.transpose(-1, -2)), scores)
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device).repeat(group)
    k_pos = torch.arange(k_len, device=query.device)
    scores = (scores * scaling).masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(weights * ~chosen, value) if sources else torch.matmul(weights, value)
    for mask, (_, _, v) in zip(masks, sources, strict=True):
        out = out + torch.matmul(weights * mask, v)
    return out.reshape(batch, q_heads, q_len, head_dim).transpose(1, 2).contiguous(), None


def _simulated_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    sim = _SIMULATION.get()
    layer, codec = module.layer_idx, sim.codec
    if not codec.quantized(layer):
        return _attend(query, key, value, scaling, query.shape[2])
    config = codec.config
    key_window, key_hat = codec.window_and_main(layer, "key", key) if "key" in sim.kinds else (key, key)
    value_window, value_hat = codec.window_and_main(layer, "value", value) if "value" in sim.kinds else (value, value)
    q_len, k_len = query.shape[2], key.shape[2]
    group = query.shape[1] // key.shape[1]
    k_pos = torch.arange(k_len, device=key.device)
    if sim.per_query:  # token t reads j from the window when t - j < window
        q_pos = torch.arange(k_len - q_len, k_len, device=key.device).repeat(group)
        in_window = q_pos[:, None] - k_pos[None, :] < config.window
    else:  # every query reads what the cache returns for this call
        in_window = (k_pos >= k_len - config.window)[None, :]
    sink = (k_pos < config.sink)[None, :]
    # The sink reads exact tokens, the window its own reading (exact or codes at window_bits), the rest the
    # main store's codes.
    main = ~(sink | in_window)
    return _attend(
        query, key, value, scaling, q_len, [(main, key_hat, value_hat), (in_window & ~sink, key_window, value_window)]
    )


AttentionInterface.register(SIMULATED, _simulated_attention)
AttentionInterface.register(CAPTURE, _capture_attention)
# Both build their own causal mask; sdpa's mask function lets transformers skip building one.
AttentionMaskInterface.register(SIMULATED, sdpa_mask)
AttentionMaskInterface.register(CAPTURE, sdpa_mask)


@contextlib.contextmanager
def _attention_implementation(model, name: str) -> Iterator[None]:
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def quantized_attention(
    model, codec: KVCodec, kinds: tuple[str, ...] = ("key", "value"), per_query: bool = True
) -> Iterator[None]:
    """Within the block, ``model``'s attention reads its keys and values (``kinds``) through ``codec``
    (quantize, then dequantize), with the recipe's sink and window kept exact: ``per_query=True`` as
    decoding one token at a time through ``IsoQuantCache`` would, ``False`` as one cache ``update`` of
    the whole call does. Use it without a cache, or with transformers' full-precision ``DynamicCache``.
    Padded batches are not supported (the hook builds its own causal mask)."""
    token = _SIMULATION.set(_Simulation(codec, tuple(kinds), per_query))
    try:
        with _attention_implementation(model, SIMULATED):
            yield
    finally:
        _SIMULATION.reset(token)
