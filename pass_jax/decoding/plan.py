"""`make_plan`: a generation request checked and turned into a `DecodePlan` (static) and the look-ahead
it reads, in named steps: the method, its k, its tree, its look-ahead, the draft model, the stop tokens,
the cache size."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import jax.numpy as jnp

from ..backends import resolve
from ..errors import CacheOverflowError
from ..lookahead.leaf import DeepLookahead, check_k
from . import costs
from .adaptive import option_tokens, options
from .methods import DraftMethod, find
from .sampling import Sampler
from .spec import DecodePlan, DecodeSpec
from .tree import DraftTree

# The fastest PaSS tree measured (infer/results/tune_smollm2_{code,chat}.json, where tune picks it): the
# best look-ahead candidate and a 4-token n-gram chain drafted after 2+ matching tokens, a one-slot
# look-ahead block on every node. With one block at the root instead (blocks=1, the default before),
# every round carries k slots: 6 tokens instead of 4 in the rounds without a chain (most rounds),
# 6-7% slower on SmolLM2 in bfloat16 in those runs.
DEFAULT_TREE = DraftTree.from_widths((1,), ngram=4, ngram_min=2)
DEFAULT_NGRAM = 4


def make_plan(model, *, prompt_len: int, max_new_tokens: int = 64, method: str = "ar", k: int = 4,
              lookahead=None, variant: str = "tree", tree: DraftTree | str | None = None, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
              max_len: int | None = None, draft_model=None, allow_long: bool = False,
              longest_prompt: int | None = None, mesh=None, backend="auto", batch_size: int | None = None,
              pass_costs="auto"):
    """(DecodePlan, look-ahead array) for prompts padded to `prompt_len` tokens: every argument
    checked, the look-ahead resolved (None = the untrained baseline) and cut to what the plan reads.
    Arguments as for `generate`; `longest_prompt` (default prompt_len)
    bounds the positions used; on a `mesh` the plan pins its KV caches to the sharding rules (give it
    params placed by them). `backend` ("auto", "xla", "cpu" or a pass_jax.backends.xla.XlaOps) is the
    plan's implementation of the ops, fixed in the plan (a static field): "auto" takes the CPU kernels on
    one CPU device where they build. `pass_costs` makes a tree method's rounds adaptive
    (decoding.adaptive): "auto" measures this machine's pass costs for `batch_size` rows (once, cached;
    without a batch_size, or on a mesh, the whole tree runs every round), None turns it off, or give
    one relative cost per option (decoding.adaptive.options)."""
    draft = find(method, variant)
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    k = check_k(k) if draft.uses_k else 0
    tree = _tree_for(draft, tree, k)
    lookahead, k = _lookahead_for(model, draft, k, lookahead, tree)
    draft_model = _checked_draft_model(model, draft, draft_model)
    spec = DecodeSpec(draft, k, Sampler(float(temperature), int(top_k), float(top_p)), max_new_tokens,
                      _stop_tokens(model, eos_token_id), tree)
    longest = prompt_len if longest_prompt is None else longest_prompt
    max_len = _cache_size(model.config, spec, prompt_len, longest, max_len, allow_long)
    last = None if allow_long else model.config.max_position_embeddings - 1
    plan = DecodePlan(model.config, spec, max_len, draft_model.config if draft_model else None, mesh, last,
                      resolve(backend))
    return dataclasses.replace(plan, pass_costs=_pass_costs(plan, model.params, batch_size, pass_costs)), lookahead


def _pass_costs(plan: DecodePlan, params, batch_size: int | None, pass_costs) -> tuple[float, ...] | None:
    """The plan's relative cost per adaptive option: measured ("auto"), given, or None (the whole tree)."""
    spec = plan.spec
    if pass_costs is None or not spec.is_tree:
        return None
    n = len(options(spec.tree, spec.method.lookahead))
    if isinstance(pass_costs, str):
        if pass_costs != "auto":
            raise ValueError(f"pass_costs must be 'auto', None or {n} numbers, got {pass_costs!r}")
        if batch_size is None or plan.mesh is not None:
            return None
        tokens = option_tokens(spec.tree, spec.method.lookahead, spec.k)
        return costs.relative(costs.pass_costs(plan.cfg, params, plan.round_ops, batch_size, tokens))
    pass_costs = tuple(float(c) for c in pass_costs)
    if len(pass_costs) != n or min(pass_costs) <= 0:
        raise ValueError(f"pass_costs needs {n} positive numbers (options "
                         f"{', '.join(o.name for o in options(spec.tree, spec.method.lookahead))}), got {pass_costs}")
    return pass_costs


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")


