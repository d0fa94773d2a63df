"""The public API: load a model, generate with autoregressive decoding or PaSS."""

from __future__ import annotations

import dataclasses
import numbers
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .decoding.adaptive import options
from .decoding.plan import make_plan
from .decoding.spec import DecodePlan
from .decoding.tree import DraftTree
from .io.hf import load_hf, save_hf
from .models.contract import Decoder, params_dtype
from .sharding import replicate, shard_batch, shard_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Model:
    config: Decoder  # a ModelConfig (Llama family), any pass_jax.models entry, or a decoder of your own
    params: Any
    tokenizer: Any = None
    hf_config: dict | None = None
    path: str | None = None

    @property
    def dtype(self):
        return params_dtype(self.params)


def load_model(model_dir: str | os.PathLike, dtype: str = "float32", tokenizer: bool = True,
               mesh: Mesh | None = None) -> Model:
    """Load a Hugging Face Llama / Mistral / Qwen2 directory (tokenizer too, when it has one), a llama
    .gguf file (llama.cpp, dequantized), or a Hub id `org/name` (downloaded when not a local path).

    With a (data, model) `mesh` the params are global arrays split by `sharding.LOGICAL_RULES`, and
    each process reads from the safetensors files only the slices its own devices hold (no full
    host copy). A GGUF file is dequantized whole, then placed: its quantized blocks do not slice."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from .io.gguf import is_gguf, load_gguf
    from .io.hub import resolve_model_path

    model_dir = resolve_model_path(model_dir)
    if is_gguf(model_dir):
        cfg, params, hf, tok = load_gguf(model_dir, DTYPES[dtype], tokenizer)
        if mesh is not None:
            params = shard_params(params, cfg, mesh)
        return Model(cfg, params, tok, hf, str(model_dir))
    cfg, params, hf = load_hf(model_dir, DTYPES[dtype], mesh)
    tok = None
    path = Path(model_dir)
    if tokenizer and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    return Model(cfg, params, tok, hf, str(path))


def save_model(model: Model, model_dir: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Save as a Hugging Face directory that `transformers` (and load_model) can read."""
    save_hf(model_dir, model.config, model.params, model.hf_config, max_shard_bytes)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(model_dir))


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """What one generate call measured; `to_dict()` is the "stats" object of the JSON output
    (README.md, "JSON output")."""

    new_tokens: int
    forward_passes: int  # passes of the whole batch
    tokens_per_forward: float  # new tokens over the sum of each row's forward passes
    seconds: float  # wall time after compilation, so that two methods compare fairly
    compile_seconds: float
    tokens_per_second: float
    acceptance_by_position: list[float]  # fraction of rounds in which drafts 1..j+1 were all accepted
    row_forward_passes: list[int]
    node_acceptance: list[float] | None = None  # tree methods: how often each node was on the accepted path
    ngram_share: float | None = None  # trees with an n-gram chain: share of rounds in which a row drafted one
    round_options: dict[str, float] | None = None  # adaptive drafting: share of rounds that took each option
    drafting_skipped: float | None = None  # adaptive drafting: share of rounds that were autoregressive steps

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in ("node_acceptance", "ngram_share", "round_options", "drafting_skipped")}

    def __getitem__(self, key: str):
        """stats["seconds"], as when stats were a dict."""
        return getattr(self, key)


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[list[int]]  # new tokens per prompt, without the prompt
    texts: list[str] | None
    stats: GenerationStats


def _tokenize(model: Model, prompts, chat: bool = False) -> list[list[int]]:
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], numbers.Integral)):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    ids = []
    for p in prompts:
        if chat and not isinstance(p, str):
            raise ValueError("chat=True takes text prompts (user messages), not token ids")
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            if chat:
                if not getattr(model.tokenizer, "chat_template", None):
                    raise ValueError("this model's tokenizer has no chat template: drop --chat / chat=True")
                p = model.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True)
            p = model.tokenizer(p, add_special_tokens=not chat)["input_ids"]
        p = [int(t) for t in p]
        if not p:
            raise ValueError("empty prompt: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary (size {model.config.vocab_size})")
        ids.append(p)
    return ids


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


