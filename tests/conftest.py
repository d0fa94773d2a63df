"""Tiny randomly initialised Hugging Face checkpoints, built locally (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound (tiny models, hundreds of programs): LLVM's -O0 halves XLA's compile time.
# XLA's own passes (fusion, layout: what decides a pass's arithmetic) are unchanged; the CPU kernels are
# built as always; benchmarks and the CLI run at the default level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

def _session_compile_cache() -> None:
    """One persistent compilation cache for the whole test session, made fresh for it (never the user's
    ~/.cache; the measured pass costs live beside it): pytest-xdist's workers and the CLI subprocesses the tests start inherit its directory
    through PASS_JAX_COMPILE_CACHE, so a program that several processes compile (the demo model's decode,
    a tiny model's training step) is compiled once. The process that makes it removes it at exit."""
    import atexit
    import shutil
    import tempfile

    if "PASS_JAX_COMPILE_CACHE" not in os.environ:
        where = tempfile.mkdtemp(prefix="pass-jax-test-xla-")
        os.environ["PASS_JAX_COMPILE_CACHE"] = where
        os.environ.setdefault("PASS_JAX_COST_CACHE", os.path.join(where, "pass_costs.json"))  # adaptive drafting's
        atexit.register(shutil.rmtree, where, ignore_errors=True)
    from pass_jax.compile_cache import enable

    enable()


_session_compile_cache()

import pytest
from hypothesis import HealthCheck, settings

# Property tests compile a new model per example: 4 by default, 24 with --hypothesis-profile=thorough.
settings.register_profile("default", max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")

ARCHS = {
    # GQA, untied head
    "llama": {
        "cls": "LlamaForCausalLM",
        "vocab_size": 97,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    },
    # tied head, Llama-3 rope scaling (small original context so the scaling bites)
    "llama3": {
        "cls": "LlamaForCausalLM",
        "vocab_size": 89,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    # GQA with a sliding window shorter than the test sequences
    "mistral": {
        "cls": "MistralForCausalLM",
        "vocab_size": 101,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "sliding_window": 8,
    },
    # Llama with attention_bias: biases on q/k/v and o
    "llama_bias": {"cls": "LlamaForCausalLM", "vocab_size": 61, "hidden_size": 64, "intermediate_size": 96,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": True},
    # q/k/v biases, GQA
    "qwen2": {
        "cls": "Qwen2ForCausalLM",
        "vocab_size": 83,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    # q/k RMS norms per head, explicit head_dim
    "qwen3": {"cls": "Qwen3ForCausalLM", "vocab_size": 89, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
              "perturb_norms": True},
    # scaled embeddings, (1 + w) norms around attention and MLP, q/k norms, GeGLU, a query scalar other than
    # head_dim, sliding-window layers (window 6 < the test sequences) with their own RoPE between global ones
    "gemma3": {"cls": "Gemma3ForCausalLM", "config": "Gemma3TextConfig", "vocab_size": 79, "hidden_size": 64,
               "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "query_pre_attn_scalar": 12, "sliding_window": 6,
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
               "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
               "perturb_norms": True},
}


def build_hf_model(kind: str, seed: int = 0, **overrides):
    """A randomly initialised transformers model of one of ARCHS (eager attention, float32, eval mode)."""
    import torch
    import transformers

    spec = {**ARCHS[kind], **overrides}
    cls = getattr(transformers, spec.pop("cls"))
    config_cls = getattr(transformers, spec.pop("config", cls.__name__.replace("ForCausalLM", "Config")))
    perturb_norms = spec.pop("perturb_norms", False)
    config = config_cls(bos_token_id=None, eos_token_id=None, pad_token_id=None, **spec)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias") or perturb_norms and name.endswith("norm.weight"):
                param.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """kind -> (torch model, saved directory) for every architecture in ARCHS."""
    out = {}
    for kind in ARCHS:
        model = build_hf_model(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (model, str(path))
    return out


def tiny_model(vocab=32, hidden=32, layers=1, heads=2, kv_heads=1, seed=0, scale=0.5, **kw):
    """A random pass-jax Model with no tokenizer; a large init scale makes its outputs far from uniform."""
    import jax

    from pass_jax import Model, ModelConfig
    from pass_jax.models.llama import init_params

    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        **kw,
    )
    return Model(cfg, init_params(cfg, jax.random.key(seed), scale=scale))


def prefill_for_rounds(plan, params, lookahead, prompts):
    """(Inputs, state after the jitted prefill) for driving a decode loop round by round in a test:
    prompts padded to 16, zero row keys (greedy)."""
    import functools

    import jax
    import jax.numpy as jnp

    from pass_jax.decoding.rounds import _prefill
    from pass_jax.decoding.spec import Inputs
    from pass_jax.lookahead.leaf import split_lookahead

    padded = jnp.asarray([p + [0] * (16 - len(p)) for p in prompts])
    embeds, prefix = split_lookahead(lookahead) if lookahead is not None else (None, None)
    inp = Inputs(params, embeds, padded, jnp.asarray([len(p) for p in prompts]), jnp.zeros((len(prompts), 2),
                                                                                          jnp.uint32), prefix=prefix)
    return inp, jax.jit(functools.partial(_prefill, plan))(inp)


def run_and_kill_after_checkpoint(cmd, checkpoint: os.PathLike, final_marker: os.PathLike, env=None, cwd=None):
    """Start a training command, SIGKILL it once `checkpoint` exists, and check it had not finished."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not Path(checkpoint).is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not Path(final_marker).exists(), "killed too late: the run had finished"