def _tree_for(draft: DraftMethod, tree, k: int) -> DraftTree | None:
    """The candidate tree of a tree method (its default, or the one given, checked against k)."""
    if tree is not None and not draft.tree:
        raise ValueError(f"tree= applies to method 'ngram' and PaSS variant 'tree', not to method {draft.name!r}")
    if not draft.tree:
        return None
    if not draft.lookahead:  # n-gram drafts alone
        tree = DraftTree(ngram=DEFAULT_NGRAM, ngram_min=2) if tree is None else _as_tree(tree)
        if tree.paths or tree.ngram < 1:
            raise ValueError(f"method 'ngram' takes a tree of n-gram drafts only (e.g. 'ngram=4'), got {tree.describe()!r}")
        return tree
    if tree is None:  # the default, cut to the look-ahead positions there are
        return dataclasses.replace(DEFAULT_TREE, paths=tuple(p for p in DEFAULT_TREE.paths if len(p) <= k))
    tree = _as_tree(tree)
    if tree.la_depth > k:
        raise ValueError(f"tree {tree.describe()!r} drafts {tree.la_depth} look-ahead positions deep, but k={k}")
    if not tree.paths:
        raise ValueError(f"tree {tree.describe()!r} has no look-ahead candidates: use method 'ngram' for n-gram "
                         "drafts alone")
    if tree.num_blocks(k) == 0:
        raise ValueError(f"tree {tree.describe()!r} has look-ahead candidates but no look-ahead block to draft "
                         "them (blocks=0): use blocks >= 1")
    return tree


def _as_tree(tree: DraftTree | str) -> DraftTree:
    return tree if isinstance(tree, DraftTree) else DraftTree.parse(tree)


def _lookahead_for(model, draft: DraftMethod, k: int, lookahead, tree: DraftTree | None):
    """(the look-ahead the plan reads, cut to the slots its tree uses; that slot count as the plan's k)."""
    cfg = model.config
    if not draft.lookahead:
        return jnp.zeros((0, cfg.hidden_size), jnp.float32), k
    lookahead = untrained_lookahead(model, k) if lookahead is None else lookahead
    if not isinstance(lookahead, DeepLookahead):
        lookahead = jnp.asarray(lookahead, jnp.float32)
    elif lookahead.prefix.shape[:2] != (cfg.num_layers, 2) or lookahead.prefix.shape[3:] != (
            cfg.num_kv_heads, cfg.head_dim):
        raise ValueError(f"deep look-ahead prefix has shape {lookahead.prefix.shape}, expected ({cfg.num_layers}, "
                         f"2, P, {cfg.num_kv_heads}, {cfg.head_dim})")
    if lookahead.shape != (k, cfg.hidden_size):
        raise ValueError(f"look-ahead embeddings have shape {lookahead.shape}, expected ({k}, {cfg.hidden_size})")
    if tree is not None:  # only the slots the tree reads (look-ahead i sees look-aheads 1..i alone)
        k = max(tree.slots_used(k), 1)
        lookahead = lookahead[:k]
    return lookahead, k


def untrained_lookahead(model, k: int):
    """The paper's untrained baseline: k copies of an [UNK]-like token's input embedding."""
    unk = getattr(model.tokenizer, "unk_token_id", None) if model.tokenizer is not None else None
    token = unk if unk is not None else 0
    if not 0 <= token < model.config.vocab_size:
        raise ValueError(f"token_id {token} is outside the vocabulary (size {model.config.vocab_size})")
    rows = model.config.embed(model.params, jnp.full((1, check_k(k)), token, jnp.int32))  # as the model reads them
    return jnp.asarray(rows[0], jnp.float32)


def _checked_draft_model(model, draft: DraftMethod, draft_model):
    if draft.name != "speculative":
        return None
    if draft_model is None:
        raise ValueError("method 'speculative' needs a draft_model")
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_model.config.vocab_size}) differs from the "
                         f"target's ({model.config.vocab_size}): speculative sampling needs the same tokenizer")
    return draft_model


def _stop_tokens(model, eos_token_id) -> tuple[int, ...]:
    """eos_token_id as given (() = none), or the model's and its tokenizer's."""
    if eos_token_id is None:
        eos = set(model.config.eos_token_ids)
        if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
            eos.add(model.tokenizer.eos_token_id)
    else:
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    return tuple(sorted(eos))


def _cache_size(cfg, spec: DecodeSpec, prompt_len: int, longest: int, max_len: int | None, allow_long: bool) -> int:
    """The KV cache size: max_len as given (checked), else what the request needs, rounded up to 64.

    Positions a row may emit at: prompt and output. A draft block can reach further near the end of a
    request; its positions are clipped (DecodePlan.max_position), as drafts past the budget are never
    accepted, so every request autoregressive decoding accepts, every method accepts."""
    new = spec.max_new_tokens
    reach = longest + new
    if reach > cfg.max_position_embeddings:
        msg = (f"this request reaches position {reach} (longest prompt {longest} + max_new_tokens {new}), "
               f"past the model's max_position_embeddings {cfg.max_position_embeddings}")
        if not allow_long:
            raise ValueError(f"{msg}; shorten the prompt, lower max_new_tokens, or pass allow_long=True (--allow-long)")
        warnings.warn(f"{msg}: output past the trained context may be poor", stacklevel=4)
    needed = max(prompt_len + spec.k, longest + new + spec.block_tokens)
    if max_len is None:
        return -(-needed // 64) * 64
    if needed > max_len:
        raise CacheOverflowError(
            f"the KV cache holds {max_len} entries but this request needs {needed}: longest prompt "
            f"{longest} (padded to {prompt_len}) + max_new_tokens {new} + {spec.block_tokens} block "
            "entries; shorten the prompt, lower max_new_tokens, or raise max_len")
    return max_len