_COMPILED: dict = {}  # plan and shapes -> (executable, compile seconds); the oldest go past _MAX_COMPILED
_MAX_COMPILED = 64


def _compiler_options() -> dict | None:
    """XLA CPU's region-based copy insertion: without it a round's conditional (a drafting method's choice
    of pass) copies the whole KV cache twice a round, a cost that grows with the batch; with it the
    cache is updated in place (PASS_JAX_REGION_COPIES=0 turns it off)."""
    if jax.default_backend() != "cpu" or os.environ.get("PASS_JAX_REGION_COPIES") == "0":
        return None
    return {"xla_cpu_copy_insertion_use_region_analysis": True}


def _compiled(plan: DecodePlan, args):
    """The compiled decode for this plan and these argument shapes, and the seconds compiling took (0 if cached)."""
    leaves, tree = jax.tree.flatten(args)
    key = (plan, tree, tuple((x.shape, str(x.dtype)) for x in leaves))
    if key not in _COMPILED:
        t0 = time.perf_counter()
        if plan.mesh is None:
            fn = jax.jit(plan)
        else:  # inputs as placed by _sharded_args; outputs replicated so that every process reads every row
            fn = jax.jit(_without_caches(plan), in_shardings=jax.tree.map(lambda x: x.sharding, args),
                         out_shardings=NamedSharding(plan.mesh, P()))
        exe = fn.lower(*args).compile(compiler_options=_compiler_options())
        if len(_COMPILED) >= _MAX_COMPILED:
            del _COMPILED[next(iter(_COMPILED))]
        _COMPILED[key] = (exe, time.perf_counter() - t0)
        return exe, _COMPILED[key][1]
    return _COMPILED[key][0], 0.0


def decode_fn(plan: DecodePlan):
    """A pure function (params, lookahead, prompts [B, Tp], prompt_lens [B], key[, draft_params]) ->
    (tokens [B, max_new_tokens], lengths [B]) for use inside your own `jax.jit`, shardings and
    pipelines; tokens past a row's length are padding. Build the plan with `make_plan`."""

    def fn(params, lookahead, prompts, prompt_lens, key, draft_params=None):
        state = plan(params, lookahead, prompts, prompt_lens, key, draft_params)
        return state.out[:, :plan.spec.max_new_tokens], state.out_len

    return fn


def _sharded_args(plan: DecodePlan, params, lookahead, prompts, prompt_lens, key, draft_params):
    """The decode's arguments placed on plan.mesh by the rules; the key travels as raw key data."""
    mesh = plan.mesh
    args = (shard_params(params, plan.cfg, mesh), replicate(lookahead, mesh),
            shard_batch(prompts, mesh), shard_batch(prompt_lens, mesh), replicate(jax.random.key_data(key), mesh))
    return args if draft_params is None else args + (shard_params(draft_params, plan.draft_cfg, mesh),)


def _without_caches(plan: DecodePlan):
    """The plan with a raw key in, and the final state without its KV caches out (nothing reads them)."""
    def fn(params, lookahead, prompts, prompt_lens, key_data, draft_params=None):
        state = plan(params, lookahead, prompts, prompt_lens, jax.random.wrap_key_data(key_data), draft_params)
        return state.replace(cache=None, draft_cache=None)

    return fn


