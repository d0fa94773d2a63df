"""Qwen3: the Llama decoder with an RMS norm on every query and key head before RoPE."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from .layers import rms_norm
from .llama import LAYER, ModelConfig, common_fields, common_hf_dict, rope_parameters, rope_scaling, rope_theta


@dataclasses.dataclass(frozen=True)
class Qwen3Config(ModelConfig):
    """Params as the Llama family's, plus "q_norm" and "k_norm" [hd] in every layer."""

    architecture: str = "Qwen3ForCausalLM"
    ARCHITECTURES = ("Qwen3ForCausalLM",)

    def normed_heads(self, layer: dict, heads: jax.Array) -> jax.Array:
        nq, nkv, eps = self.num_heads, self.num_kv_heads, self.rms_norm_eps
        q = rms_norm(heads[:, :, :nq], layer["q_norm"], eps)
        k = rms_norm(heads[:, :, nq:nq + nkv], layer["k_norm"], eps)
        return jnp.concatenate([q, k, heads[:, :, nq + nkv:]], 2)

    def init_params(self, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
        params = super().init_params(key, dtype, scale)
        for layer in params["layers"]:
            layer["q_norm"] = layer["k_norm"] = jnp.ones((self.head_dim,), dtype)
        return params

    def layer_axes(self) -> dict:
        return {**super().layer_axes(), "q_norm": ("head_dim",), "k_norm": ("head_dim",)}

    def hf_sources(self) -> dict:
        src = super().hf_sources()
        for i, layer in enumerate(src["layers"]):
            p = LAYER.format(i) + "self_attn."
            layer["q_norm"], layer["k_norm"] = ([p + "q_norm.weight"], False, None), ([p + "k_norm.weight"], False, None)
        return src

    @property
    def num_params(self) -> int:
        return super().num_params + 2 * self.num_layers * self.head_dim

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> Qwen3Config:
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf.get('hidden_act')!r}: Qwen3 runs 'silu' (SwiGLU)")
        if hf.get("use_sliding_window"):
            raise ConfigError("unsupported config feature: Qwen3 use_sliding_window=True")
        bias = bool(hf.get("attention_bias", False))
        return cls(**common_fields(hf), rope_theta=rope_theta(hf), rope_scaling=rope_scaling(hf), attention_bias=bias,
                   o_bias=bias)

    def to_hf_dict(self) -> dict[str, Any]:
        return {**common_hf_dict(self), "model_type": "qwen3", "intermediate_size": self.intermediate_size,
                "num_attention_heads": self.num_heads, "hidden_act": "silu", "rope_parameters": rope_parameters(self),
                "attention_bias": self.attention_bias, "use_sliding_window": False}
