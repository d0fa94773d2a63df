"""python -m train pretrain: a byte-level BPE tokenizer and a small LLaMA model from a local corpus.

The default corpus is the Python standard library's own source, which every Python installation
carries (code completion is the paper's setting). The result is a Hugging Face directory that
pass-jax and `transformers` both load. Orbax checkpoints of (params, optimizer state) every
--save-every steps make a killed run resume exactly with --resume.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "tie_word_embeddings")
SPECIAL = ["<unk>", "<s>", "</s>"]


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train a tokenizer and a small LLaMA model from scratch", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of defaults (e.g. configs/pretrain-demo.yaml); flags override it")
    p.add_argument("--corpus", nargs="+", default=None,
                   help="files or directories of text/code (default: this Python's standard library, tests excluded)")
    p.add_argument("--out", help="output Hugging Face directory (checkpoints go to OUT/checkpoints)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--tie-word-embeddings", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--max-corpus-mb", type=float, default=64.0, help="read at most this much text")
    p.add_argument("--save-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style), wrapped for `transformers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def lm_loss(params, cfg, tokens):
    """Mean next-token cross-entropy of a batch [B, L]."""
    import jax.numpy as jnp

    from pass_jax.lookahead.training import target_log_prob
    from pass_jax.models.cache import KVCache
    from pass_jax.models.contract import causal_block_mask

    b, length = tokens.shape
    hidden, _ = cfg.forward(params, cfg.embed(params, tokens), jnp.broadcast_to(jnp.arange(length), (b, length)),
                        causal_block_mask(jnp.ones((b, length), bool)), KVCache.create(cfg, b, length))
    return -jnp.mean(target_log_prob(cfg.logits(params, hidden[:, :-1]), tokens[:, 1:]))


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    import optax
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from pass_jax import Model, ModelConfig, save_model
    from pass_jax.api import DTYPES
    from pass_jax.models.llama import init_params

    from .data import Batches, tokenize

    if not args.out:
        raise ValueError("--out is required (on the command line or in --config)")
    out = Path(args.out).absolute()
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not args.resume:
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    from .common import check_resume, read_corpus

    check_resume(out, args, (*MODEL_FIELDS, "corpus", "seq_len", "batch_size", "steps", "lr", "warmup",
                             "weight_decay", "seed", "max_corpus_mb"))
    tok_dir = out / "tokenizer"
    docs = read_corpus(args.corpus, args.max_corpus_mb)
    if (tok_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        tokenizer = train_tokenizer(docs, args.vocab_size)
        tmp_dir = out / "tokenizer.partial"
        tokenizer.save_pretrained(str(tmp_dir))
        tmp_dir.replace(tok_dir)  # atomic, so a kill never leaves half a tokenizer to resume from
    stream_path = out / "tokens.npy"
    if stream_path.is_file():
        stream = np.load(stream_path)
    else:
        stream = tokenize(docs, tokenizer, tokenizer.eos_token_id)
        np.save(out / "tokens.partial.npy", stream)
        (out / "tokens.partial.npy").replace(stream_path)
    cfg = ModelConfig(**{f: getattr(args, f) for f in MODEL_FIELDS}, max_position_embeddings=max(2048, args.seq_len),
                      bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,))
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but --vocab-size is {cfg.vocab_size}")
    batches = Batches(stream, args.seq_len, args.batch_size, args.seed)
    lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.warmup, 1), max(args.steps, args.warmup + 1),
                                            end_value=args.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, b2=0.95, weight_decay=args.weight_decay))
    params = init_params(cfg, jax.random.key(args.seed), scale=0.02)
    state = {"params": params, "opt_state": tx.init(params)}

    @jax.jit
    def step(state, tokens):
        loss, grads = jax.value_and_grad(lm_loss)(state["params"], cfg, tokens)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    start = 0
    if args.resume and manager.latest_step() is not None:
        start = manager.latest_step()
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        print(f"resumed from step {start}", file=sys.stderr)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet, desc="pretrain",
               unit="step", file=sys.stderr)
    log = (out / "pretrain_log.jsonl").open("a")
    t0, seen, loss = time.perf_counter(), 0, float("nan")
    for i in bar:
        state, value = step(state, jnp.asarray(batches.batch(i)))
        seen += args.batch_size * args.seq_len
        if (i + 1) % 10 == 0 or i + 1 == args.steps:
            loss = float(value)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{seen / (time.perf_counter() - t0):.0f}")
            log.write(json.dumps({"step": i + 1, "loss": loss, "seconds": time.perf_counter() - t0}) + "\n")
            log.flush()
        if (i + 1) % args.save_every == 0 or i + 1 == args.steps:
            manager.save(i + 1, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
    manager.close()
    held = batches.heldout[: (len(batches.heldout) // args.seq_len) * args.seq_len].reshape(-1, args.seq_len)[:16]
    eval_loss = float(jax.jit(lm_loss, static_argnums=1)(state["params"], cfg, jnp.asarray(held))) if len(held) else None
    save_dtype = DTYPES[args.save_dtype]
    final = jax.tree.map(lambda x: x.astype(save_dtype), state["params"])
    save_model(Model(cfg, final, tokenizer), out)
    summary = {"out": str(out), "steps": args.steps, "train_loss": loss, "heldout_loss": eval_loss,
               "params": cfg.num_params, "tokens_seen": args.steps * args.batch_size * args.seq_len,
               "corpus_tokens": len(stream)}
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0
