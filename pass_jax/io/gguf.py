"""llama.cpp GGUF files -> pass-jax config, params and tokenizer (no torch needed).

Tensors are dequantized with `gguf.quants.dequantize` (whatever types it supports: F32, F16, BF16,
Q4_0/1, Q5_0/1, Q8_0 and the K-quants) and renamed to Hugging Face names, so the layout work
(transposes, fused q/k/v and gate/up) is hf.py's. llama.cpp's converter reorders the rows of
attn_q / attn_k for its interleaved RoPE; we undo that exactly as transformers does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..models.llama import ModelConfig, RopeScaling
from .hf import params_from_hf_tensors

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def is_gguf(path: str | os.PathLike) -> bool:
    """A .gguf name, or any file that starts with the GGUF magic."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def open_gguf(path: str | os.PathLike):
    """(GGUFReader, metadata dict) with clear errors for missing, truncated or foreign files."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"GGUF file {str(p)!r} does not exist")
    try:
        reader = gguf.GGUFReader(str(p))
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # noqa: BLE001 -- the reader raises ValueError, struct.error, IndexError... on damaged files
        raise ConfigError(f"cannot read GGUF file {str(p)!r} (truncated or not a GGUF file?): "
                          f"{type(e).__name__}: {e}") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"unsupported GGUF architecture {arch!r} in {p.name}: pass-jax reads 'llama' GGUF files")
    return reader, meta


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (per head: [2, hd/2] -> [hd/2, 2]); transformers' formula."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class _Tensors(Mapping):
    """HF-named tensors, dequantized one at a time on access so peak memory stays near one tensor."""

    def __init__(self, reader, heads: int, kv_heads: int):
        self._heads, self._kv = heads, kv_heads
        self._by_hf: dict[str, Any] = {}
        for t in reader.tensors:
            hf = _TOP_NAMES.get(t.name)
            parts = t.name.split(".")
            if hf is None and len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
                hf = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
            if hf is not None:
                self._by_hf[hf] = t

    def __getitem__(self, name: str) -> np.ndarray:
        import gguf

        t = self._by_hf[name]
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except NotImplementedError:
            raise ConfigError(f"tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize") from None
        w = w.reshape([int(n) for n in reversed(t.shape)])  # ggml lists dims fastest-first
        if ".attn_q." in t.name:
            w = _reverse_permute(w, self._heads)
        elif ".attn_k." in t.name:
            w = _reverse_permute(w, self._kv)
        return w

    def __iter__(self):
        return iter(self._by_hf)

    def __len__(self):
        return len(self._by_hf)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._by_hf[name].shape))


def _int(meta: dict, key: str, default=None) -> int:
    if key in meta:
        return int(meta[key])
    if default is None:
        raise ConfigError(f"GGUF metadata lacks {key!r}")
    return default


def config_from_gguf(reader, meta: dict) -> ModelConfig:
    """ModelConfig from llama.* / tokenizer.ggml.* metadata; vocab and tying from the tensors."""
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ConfigError("this GGUF stores Llama-3.1-style RoPE frequency factors (rope_freqs), which pass-jax "
                          "does not read from GGUF yet: load the Hugging Face checkpoint instead")
    if any(n.endswith(".bias") for n in names):
        raise ConfigError("this GGUF has bias tensors, which pass-jax does not read from llama GGUF files")
    scaling = None
    rope_type = meta.get("llama.rope.scaling.type", "none")
    if rope_type == "linear":
        scaling = RopeScaling("linear", float(meta["llama.rope.scaling.factor"]))
    elif rope_type != "none":
        raise ConfigError(f"unsupported GGUF rope scaling {rope_type!r}: pass-jax implements none and linear")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise ConfigError("GGUF file lacks token_embd.weight")
    d = _int(meta, "llama.embedding_length")
    heads = _int(meta, "llama.attention.head_count")
    kv_heads = _int(meta, "llama.attention.head_count_kv", heads)
    head_dim = _int(meta, "llama.attention.key_length", _int(meta, "llama.rope.dimension_count", d // heads))
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    cfg = ModelConfig(
        vocab_size=int(emb.shape[1]),  # ggml shape [D, V]
        hidden_size=d,
        intermediate_size=_int(meta, "llama.feed_forward_length"),
        num_layers=_int(meta, "llama.block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=_int(meta, "llama.context_length", 2048),
        bos_token_id=int(meta["tokenizer.ggml.bos_token_id"]) if "tokenizer.ggml.bos_token_id" in meta else None,
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
    )
    if heads % kv_heads:
        raise ConfigError(f"head_count={heads} is not a multiple of head_count_kv={kv_heads}")
    return cfg


def gguf_tokenizer(path: str | os.PathLike, meta: dict):
    """The tokenizer transformers would build from this file, or None if the file has no vocabulary.

    transformers' own `AutoTokenizer.from_pretrained(dir, gguf_file=...)` imports torch just to read
    the metadata, so we read it with gguf and hand it to the same converter (torch-free); only if that
    internal module is missing do we fall back to AutoTokenizer, which then needs torch.
    """
    if "tokenizer.ggml.tokens" not in meta:
        return None
    try:
        from transformers import TokenizersBackend
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        p = Path(path)
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        except ImportError as e:
            raise ConfigError(f"reading the tokenizer of a GGUF file needs torch with this transformers: {e}") from None
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tok_dict.get("tokenizer_type") == "llama":  # as transformers: sentencepiece files add BOS by default
        tok_config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tok_config[name] = tok_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tok_dict)
    return TokenizersBackend(tokenizer_object=backend, **tok_config, **extra)


def load_gguf(path: str | os.PathLike, dtype, tokenizer: bool = True):
    """(config, params, config.json-style dict, tokenizer or None) from a llama GGUF file."""
    reader, meta = open_gguf(path)
    cfg = config_from_gguf(reader, meta)
    tensors = _Tensors(reader, cfg.num_heads, cfg.num_kv_heads)
    want = {"model.layers.0.self_attn.q_proj.weight": (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
            "model.layers.0.mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size)}
    for name, shape in want.items():
        if name in tensors and tensors.shape(name) != shape:
            raise ConfigError(f"GGUF tensor {name} has shape {tensors.shape(name)}, the metadata implies {shape}")
    params = params_from_hf_tensors(cfg, tensors, dtype)
    tok = gguf_tokenizer(path, meta) if tokenizer else None
    return cfg, params, cfg.to_hf_dict(), tok
