"""Gemma 3 (text): scaled embeddings, (1 + w) RMS norms before and after attention and MLP, per-head
q/k norms, GeGLU, a query scale of its own, and sliding-window layers with a RoPE of their own between
the global ones."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from ..backends import resolve
from ..backends.xla import XlaOps
from ..errors import ConfigError
from .cache import KVCache
from .contract import attend_cached, pass_mask
from .layers import geglu, rms_norm
from .llama import LAYER, RopeScaling, common_fields, common_hf_dict, rope_inv_freq, rope_scaling


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """A Gemma 3 text model's shape and its `Decoder` methods (models.contract).

    Params: {"embed", "norm", "lm_head"? (absent when tied), "layers": [{"attn_norm", "qkv", "qkv_bias"?,
    "o", "o_bias"?, "q_norm", "k_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm", "gate_up",
    "down"}]}; the norm weights are Gemma's w of (1 + w), as Hugging Face stores them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding: tuple[bool, ...]  # per layer: a sliding-window (local) layer
    sliding_window: int = 4096
    query_pre_attn_scalar: float = 256.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_scaling: RopeScaling | None = None  # global layers
    local_rope_theta: float = 10_000.0
    final_logit_softcapping: float | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131_072
    architecture: str = "Gemma3ForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def embed(self, params, tokens, ops: XlaOps | None = None):
        """Rows times sqrt(hidden_size), the product rounded to the weights' dtype as Hugging Face's is."""
        table = params["embed"]
        rows = resolve(ops).embed(table, tokens).astype(table.dtype)
        return (rows * jnp.asarray(math.sqrt(self.hidden_size), table.dtype)).astype(jnp.float32)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def forward(self, params, embeds, positions, block_mask, cache: KVCache, *, visible=None, prefix=None,
                prefix_rows=None, local_blocks=None, ops: XlaOps | None = None):
        ops = resolve(ops)
        masks = {False: pass_mask(cache, block_mask, positions, visible)}
        if any(self.sliding):
            masks[True] = pass_mask(cache, block_mask, positions, visible, self.sliding_window)
        x = embeds.astype(jnp.float32)
        keys, values = list(cache.keys), list(cache.values)
        for i, layer in enumerate(params["layers"]):
            x, keys[i], values[i] = _layer(layer, x, keys[i], values[i], cache.lengths, positions,
                                           masks[self.sliding[i]], None if prefix is None else prefix[i], prefix_rows,
                                           cfg=self, ops=ops, local_blocks=local_blocks, sliding=self.sliding[i])
        return rms_norm(x, params["norm"], self.rms_norm_eps, 1.0), cache.replace(keys=tuple(keys), values=tuple(values))

    def logits(self, params, hidden, ops: XlaOps | None = None):
        ops = resolve(ops)
        out = ops.dense(hidden, params["lm_head"]) if "lm_head" in params else ops.dense_t(hidden, params["embed"])
        cap = self.final_logit_softcapping
        return out if cap is None else jnp.tanh(out / cap) * cap

    # ---- params, layout and checkpoints ----
    def init_params(self, key, dtype=jnp.float32, scale: float = 0.02) -> dict:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        qkv_out, q = (self.num_heads + 2 * self.num_kv_heads) * hd, self.num_heads * hd
        keys = iter(jax.random.split(key, 4 * self.num_layers + 2))

        def normal(shape):
            return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

        def zeros(n):  # a (1 + w) norm at 1
            return jnp.zeros((n,), dtype)

        layers = []
        for _ in range(self.num_layers):
            layer = {"attn_norm": zeros(d), "qkv": normal((d, qkv_out)), "o": normal((q, d)), "q_norm": zeros(hd),
                     "k_norm": zeros(hd), "post_attn_norm": zeros(d), "pre_mlp_norm": zeros(d),
                     "post_mlp_norm": zeros(d), "gate_up": normal((d, 2 * f)), "down": normal((f, d))}
            if self.attention_bias:
                layer["qkv_bias"], layer["o_bias"] = zeros(qkv_out), zeros(d)
            layers.append(layer)
        params = {"embed": normal((self.vocab_size, d)), "layers": layers, "norm": zeros(d)}
        if not self.tie_word_embeddings:
            params["lm_head"] = normal((d, self.vocab_size))
        return params

    def param_axes(self) -> dict:
        layer = {"attn_norm": ("norm",), "qkv": ("embed", "qkv"), "o": ("heads", "embed"), "q_norm": ("head_dim",),
                 "k_norm": ("head_dim",), "post_attn_norm": ("norm",), "pre_mlp_norm": ("norm",),
                 "post_mlp_norm": ("norm",), "gate_up": ("embed", "mlp"), "down": ("mlp", "embed")}
        if self.attention_bias:
            layer["qkv_bias"], layer["o_bias"] = ("qkv",), ("norm",)
        axes = {"embed": ("vocab", "embed"), "layers": [dict(layer) for _ in range(self.num_layers)], "norm": ("norm",)}
        if not self.tie_word_embeddings:
            axes["lm_head"] = ("embed", "vocab")
        return axes

    def hf_sources(self) -> dict:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim

        def one(name, transposed=False):
            return [name], transposed, None

        def layer(i):
            p = LAYER.format(i)
            src = {"attn_norm": one(p + "input_layernorm.weight"),
                   "qkv": ([p + f"self_attn.{n}_proj.weight" for n in "qkv"], True, (q, kv, kv)),
                   "o": one(p + "self_attn.o_proj.weight", True),
                   "q_norm": one(p + "self_attn.q_norm.weight"), "k_norm": one(p + "self_attn.k_norm.weight"),
                   "post_attn_norm": one(p + "post_attention_layernorm.weight"),
                   "pre_mlp_norm": one(p + "pre_feedforward_layernorm.weight"),
                   "post_mlp_norm": one(p + "post_feedforward_layernorm.weight"),
                   "gate_up": ([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], True,
                               (self.intermediate_size,) * 2),
                   "down": one(p + "mlp.down_proj.weight", True)}
            if self.attention_bias:
                src["qkv_bias"] = ([p + f"self_attn.{n}_proj.bias" for n in "qkv"], False, (q, kv, kv))
                src["o_bias"] = one(p + "self_attn.o_proj.bias")
            return src

        src = {"embed": one("model.embed_tokens.weight"), "layers": [layer(i) for i in range(self.num_layers)],
               "norm": one("model.norm.weight")}
        if not self.tie_word_embeddings:
            src["lm_head"] = one("lm_head.weight", True)
        return src

    @property
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        layer = d * (q + 2 * kv) + q * d + 3 * d * f + 4 * d + 2 * hd + (q + 2 * kv + d) * self.attention_bias
        return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> Gemma3Config:
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"unsupported hidden_activation {act!r}: Gemma 3 runs 'gelu_pytorch_tanh' (GeGLU)")
        for feature in ("attn_logit_softcapping", "use_bidirectional_attention"):
            if hf.get(feature):
                raise ConfigError(f"unsupported config feature {feature}={hf[feature]!r}")
        fields = common_fields(hf)
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % int(hf.get("sliding_window_pattern", 6))
                                          else "full_attention" for i in range(fields["num_layers"])]
        if len(types) != fields["num_layers"] or set(types) - {"sliding_attention", "full_attention"}:
            raise ConfigError(f"layer_types must name 'sliding_attention' or 'full_attention' for each of the "
                              f"{fields['num_layers']} layers, got {types}")
        rope = hf.get("rope_parameters") or {}
        glob, loc = (rope.get("full_attention", {}), rope.get("sliding_attention", {})) if "full_attention" in rope \
            else ({**(hf.get("rope_scaling") or {}), **rope}, {})
        if rope_scaling({}, loc) is not None:
            raise ConfigError("unsupported config feature: a RoPE scaling on Gemma 3's sliding-window layers")
        cap = hf.get("final_logit_softcapping")
        return cls(**{**fields, "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
                      "max_position_embeddings": int(hf.get("max_position_embeddings", 131_072))},
                   sliding=tuple(t == "sliding_attention" for t in types),
                   sliding_window=int(hf.get("sliding_window") or 4096),
                   query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                   rope_theta=float(glob.get("rope_theta", hf.get("rope_theta", 1_000_000.0))),
                   rope_scaling=rope_scaling({}, glob),
                   local_rope_theta=float(loc.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))),
                   final_logit_softcapping=None if cap is None else float(cap),
                   attention_bias=bool(hf.get("attention_bias", False)))

    def to_hf_dict(self) -> dict[str, Any]:
        glob: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            glob.update(dataclasses.asdict(self.rope_scaling))
        return {**common_hf_dict(self), "model_type": "gemma3_text", "intermediate_size": self.intermediate_size,
                "num_attention_heads": self.num_heads, "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": self.query_pre_attn_scalar, "sliding_window": self.sliding_window,
                "layer_types": ["sliding_attention" if s else "full_attention" for s in self.sliding],
                "rope_parameters": {"full_attention": glob,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta}},
                "final_logit_softcapping": self.final_logit_softcapping, "attention_bias": self.attention_bias}