def generate(model: Model, prompts: str | Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             method: str = "ar", k: int = 4, lookahead=None, variant: str = "tree", temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
             max_len: int | None = None, draft_model: Model | None = None,
             pad_prompts_to: int | None = None, tree: DraftTree | str | None = None,
             chat: bool = False, allow_long: bool = False, mesh: Mesh | None = None,
             backend="auto", pass_costs="auto") -> GenerationResult:
    """Generate `max_new_tokens` per prompt (fewer where a row meets EOS).

    method "ar" is plain autoregressive decoding; "pass" drafts with the look-ahead embeddings
    `lookahead` ([k, d_model]; None = untrained baseline) and verifies losslessly; "ngram" drafts
    from the row's own context (prompt lookup); "speculative" is classic two-model speculative
    sampling with `draft_model` (same vocabulary) proposing k tokens. PaSS variant "tree" verifies
    a tree of candidates per pass (`tree`: a DraftTree or its string form, e.g. "3,1;ngram=4"),
    "fused" / "paper" the paper's chain. temperature 0 is greedy. eos_token_id None takes the
    model's; () disables EOS stops. chat=True wraps each text prompt in the tokenizer's chat
    template as a user message. max_len is the KV cache size (default: just what the request
    needs). pad_prompts_to pads the batch to one length, so differently sized requests share one
    compiled program. A request past the model's max_position_embeddings is an error, or with
    allow_long=True a warning. On a (data, model) `mesh` (sharding.make_mesh) the whole loop runs
    under one jit, rows split over "data" (the batch must be a multiple of it) and weights over
    "model" by sharding.LOGICAL_RULES; every process of a multi-process run calls it alike and gets
    every row back. `backend` as for `make_plan`. `pass_costs` ("auto": measured on this machine for
    this batch size, once; None: the whole tree every round) makes the tree methods choose each round's
    drafting from what a pass costs here (`make_plan`, decoding.adaptive).
    """
    ids = _tokenize(model, prompts, chat)
    if mesh is not None and len(ids) % mesh.shape["data"]:
        raise ValueError(f"a batch of {len(ids)} prompts does not split over the mesh's data axis of "
                         f"{mesh.shape['data']}: pass a multiple of it (add dummy prompts and drop their rows)")
    lens = [len(p) for p in ids]
    tp = _round_up(max(max(lens), pad_prompts_to or 0), 16)
    plan, lookahead = make_plan(
        model, prompt_len=tp, longest_prompt=max(lens), max_new_tokens=max_new_tokens, method=method, k=k,
        lookahead=lookahead, variant=variant, tree=tree, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, max_len=max_len, draft_model=draft_model, allow_long=allow_long, mesh=mesh,
        backend=backend, batch_size=len(ids), pass_costs=pass_costs)
    padded = np.zeros((len(ids), tp), np.int32)
    for i, p in enumerate(ids):
        padded[i, :len(p)] = p
    draft_params = draft_model.params if plan.draft_cfg is not None else None
    args = (model.params, lookahead, jnp.asarray(padded), jnp.asarray(lens, jnp.int32), jax.random.key(seed),
            draft_params)
    if mesh is not None:
        args = _sharded_args(plan, *args)
    exe, compile_s = _compiled(plan, args)
    t0 = time.perf_counter()
    state = jax.block_until_ready(exe(*args))
    seconds = time.perf_counter() - t0
    out, out_len = np.asarray(state.out), np.asarray(state.out_len)
    token_ids = [out[i, :out_len[i]].tolist() for i in range(len(ids))]
    new_tokens = int(out_len.sum())
    row_passes = np.asarray(state.row_passes)
    rounds = int(state.draft_rounds)
    node_acceptance = ngram_share = None
    if state.node_hits is not None:  # tree methods: how often each node was on the accepted path
        hits = np.asarray(state.node_hits)
        node_acceptance = (hits / max(int(hits[0]), 1)).tolist()
        if state.ngram_rows is not None:  # the root is on every live (row, round) pair's path
            ngram_share = int(state.ngram_rows) / max(int(hits[0]), 1)
    round_options = skipped = None
    if state.choices is not None:
        names = [o.name for o in options(plan.spec.tree, plan.spec.method.lookahead)]
        shares = np.asarray(state.choices) / max(int(np.asarray(state.choices).sum()), 1)
        round_options = {name: float(x) for name, x in zip(names, shares)}
        skipped = round_options["ar"]
    stats = GenerationStats(
        new_tokens=new_tokens,
        forward_passes=int(state.calls),
        tokens_per_forward=new_tokens / max(int(row_passes.sum()), 1),
        seconds=seconds,
        compile_seconds=compile_s,
        tokens_per_second=new_tokens / seconds if seconds > 0 else float("inf"),
        acceptance_by_position=[float(a) / rounds if rounds else 0.0 for a in np.asarray(state.accepted)],
        row_forward_passes=row_passes.tolist(),
        node_acceptance=node_acceptance,
        ngram_share=ngram_share,
        round_options=round_options,
        drafting_skipped=skipped,
    )
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
    return GenerationResult(token_ids, texts, stats)
