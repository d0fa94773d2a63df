"""pass-jax: Parallel Speculative Sampling (PaSS) for LLaMA-family models in JAX."""

from .api import (
                  GenerationResult,
                  GenerationStats,
                  Model,
                  decode_fn,
                  generate,
                  load_model,
                  make_plan,
                  save_model,
                  untrained_lookahead,
)
from .compile_cache import enable as enable_compile_cache
from .decoding.sampling import Sampler
from .decoding.tree import DraftTree
from .errors import CacheOverflowError, ConfigError
from .lookahead.leaf import DeepLookahead, init_deep, init_lookahead
from .models.cache import KVCache
from .models.llama import ModelConfig

__all__ = ["CacheOverflowError", "ConfigError", "DeepLookahead", "DraftTree", "GenerationResult", "GenerationStats",
           "KVCache", "Model", "ModelConfig", "Sampler", "decode_fn", "enable_compile_cache", "generate", "init_deep",
           "init_lookahead", "load_model", "make_plan", "save_model", "untrained_lookahead"]
__version__ = "0.1.0"
