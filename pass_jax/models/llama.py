"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama): `ModelConfig`, a `Decoder`.

Params are a plain dict: {"embed": [V, D], "norm": [D], "lm_head": [D, V] (absent when tied),
"layers": [{"attn_norm", "qkv" [D, (H + 2 KV) * hd], "qkv_bias"?, "o", "o_bias"?, "mlp_norm",
"gate_up" [D, 2F], "down"}, ...]}. q/k/v and gate/up are fused so a decode step streams each
layer's weights in as few matrix-vector products as possible. Layers are a Python list, unrolled
under jit: a scan over stacked layers would copy each layer's slice on the CPU backend.

Products, embedding rows, RoPE, attention and cache writes go through `ops` (pass_jax.backends: XLA's
ops, or a backend's; None = `backends.default_ops()`, this process's choice).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..backends import resolve
from ..backends.xla import XlaOps
from ..errors import ConfigError
from .cache import KVCache
from .contract import attend_cached, pass_mask
from .layers import rms_norm, swiglu

Params = dict
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Hugging Face `rope_parameters` beyond the plain default (only the kinds we implement)."""

    rope_type: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family model's shape, and its `Decoder` methods (models.contract). Frozen (hashable): jit
    takes it as a static argument. Qwen3 (models.qwen3) is this decoder with per-head q/k norms."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v (Qwen2 always; Llama with attention_bias)
    o_bias: bool = False  # a bias on o_proj too (Llama with attention_bias)
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    ARCHITECTURES = tuple(_MODEL_TYPES.values())  # what from_hf_dict reads (the registry: pass_jax.models)

    # ---- the Decoder contract ----
    def embed(self, params: Params, tokens: jax.Array, ops: XlaOps | None = None) -> jax.Array:
        return embed_tokens(params, tokens, ops)

    def forward(self, params: Params, embeds, positions, block_mask, cache: KVCache, **kw):
        return forward(params, self, embeds, positions, block_mask, cache, **kw)

    def logits(self, params: Params, hidden: jax.Array, ops: XlaOps | None = None) -> jax.Array:
        return logits_from_hidden(params, hidden, ops)

    def normed_heads(self, layer: dict, heads: jax.Array) -> jax.Array:
        """The [B, T, H + 2 KV, hd] q/k/v heads before RoPE: as projected here (Qwen3 norms q and k)."""
        return heads

    # ---- params, layout and checkpoints ----
    def init_params(self, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
        return init_params(self, key, dtype, scale)

    def param_axes(self) -> dict:
        return param_axes(self)

    def layer_axes(self) -> dict:
        return layer_axes(self)

    def hf_sources(self) -> dict:
        return hf_sources(self)

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        if self.attention_bias:
            layer += q + 2 * kv
        if self.o_bias:
            layer += d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Validate a Hugging Face config.json dict and keep what the JAX model needs."""
        arch = architecture_of(hf, _MODEL_TYPES)
        if arch not in cls.ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {arch!r}; {cls.__name__} reads {', '.join(cls.ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf.get('hidden_act')!r}: only 'silu' (SwiGLU) is implemented")
        if hf.get("use_sliding_window") and arch.startswith("Qwen"):
            raise ConfigError(f"unsupported config feature: {arch[:-11]} use_sliding_window=True")
        window = hf.get("sliding_window", 4096) if arch == "MistralForCausalLM" else None  # HF's default
        llama_bias = arch == "LlamaForCausalLM" and bool(hf.get("attention_bias", False))
        return cls(**common_fields(hf), rope_theta=rope_theta(hf), rope_scaling=rope_scaling(hf),
                   attention_bias=arch == "Qwen2ForCausalLM" or llama_bias, o_bias=llama_bias,
                   sliding_window=int(window) if window else None, architecture=arch)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that `transformers` loads as the same architecture."""
        hf = {**common_hf_dict(self), "model_type": {v: k for k, v in _MODEL_TYPES.items()}[self.architecture],
              "intermediate_size": self.intermediate_size, "num_attention_heads": self.num_heads,
              "hidden_act": "silu", "rope_parameters": rope_parameters(self)}
        if self.architecture == "LlamaForCausalLM":
            hf["attention_bias"] = self.o_bias
        if self.architecture == "MistralForCausalLM":
            hf["sliding_window"] = self.sliding_window
        return hf


# ---- config.json helpers, shared with the other architectures -------------------------------------
def architecture_of(hf: dict, model_types: dict[str, str]) -> str | None:
    archs = hf.get("architectures") or []
    return archs[0] if archs else model_types.get(hf.get("model_type", ""), hf.get("model_type"))


def rope_parameters(cfg) -> dict[str, Any]:
    """config.json's `rope_parameters` for a decoder with `rope_theta` and `rope_scaling` fields."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(dataclasses.asdict(cfg.rope_scaling))
    return rope


def common_fields(hf: dict) -> dict:
    """The fields every decoder's config.json spells the same way, validated."""
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks required fields: {', '.join(missing)}")
    if hf.get("mlp_bias"):
        raise ConfigError("unsupported config feature mlp_bias=True")
    heads = int(hf["num_attention_heads"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    eos = hf.get("eos_token_id")
    return {"vocab_size": int(hf["vocab_size"]), "hidden_size": int(hf["hidden_size"]),
            "intermediate_size": int(hf["intermediate_size"]), "num_layers": int(hf["num_hidden_layers"]),
            "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // heads),
            "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_ids": tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))}


def common_hf_dict(cfg) -> dict:
    """`common_fields`' inverse."""
    eos = cfg.eos_token_ids
    return {"architectures": [cfg.architecture], "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
            "max_position_embeddings": cfg.max_position_embeddings, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": list(eos) if len(eos) > 1 else (eos[0] if eos else None)}


def _rope_dict(hf: dict, params: dict | None = None) -> dict:
    return {**(hf.get("rope_scaling") or {}), **(params if params is not None else hf.get("rope_parameters") or {})}


def rope_theta(hf: dict, params: dict | None = None, default: float = 10000.0) -> float:
    return float(_rope_dict(hf, params).get("rope_theta", hf.get("rope_theta", default)))


def rope_scaling(hf: dict, params: dict | None = None) -> RopeScaling | None:
    """The RoPE scaling of a config.json's rope parameters (`params`: one layer kind's, as Gemma 3's)."""
    rope = _rope_dict(hf, params)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "llama3":
        return RopeScaling("llama3", float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)),
                           float(rope.get("high_freq_factor", 4.0)),
                           int(rope.get("original_max_position_embeddings", 8192)))
    if kind == "linear":
        return RopeScaling("linear", float(rope["factor"]))
    if kind != "default":
        raise ConfigError(f"unsupported rope type {kind!r}: pass-jax implements default, linear, llama3")
    return None


