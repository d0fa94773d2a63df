"""The declared layout: logical axis names (a decoder's param_axes, CACHE_AXES, ...) -> mesh axes.

A (data, model) mesh: "data" splits the batch (prompts, outputs, KV cache rows); "model" splits
attention heads, the MLP hidden and the vocabulary (Megatron-style tensor parallelism), so a
device holds 1/model of every large weight. GSPMD inserts the collectives; sharding is an
annotation, so results do not depend on it beyond the order of float sums. Training
(train/lookahead.py) and generation (api.generate, load_model) use the same rules.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Logical axis -> mesh axis (None: replicated), as MaxText's `logical_axis_rules`. A mesh axis
# that does not divide a dimension is dropped for that array (the dimension is replicated): e.g.
# 2 KV heads on a model axis of 4 leave the KV cache whole on every device of a row's group.
LOGICAL_RULES = (
    ("batch", "data"),  # prompts, lengths, outputs, KV cache rows
    ("vocab", "model"),  # embedding rows, head columns: lookups and logits split exactly (no sum is split)
    # fused [q | k | v] output columns. Splitting the fused dimension gives a device a contiguous run of
    # columns, which may cross the q/k/v boundaries; GSPMD reshards at the q/k/v slices, so results are
    # correct whatever the split (an interleaved per-device layout would save that exchange).
    ("qkv", "model"),
    ("heads", "model"),  # o's input rows: the attention heads (a partial sum per device, then all-reduce)
    ("mlp", "model"),  # fused [gate | up] columns and down's rows: the MLP hidden (same caveat as qkv)
    ("kv_heads", "model"),  # KV cache heads
    ("embed", None),  # d_model stays whole: activations are replicated over "model"
    ("norm", None),
    ("length", None),
    ("head_dim", None),
    ("lookahead", None),  # the [k, d_model] look-ahead leaf: tiny, replicated
)
CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")  # KVCache keys/values [B, S, KV, hd]
BATCH_AXES = ("batch", "length")  # prompts [B, T], lengths [B]


def logical_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, rules=LOGICAL_RULES) -> P:
    """The PartitionSpec of an array whose dimensions carry these logical names: Flax's
    `logical_to_mesh_axes`, with two rules of ours on top. A name without a rule is an error (Flax would
    replicate it silently), and a mesh axis that does not divide its dimension is dropped there."""
    from flax.linen import logical_to_mesh_axes

    unknown = [name for name in axes if name not in dict(rules)]
    if unknown:
        raise KeyError(f"logical axis {unknown[0]!r} has no rule in sharding.LOGICAL_RULES")
    spec = logical_to_mesh_axes(tuple(axes), rules)
    return P(*(axis if axis is not None and size % mesh.shape[axis] == 0 else None for axis, size in zip(spec, shape)))


def logical_sharding(axes, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(tuple(axes), tuple(shape), mesh))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def param_shardings(cfg, mesh: Mesh, params):
    """A NamedSharding per parameter (params: arrays or ShapeDtypeStructs), from the decoder's param_axes."""
    return jax.tree.map(lambda axes, x: logical_sharding(axes, x.shape, mesh), cfg.param_axes(), params,
                        is_leaf=_is_axes)


def make_mesh(data: int = 1, model: int = 1) -> Mesh:
    """A (data, model) mesh over the first data*model devices of all processes (Auto axes: GSPMD
    places the collectives)."""
    n = len(jax.devices())
    if data < 1 or model < 1 or data * model > n:
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices; {n} are visible")
    devices = jax.devices()[:data * model]
    if len({d.process_index for d in devices}) != jax.process_count():
        raise ValueError(f"mesh {data}x{model} leaves some processes without a device: use all {n} devices")
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def parse_mesh(text: str | None) -> Mesh | None:
    """--mesh DATA,MODEL (e.g. "2,4") -> a Mesh; None -> None (one device)."""
    if not text:
        return None
    try:
        data, model = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh takes DATA,MODEL, e.g. 2,4 (got {text!r})") from None
    return make_mesh(data, model)


def init_distributed(coordinator: str | None, num_processes: int, process_id: int) -> None:
    """jax.distributed for --coordinator/--num-processes/--process-id (one process: nothing to do).
    On the CPU, collectives across processes go through gloo; GPUs and TPUs ignore that setting.
    coordinator "auto": jax finds the cluster itself (TPU pod slices, SLURM), the same command everywhere."""
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    if num_processes <= 1:
        return
    if not coordinator:
        raise ValueError("--num-processes > 1 needs --coordinator HOST:PORT")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def put(array, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value that every process holds in full (works multi-process)."""
    host = np.asarray(array)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place(x, sharding: NamedSharding) -> jax.Array:
    """x with this sharding: kept where it already has it (e.g. from load_model(mesh=)), moved
    otherwise; a value spread over several processes is resharded by a jitted identity."""
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if not x.is_fully_addressable:
            return jax.jit(lambda y: y, out_shardings=sharding)(x)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
    return put(x, sharding)


def host_array(x) -> np.ndarray:
    """The whole value of x on this host, gathered from the other processes where it is spread over them."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def shard_params(params, cfg, mesh: Mesh):
    """Params placed by the rules (the decoder's param_axes -> LOGICAL_RULES)."""
    return jax.tree.map(place, params, param_shardings(cfg, mesh, params))


def batch_sharding(mesh: Mesh, shape) -> NamedSharding:
    """Rows over "data" (when the data axis divides the batch), the rest whole."""
    return logical_sharding(BATCH_AXES[:len(shape)], shape, mesh)


def shard_batch(tokens, mesh: Mesh) -> jax.Array:
    return place(tokens, batch_sharding(mesh, np.shape(tokens)))


def replicate(tree, mesh: Mesh):
    return jax.tree.map(lambda x: place(x, NamedSharding(mesh, P())), tree)


def constrain_cache(cache, mesh: Mesh):
    """Pin a KVCache inside jit: rows over "data", KV heads over "model" (where they divide)."""
    def pin(x, axes):
        return jax.lax.with_sharding_constraint(x, logical_sharding(axes, x.shape, mesh))

    return cache.replace(keys=tuple(pin(x, CACHE_AXES) for x in cache.keys),
                         values=tuple(pin(x, CACHE_AXES) for x in cache.values),
                         lengths=pin(cache.lengths, ("batch",)))
