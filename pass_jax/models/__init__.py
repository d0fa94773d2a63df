"""The decoders pass-jax runs, by Hugging Face architecture name: one module each, one registry line each.

Every entry is a `Decoder` (models.contract) that also reads and writes Hugging Face checkpoints
(`from_hf_dict`, `to_hf_dict`, `hf_sources`, `init_params`, `param_axes`). A model of your own needs
only the contract: see tests/test_decoder_contract.py.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .contract import Decoder
from .gemma3 import Gemma3Config
from .llama import ModelConfig, architecture_of
from .qwen3 import Qwen3Config

ARCHITECTURES: dict[str, type] = {
    "LlamaForCausalLM": ModelConfig,
    "MistralForCausalLM": ModelConfig,
    "Qwen2ForCausalLM": ModelConfig,
    "Qwen3ForCausalLM": Qwen3Config,
    "Gemma3ForCausalLM": Gemma3Config,
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def config_from_hf(hf: dict[str, Any]):
    """The decoder config of a Hugging Face config.json dict, or one clear error naming what runs."""
    arch = architecture_of(hf, MODEL_TYPES)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unsupported architecture {arch!r}; pass-jax runs {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch].from_hf_dict(hf)


__all__ = ["ARCHITECTURES", "Decoder", "Gemma3Config", "ModelConfig", "Qwen3Config", "config_from_hf"]