def rope_inv_freq(cfg, theta: float | None = None, scaling: RopeScaling | None = None):
    """Inverse RoPE frequencies, with Hugging Face's linear / Llama-3 scaling applied (cfg's own theta
    and scaling unless given)."""
    if theta is None:
        theta, scaling = cfg.rope_theta, cfg.rope_scaling
    s = scaling
    inv = 1.0 / (theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    if s is None:
        return inv.astype(np.float32)
    if s.rope_type == "linear":
        return (inv / s.factor).astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


# ---- the decoder --------------------------------------------------------------------------------
def embed_tokens(params: Params, tokens: jax.Array, ops: XlaOps | None = None) -> jax.Array:
    """The rows of `tokens`, in float32."""
    return resolve(ops).embed(params["embed"], tokens)


def forward(params: Params, cfg: ModelConfig, embeds: jax.Array, positions: jax.Array,
            block_mask: jax.Array, cache: KVCache, visible: jax.Array | None = None, prefix: jax.Array | None = None,
            prefix_rows: jax.Array | None = None, local_blocks: int | None = None,
            ops: XlaOps | None = None) -> tuple[jax.Array, KVCache]:
    """Run a block of T new inputs through the decoder (`Decoder.forward`, models.contract).

    embeds [B, T, D] (token embeddings or look-ahead vectors), positions [B, T] RoPE positions,
    block_mask [B, T, T] which block entries each query sees (on top of every committed entry).
    The block's keys/values are written at each row's cache length but not committed.
    visible [B, T, max_len], when given, replaces that rule (training: a look-ahead block sees the
    real tokens only up to its insertion point). prefix [layers, 2, P, KV, hd] (deep look-ahead):
    learned keys/values that only the rows where prefix_rows [B, T] attend to, before the cache;
    every other row computes exactly what it computes without them.
    local_blocks=n (training): the T inputs are T / n independent blocks of n that see the cache per
    `visible` plus their own block causally; their keys/values are not written (the buffer stays as
    long as the real tokens, and no row scores the other blocks' entries).
    Returns the final-normed hidden states [B, T, D] and the cache with the block written.
    """
    ops = resolve(ops)
    mask = pass_mask(cache, block_mask, positions, visible, cfg.sliding_window)
    x = embeds.astype(jnp.float32)
    keys, values = list(cache.keys), list(cache.values)
    for i, layer in enumerate(params["layers"]):
        x, keys[i], values[i] = _layer(layer, x, keys[i], values[i], cache.lengths, positions, mask,
                                       None if prefix is None else prefix[i], prefix_rows, cfg=cfg, ops=ops,
                                       local_blocks=local_blocks)
    hidden = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    return hidden, cache.replace(keys=tuple(keys), values=tuple(values))


@functools.partial(jax.jit, static_argnames=("cfg", "ops", "local_blocks"))
def _layer(layer, x, keys, values, lengths, positions, mask, prefix, prefix_rows, *, cfg: ModelConfig, ops: XlaOps,
           local_blocks: int | None):
    """One decoder layer of `forward`: (x, the layer's keys and values with the block written).

    Jitted on its own, so tracing a pass traces one layer, not every layer (they share their shapes);
    XLA inlines the call, so the compiled program computes what the unrolled layers computed."""
    b, t = x.shape[:2]
    nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = ops.dense(rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps), layer["qkv"])
    if "qkv_bias" in layer:
        qkv = qkv + layer["qkv_bias"].astype(jnp.float32)
    heads = cfg.normed_heads(layer, qkv.reshape(b, t, nq + 2 * nkv, hd))
    heads = ops.rope(heads, positions, jnp.asarray(rope_inv_freq(cfg)), nq + nkv)
    q, k, v = heads[:, :, :nq], heads[:, :, nq:nq + nkv], heads[:, :, nq + nkv:]  # q and k rotated
    attn, keys, values = attend_cached(ops, q, k, v, keys, values, lengths, mask, prefix, prefix_rows, local_blocks)
    attn = ops.dense(attn, layer["o"])
    x = x + (attn + layer["o_bias"].astype(jnp.float32) if "o_bias" in layer else attn)
    x = x + ops.dense(swiglu(ops.dense(rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps), layer["gate_up"])),
                      layer["down"])
    return x, keys, values


