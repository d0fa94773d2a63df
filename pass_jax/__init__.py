"""pass-jax: Parallel Speculative Sampling (PaSS) for LLaMA-family models in JAX."""

from .api import GenerationResult, Model, generate, load_model, save_model, untrained_lookahead
from .cache import CacheOverflowError, KVCache
from .config import ConfigError, ModelConfig
from .lookahead import init_lookahead
from .sampling import Sampler

__all__ = ["CacheOverflowError", "ConfigError", "GenerationResult", "KVCache", "Model", "ModelConfig", "Sampler",
           "generate", "init_lookahead", "load_model", "save_model", "untrained_lookahead"]
__version__ = "0.1.0"
