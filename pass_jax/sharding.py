"""Mesh and PartitionSpec rules: batch over "data", base weights split over "model" (FSDP-style)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


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


def weight_spec(shape: tuple[int, ...], model: int) -> P:
    """Split a weight's first dimension that the model axis divides; replicate what it cannot."""
    for dim, size in enumerate(shape):
        if size % model == 0 and size >= model:
            return P(*([None] * dim + ["model"]))
    return P()


def put(array, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value that every process holds in full (works multi-process)."""
    host = np.asarray(array)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(params, mesh: Mesh):
    model = mesh.shape["model"]
    return jax.tree.map(lambda x: put(x, NamedSharding(mesh, weight_spec(x.shape, model))), params)


def shard_batch(tokens, mesh: Mesh) -> jax.Array:
    return put(tokens, NamedSharding(mesh, P("data")))


def replicate(tree, mesh: Mesh):
    return jax.tree.map(lambda x: put(x, NamedSharding(mesh, P())), tree)
