"""Look-ahead checkpoints: orbax arrays plus JSON metadata tying them to one base model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ..lookahead.leaf import DeepLookahead, check_k, split_lookahead
from ..sharding import host_array

METADATA = "lookahead.json"
SHIPPED = Path(__file__).resolve().parents[1] / "lookaheads"  # trained look-aheads of known models (package data)


class OtherWeightsWarning(UserWarning):
    """A look-ahead trained on other weights of the same architecture (e.g. bf16 hub weights vs a
    dequantized GGUF): decoding stays lossless, only acceptance may be lower."""


def architecture(config) -> dict:
    """What a look-ahead's shape and meaning depend on: the same for every quantization of one model."""
    c = config
    return {"architecture": c.architecture, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "num_layers": c.num_layers, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "intermediate_size": c.intermediate_size}


def shipped_lookaheads() -> dict[str, Path]:
    """Name -> directory of every look-ahead shipped with the package."""
    if not SHIPPED.is_dir():
        return {}
    return {d.name: d for d in sorted(SHIPPED.iterdir()) if (d / METADATA).is_file()}


def find_lookahead(model) -> Path | None:
    """The shipped look-ahead trained on exactly this model's weights, if there is one."""
    fingerprint = model_fingerprint(model)
    for path in shipped_lookaheads().values():
        if json.loads((path / METADATA).read_text()).get("base_model_fingerprint") == fingerprint:
            return path
    return None


def model_fingerprint(model) -> str:
    """Hash of the architecture and the first embedding rows: tells one base model from another,
    whatever dtype it was loaded in."""
    c = model.config
    h = hashlib.sha256(json.dumps([c.architecture, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads,
                                   c.num_kv_heads, c.head_dim]).encode())
    # rounded to bfloat16 so one model loaded in float32, float16 or bfloat16 has one fingerprint
    rows = host_array(model.params["embed"][:64])  # gathered, where a mesh spreads them over processes
    h.update(np.asarray(jnp.asarray(rows).astype(jnp.bfloat16).astype(jnp.float32)).tobytes())
    return h.hexdigest()[:16]


def save_lookahead(path: str | os.PathLike, lookahead, model, extra: dict | None = None) -> None:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    embeds, prefix = split_lookahead(lookahead)
    la = np.asarray(embeds, np.float32)
    state = {"lookahead": la} if prefix is None else {"lookahead": la, "prefix": np.asarray(prefix, np.float32)}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "state", state, force=True)
    meta = {"k": int(la.shape[0]), "d_model": int(la.shape[1]), "vocab_size": model.config.vocab_size,
            "deep_prefix": 0 if prefix is None else int(prefix.shape[2]),
            "base_model_fingerprint": model_fingerprint(model), "base_model_path": model.path,
            "base_model_architecture": architecture(model.config), **(extra or {})}
    import jax

    if jax.process_index() == 0:  # every process joins the orbax save; one writes the metadata
        (path / METADATA).write_text(json.dumps(meta, indent=2))


def load_lookahead(path: str | os.PathLike, model, k: int | None = None):
    """[k, d_model] look-ahead embeddings, after checking they were trained for this model.

    k None takes all of them; a smaller k takes the first k, a valid leaf on its own because
    look-ahead i attends only to look-aheads 1..i.
    """
    import orbax.checkpoint as ocp

    if k is not None:
        k = check_k(k)  # named as such, whatever the checkpoint holds
    path = Path(path).absolute()
    meta_path = path / METADATA
    if not meta_path.is_file():
        raise ConfigError(f"{str(path)!r} is not a look-ahead checkpoint (no {METADATA})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{meta_path} is corrupt: {e}") from None
    if meta.get("d_model") != model.config.hidden_size or meta.get("vocab_size") != model.config.vocab_size:
        raise ConfigError(f"look-ahead checkpoint {str(path)!r} was trained for a model with d_model={meta.get('d_model')}"
                          f", vocab={meta.get('vocab_size')}; this model has d_model={model.config.hidden_size}, "
                          f"vocab={model.config.vocab_size}")
    arch = meta.get("base_model_architecture")
    if arch is not None and arch != architecture(model.config):
        diff = ", ".join(f"{key} {arch.get(key)} != {value}" for key, value in architecture(model.config).items()
                         if arch.get(key) != value)
        raise ConfigError(f"look-ahead checkpoint {str(path)!r} was trained for another base model architecture "
                          f"({diff})")
    if meta.get("base_model_fingerprint") != model_fingerprint(model):
        if arch is None:  # no architecture recorded: the fingerprint is all we can go by
            raise ConfigError(f"look-ahead checkpoint {str(path)!r} was trained for another base model "
                              f"(fingerprint {meta.get('base_model_fingerprint')} != {model_fingerprint(model)})")
        import warnings

        warnings.warn(f"look-ahead checkpoint {path.name!r} was trained on other weights of this architecture "
                      f"({meta.get('base_model_path')}); decoding stays exact, acceptance may be lower",
                      OtherWeightsWarning, stacklevel=2)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            state = ckpt.restore(path / "state")
        la = state["lookahead"]
    except Exception as e:  # noqa: BLE001 -- orbax raises many kinds on damaged files
        raise ConfigError(f"cannot read look-ahead checkpoint {str(path)!r}: {type(e).__name__}: {e}") from None
    if tuple(la.shape) != (meta["k"], meta["d_model"]):
        raise ConfigError(f"look-ahead checkpoint {str(path)!r} is corrupt: shape {la.shape} != metadata")
    if k is not None and k > la.shape[0]:
        raise ValueError(f"look-ahead checkpoint {str(path)!r} holds k={la.shape[0]} embeddings, fewer than the "
                         f"k={k} asked for: use k <= {la.shape[0]} or train a larger k")
    if "prefix" in state:
        prefix = state["prefix"]
        want = (model.config.num_layers, 2, meta.get("deep_prefix"), model.config.num_kv_heads, model.config.head_dim)
        if tuple(prefix.shape) != want:
            raise ConfigError(f"look-ahead checkpoint {str(path)!r} is corrupt: deep prefix shape {prefix.shape} != {want}")
        return DeepLookahead(jnp.asarray(la[:k], jnp.float32), jnp.asarray(prefix, jnp.float32))
    return jnp.asarray(la[:k], jnp.float32)
