"""pass-jax: Parallel Speculative Sampling (PaSS) for decoder-only models in JAX."""

from .api import GenerationResult, GenerationStats, Model, decode_fn, generate, load_model, save_model
from .compile_cache import enable as enable_compile_cache
from .decoding.plan import make_plan, untrained_lookahead
from .decoding.sampling import Sampler
from .decoding.tree import DraftTree
from .errors import CacheOverflowError, ConfigError
from .lookahead.leaf import DeepLookahead, init_deep, init_lookahead
from .models.cache import KVCache
from .models.contract import Decoder
from .models.llama import ModelConfig

__all__ = ["CacheOverflowError", "ConfigError", "Decoder", "DeepLookahead", "DraftTree", "GenerationResult", "GenerationStats",
           "KVCache", "Model", "ModelConfig", "Sampler", "decode_fn", "enable_compile_cache", "generate", "init_deep",
           "init_lookahead", "load_model", "make_plan", "save_model", "untrained_lookahead"]
__version__ = "0.1.0"