def logits_from_hidden(params: Params, hidden: jax.Array, ops: XlaOps | None = None) -> jax.Array:
    """float32 logits; a tied head reuses the embedding matrix."""
    ops = resolve(ops)
    return ops.dense(hidden, params["lm_head"]) if "lm_head" in params else ops.dense_t(hidden, params["embed"])


def layer_axes(cfg: ModelConfig) -> dict:
    """One layer's logical axis names (`param_axes`)."""
    layer = {"attn_norm": ("norm",), "qkv": ("embed", "qkv"), "o": ("heads", "embed"), "mlp_norm": ("norm",),
             "gate_up": ("embed", "mlp"), "down": ("mlp", "embed")}
    if cfg.attention_bias:
        layer["qkv_bias"] = ("qkv",)
    if cfg.o_bias:
        layer["o_bias"] = ("norm",)
    return layer


def param_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every parameter: the same tree as `init_params`, a name per dimension.

    `sharding.LOGICAL_RULES` maps the names to mesh axes, so the layout is declared here, once,
    for training and generation alike, instead of guessed from shapes. "qkv" is the fused
    [q heads | k heads | v heads] output and "mlp" the fused [gate | up] output (and down's input).
    """
    axes = {"embed": ("vocab", "embed"), "layers": [cfg.layer_axes() for _ in range(cfg.num_layers)], "norm": ("norm",)}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random params (normal * scale, norms at 1): for tests, benchmarks and pretraining."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    keys = iter(jax.random.split(key, 4 * cfg.num_layers + 2))

    def normal(shape):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    layers = []
    for _ in range(cfg.num_layers):
        layer = {"attn_norm": jnp.ones((d,), dtype), "qkv": normal((d, qkv_out)), "o": normal((cfg.num_heads * hd, d)),
                 "mlp_norm": jnp.ones((d,), dtype), "gate_up": normal((d, 2 * f)), "down": normal((f, d))}
        if cfg.attention_bias:
            layer["qkv_bias"] = jnp.zeros((qkv_out,), dtype)
        if cfg.o_bias:
            layer["o_bias"] = jnp.zeros((d,), dtype)
        layers.append(layer)
    params = {"embed": normal((cfg.vocab_size, d)), "layers": layers, "norm": jnp.ones((d,), dtype)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((d, cfg.vocab_size))
    else:
        next(keys)
    return params


LAYER = "model.layers.{}."


def hf_sources(cfg: ModelConfig) -> dict:
    """Where each param comes from in a Hugging Face checkpoint, as the params tree (io.hf reads and
    writes by it): (HF tensors concatenated along our last axis, transposed from [out, in]?, widths)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def layer(i):
        p = LAYER.format(i)
        src = {"attn_norm": ([p + "input_layernorm.weight"], False, None),
               "qkv": ([p + f"self_attn.{n}_proj.weight" for n in "qkv"], True, (q, kv, kv)),
               "o": ([p + "self_attn.o_proj.weight"], True, None),
               "mlp_norm": ([p + "post_attention_layernorm.weight"], False, None),
               "gate_up": ([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], True,
                           (cfg.intermediate_size,) * 2),
               "down": ([p + "mlp.down_proj.weight"], True, None)}
        if cfg.attention_bias:
            src["qkv_bias"] = ([p + f"self_attn.{n}_proj.bias" for n in "qkv"], False, (q, kv, kv))
        if cfg.o_bias:
            src["o_bias"] = ([p + "self_attn.o_proj.bias"], False, None)
        return src

    src = {"embed": (["model.embed_tokens.weight"], False, None), "layers": [layer(i) for i in range(cfg.num_layers)],
           "norm": (["model.norm.weight"], False, None)}
    if not cfg.tie_word_embeddings:
        src["lm_head"] = (["lm_head.weight"], True, None)
    return src
