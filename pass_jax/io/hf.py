"""Hugging Face checkpoint directories <-> the params pytree (safetensors, single or sharded)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ..models import config_from_hf


def read_hf_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"model directory {str(path)!r} does not exist")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{str(path)!r} has no config.json: is it a Hugging Face model directory?")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{cfg_path} must hold a JSON object")
    return hf


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise ConfigError(f"{str(path)!r} lacks weight file {name} (expected safetensors weights)")
        try:
            tensors.update(_load_any_dtype(f, load_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"cannot read {f}: {e}") from None
    return tensors


def _load_any_dtype(f: Path, load_file) -> dict[str, np.ndarray]:
    """numpy has no bfloat16 of its own: read such files through ml_dtypes via the torch-free flax path."""
    try:
        return load_file(str(f))
    except (TypeError, ValueError):
        from safetensors.flax import load_file as load_jax

        return {k: np.asarray(v) for k, v in load_jax(str(f)).items()}


def is_source(x) -> bool:
    """A leaf of a decoder's `hf_sources()` tree: (HF tensor names, transposed?, widths or None)."""
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], list)


def _shapes(cfg, dtype):
    import jax

    return jax.eval_shape(lambda: cfg.init_params(jax.random.key(0), dtype))


def params_from_hf_tensors(cfg, t: dict[str, np.ndarray], dtype) -> dict:
    """The params of a decoder (`cfg.hf_sources()` says where each comes from) out of HF tensors by name:
    linear weights [out, in] become ours [in, out], fused ones concatenated along the last axis."""
    import jax

    def get(name):
        if name not in t:
            raise ConfigError(f"checkpoint lacks tensor {name!r}")
        return np.asarray(t[name], np.float32)

    def build(source, want):
        names, transposed, _ = source
        parts = [get(n).T if transposed else get(n) for n in names]
        x = np.concatenate(parts, -1) if len(parts) > 1 else parts[0]
        if x.shape != want.shape:
            raise ConfigError(f"{' + '.join(names)} has shape {x.shape}, the config implies {want.shape}")
        return jnp.asarray(x, dtype)

    return jax.tree.map(build, cfg.hf_sources(), _shapes(cfg, dtype), is_leaf=is_source)


class SliceReader:
    """Reads parts of the HF tensors of a safetensors directory (single file or sharded index)
    through `safe_open(...).get_slice`, so a process touches only the bytes it asks for."""

    def __init__(self, path: Path):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy slices need)
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        self.files = {}  # tensor name -> open file
        for name in files:
            if not (path / name).is_file():
                raise ConfigError(f"{str(path)!r} lacks weight file {name} (expected safetensors weights)")
            f = safe_open(str(path / name), framework="numpy")
            self.files.update(dict.fromkeys(f.keys(), f))

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.files:
            raise ConfigError(f"checkpoint lacks tensor {name!r}")
        return tuple(self.files[name].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """tensor[index]: the one place that reads weight bytes (tests count what passes here)."""
        return self.files[name].get_slice(name)[index]


def read_param_slice(reader: SliceReader, names: list[str], transposed: bool, shape: tuple[int, ...],
                     index: tuple[slice, ...]) -> np.ndarray:
    """param[index] for a param of `shape` made of `names` concatenated along its last axis (each
    transposed from [out, in] when `transposed`): only the intersecting slice of each HF tensor is read."""
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
    lo, hi = index[-1].start, index[-1].stop
    parts, offset = [], 0
    for name in names:
        full = reader.shape(name)
        width = full[0] if transposed else full[-1]
        want = (width, *shape[:-1]) if transposed else (*shape[:-1], width)
        if full != want:
            raise ConfigError(f"tensor {name} has shape {full}, the config implies {want}")
        a, b = max(lo, offset), min(hi, offset + width)
        if a < b:
            cols = slice(a - offset, b - offset)
            parts.append(reader.read(name, (cols, *index[:-1])).T if transposed else
                         reader.read(name, (*index[:-1], cols)))
        offset += width
    if offset != shape[-1]:
        raise ConfigError(f"tensors {names} hold {offset} columns, the config implies {shape[-1]}")
    return np.concatenate(parts, -1) if len(parts) > 1 else parts[0]


def load_sharded_params(cfg, reader: SliceReader, dtype, mesh) -> dict:
    """Params as global arrays on `mesh` (sharding.LOGICAL_RULES), each process reading only the
    slices its own devices hold (`jax.make_array_from_callback` asks for exactly those)."""
    import jax

    from ..sharding import param_shardings

    shapes = _shapes(cfg, dtype)
    np_dtype = np.dtype(dtype)

    def load(source, shape, sharding):
        names, transposed, _ = source
        cache = {}  # devices that hold the same slice (replicas over the other mesh axis) share one read

        def shard(index):
            key = tuple((s.start, s.stop) for s in index)
            if key not in cache:
                cache[key] = read_param_slice(reader, names, transposed, shape.shape, index).astype(np_dtype)
            return cache[key]

        return jax.make_array_from_callback(shape.shape, sharding, shard)

    return jax.tree.map(load, cfg.hf_sources(), shapes, param_shardings(cfg, mesh, shapes), is_leaf=is_source)


def hf_tensors_from_params(cfg, params: dict) -> dict[str, np.ndarray]:
    """Inverse of params_from_hf_tensors, in the params' own dtype."""
    import jax

    tensors: dict[str, np.ndarray] = {}

    def put(source, x):
        names, transposed, widths = source
        x = np.asarray(x)
        parts = np.split(x, np.cumsum(widths)[:-1], axis=-1) if widths else [x]
        for name, part in zip(names, parts):
            tensors[name] = np.ascontiguousarray(part.T if transposed else part)

    jax.tree.map(put, cfg.hf_sources(), params, is_leaf=is_source)
    return tensors


def load_hf(model_dir: str | os.PathLike, dtype=jnp.float32, mesh=None) -> tuple[Any, dict, dict[str, Any]]:
    """(decoder config, params, raw config.json) from a Hugging Face directory of any registered
    architecture (pass_jax.models); on a mesh, read shard by shard."""
    hf = read_hf_config(model_dir)
    cfg = config_from_hf(hf)
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.is_file():  # chat models list extra stop tokens there (e.g. Llama-3's <|eot_id|>)
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys([*cfg.eos_token_ids, *map(int, extra)])))
    if mesh is not None:
        return cfg, load_sharded_params(cfg, SliceReader(Path(model_dir)), dtype, mesh), hf
    return cfg, params_from_hf_tensors(cfg, _read_tensors(Path(model_dir)), dtype), hf


def save_hf(model_dir: str | os.PathLike, cfg, params: dict, hf_config: dict[str, Any] | None = None,
            max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors (sharded with an index past max_shard_bytes)."""
    from safetensors.numpy import save_file

    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    hf = dict(hf_config) if hf_config else cfg.to_hf_dict()
    hf["dtype"] = str(np.asarray(params["norm"]).dtype)
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    tensors = hf_tensors_from_params(cfg, params)
    if max_shard_bytes is None or sum(v.nbytes for v in tensors.values()) <= max_shard_bytes:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    for name, v in tensors.items():
        if shards[-1] and sum(x.nbytes for x in shards[-1].values()) + v.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = v
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
