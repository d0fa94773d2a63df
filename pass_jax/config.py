"""Model and generation configuration: frozen (hashable) so jit can take them as static args."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class ConfigError(ValueError):
    """A model directory or config that pass-jax cannot run, with the reason in the message."""


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
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else _MODEL_TYPES.get(hf.get("model_type", ""))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch or hf.get('model_type')!r}; "
                f"pass-jax runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ConfigError(f"config.json lacks required fields: {', '.join(missing)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) is implemented")
        if hf.get("mlp_bias"):
            raise ConfigError("unsupported config feature mlp_bias=True")
        if hf.get("use_sliding_window") and arch == "Qwen2ForCausalLM":
            raise ConfigError("unsupported config feature: Qwen2 use_sliding_window=True")
        heads = int(hf["num_attention_heads"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling("llama3", float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)),
                                  float(rope.get("high_freq_factor", 4.0)),
                                  int(rope.get("original_max_position_embeddings", 8192)))
        elif rope_type == "linear":
            scaling = RopeScaling("linear", float(rope["factor"]))
        elif rope_type != "default":
            raise ConfigError(f"unsupported rope type {rope_type!r}: pass-jax implements default, linear, llama3")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        window = hf.get("sliding_window", 4096) if arch == "MistralForCausalLM" else None  # HF's default
        llama_bias = arch == "LlamaForCausalLM" and bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or llama_bias,
            o_bias=llama_bias,
            sliding_window=int(window) if window else None,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that `transformers` loads as the same architecture."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(dataclasses.asdict(self.rope_scaling))
        hf = {
            "architectures": [self.architecture],
            "model_type": {v: k for k, v in _MODEL_TYPES.items()}[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else
            (self.eos_token_ids[0] if self.eos_token_ids else None),
        }
        if self.architecture == "LlamaForCausalLM":
            hf["attention_bias"] = self.o_bias
        if self.architecture == "MistralForCausalLM":
            hf["sliding_window"] = self.sliding_window
        return hf


def rope_inv_freq(cfg: ModelConfig):
    """Inverse RoPE frequencies, with Hugging Face's linear / Llama-3 scaling applied."""
    import numpy as np

    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    s = cfg.rope_scaling
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