@functools.partial(jax.jit, static_argnames=("cfg", "ops", "local_blocks", "sliding"))
def _layer(layer, x, keys, values, lengths, positions, mask, prefix, prefix_rows, *, cfg: Gemma3Config, ops: XlaOps,
           local_blocks: int | None, sliding: bool):
    """One Gemma 3 layer: (x, the layer's keys and values with the block written). Jitted on its own as
    the Llama layer is (one trace per layer kind)."""
    b, t = x.shape[:2]
    nq, nkv, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    qkv = ops.dense(rms_norm(x, layer["attn_norm"], eps, 1.0), layer["qkv"])
    if "qkv_bias" in layer:
        qkv = qkv + layer["qkv_bias"].astype(jnp.float32)
    heads = qkv.reshape(b, t, nq + 2 * nkv, hd)
    heads = jnp.concatenate([rms_norm(heads[:, :, :nq], layer["q_norm"], eps, 1.0),
                             rms_norm(heads[:, :, nq:nq + nkv], layer["k_norm"], eps, 1.0), heads[:, :, nq + nkv:]], 2)
    inv_freq = rope_inv_freq(cfg, cfg.local_rope_theta, None) if sliding else rope_inv_freq(cfg)
    heads = ops.rope(heads, positions, jnp.asarray(inv_freq), nq + nkv)
    # the attention scales scores by hd ** -0.5; Gemma's by query_pre_attn_scalar ** -0.5
    q = heads[:, :, :nq] * math.sqrt(hd / cfg.query_pre_attn_scalar)
    k, v = heads[:, :, nq:nq + nkv], heads[:, :, nq + nkv:]
    attn, keys, values = attend_cached(ops, q, k, v, keys, values, lengths, mask, prefix, prefix_rows, local_blocks)
    attn = ops.dense(attn, layer["o"])
    if "o_bias" in layer:
        attn = attn + layer["o_bias"].astype(jnp.float32)
    x = x + rms_norm(attn, layer["post_attn_norm"], eps, 1.0)
    mlp = ops.dense(geglu(ops.dense(rms_norm(x, layer["pre_mlp_norm"], eps, 1.0), layer["gate_up"])), layer["down"])
    return x + rms_norm(mlp, layer["post_mlp_norm"], eps, 1.0), keys, values
