"""The data of one decode: what is static (`DecodeSpec`, `DecodePlan`: the jit key) and what is traced
(`Inputs`, and `DecodeState`, the loop's carry). The loop itself is each method's `decode`
(decoding.methods); its building blocks are in decoding.rounds."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from ..backends import resolve
from ..backends.xla import XlaOps
from ..lookahead.leaf import split_lookahead
from ..models.cache import KVCache
from ..models.contract import Decoder
from ..sharding import constrain_cache
from .sampling import Sampler
from .tree import DraftTree


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What to generate and how: static (part of the jit cache key)."""

    method: Any  # a decoding.methods.DraftMethod: its round, its prefill, what a round writes
    k: int = 0
    sampler: Sampler = dataclasses.field(default_factory=Sampler)
    max_new_tokens: int = 32
    eos_ids: tuple[int, ...] = ()
    tree: DraftTree | None = None  # the candidate tree of the tree rounds ("ngram", "pass"/"tree")

    @property
    def is_tree(self) -> bool:
        return self.method.tree

    @property
    def max_drafts(self) -> int:
        """Longest run of drafts one round can accept (the size of the acceptance statistics)."""
        return self.tree.max_depth if self.is_tree else self.k

    @property
    def block_tokens(self) -> int:
        """Largest block a round writes into the cache beyond the committed entries."""
        return self.method.block_tokens(self)


@struct.dataclass
class DecodeState:
    cache: KVCache
    pending: jax.Array  # [B] last emitted token, not yet in the cache
    drafts: jax.Array  # [B, k] drafts for the output positions after `pending`
    draft_probs: jax.Array  # [B, k, V] the distributions they were drawn from ([B, k, 1] when greedy)
    n_drafts: jax.Array  # [B] how many drafts are valid (0 or k)
    out: jax.Array  # [B, W] emitted tokens
    out_len: jax.Array  # [B]
    done: jax.Array  # [B] bool
    row_passes: jax.Array  # [B] forward passes while the row was live
    calls: jax.Array  # scalar: batched forward passes
    accepted: jax.Array  # [max_drafts] rounds in which drafts 1..j+1 were all accepted
    draft_rounds: jax.Array  # scalar: (row, round) pairs that verified drafts
    draft_cache: KVCache | None = None  # the draft model's cache (two-model speculative sampling only)
    top_candidates: jax.Array | None = None  # [B, k, C] tree methods: best C tokens of each look-ahead output
    node_hits: jax.Array | None = None  # [N] tree methods: (row, round) pairs whose accepted path held node i
    ngram_rows: jax.Array | None = None  # scalar, trees with an n-gram chain: (row, round) pairs that drafted one
    gains: jax.Array | None = None  # [3] adaptive drafting: accepted drafts of rows verifying look-ahead, n-gram, both
    gain_rows: jax.Array | None = None  # [2] the (row, round) pairs they were counted over
    choices: jax.Array | None = None  # [options] adaptive drafting: rounds that took each option


@struct.dataclass
class Inputs:
    """The traced inputs of one generation call, handed to every round."""

    params: dict
    lookahead: jax.Array  # [k, D] ([0, D] for methods without look-ahead)
    prompts: jax.Array  # [B, Tp] padded
    prompt_lens: jax.Array  # [B]
    row_keys: jax.Array  # [B, 2] raw per-row keys: randomness is indexed by (row, output position)
    draft_params: dict | None = None  # two-model speculative sampling only
    prefix: jax.Array | None = None  # deep look-ahead: [layers, 2, P, KV, hd] keys/values only look-aheads see



@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Everything static about a generation call (the jit cache key): the model's config, the
    spec, the KV cache size and the draft model's config. Calling it is the whole decode: pure,
    one `lax.while_loop`; under `jax.jit` pass the plan as a static argument (or close over it)."""

    cfg: Decoder
    spec: DecodeSpec
    max_len: int
    draft_cfg: Decoder | None = None
    mesh: Mesh | None = None  # a (data, model) mesh: the KV caches are pinned to sharding.CACHE_AXES
    max_position: int | None = None  # the last RoPE position a pass may use (None: any)
    ops: XlaOps | None = None  # the backend (pass_jax.backends.xla.XlaOps or a subclass; None: backends.default_ops(), this process's choice)
    pass_costs: tuple[float, ...] | None = None  # tree methods: relative cost of each adaptive option's pass (decoding.adaptive); None: the whole tree every round

    @property
    def backend(self) -> XlaOps:
        return resolve(self.ops)

    @property
    def round_ops(self) -> XlaOps:
        """The ops every round is traced with (ops.for_rounds: a backend whose arithmetic depends on the
        pass size makes a token's arithmetic in a verify pass a 1-token step's here)."""
        return self.backend.for_rounds()

    def pin(self, state: DecodeState) -> DecodeState:
        """On a mesh, keep the loop carry's KV caches split by the rules (rows over "data", KV heads
        over "model") rather than wherever GSPMD's propagation would put them."""
        if self.mesh is None:
            return state
        draft = None if state.draft_cache is None else constrain_cache(state.draft_cache, self.mesh)
        return state.replace(cache=constrain_cache(state.cache, self.mesh), draft_cache=draft)

    def __call__(self, params, lookahead, prompts, prompt_lens, key, draft_params=None) -> DecodeState:
        """prompts [B, Tp] padded, prompt_lens [B], key a PRNG key; returns the final DecodeState."""
        row_keys = jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(prompts.shape[0])))
        embeds, prefix = split_lookahead(lookahead)
        return self.spec.method.decode(self, Inputs(params, embeds, prompts, prompt_lens, row_keys, draft_params, prefix))
