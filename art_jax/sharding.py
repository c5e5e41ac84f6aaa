"""Logical axis names -> mesh shardings.

Modules tag parameters with logical names; this module alone knows the mesh. A
logical axis maps to a mesh axis only when that axis exists in the mesh and divides
the dimension, otherwise the dimension is replicated (tiny test configs, odd vocabs).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from art_jax.errors import UserError

# Megatron-style tensor parallelism for a scorer too big to replicate: attention
# heads, FFN width and vocabulary split over `model`; everything else replicated.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("embed", None),
)


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh; ``data=-1`` takes every device not used by ``model``."""
    devices = list(devices if devices is not None else jax.devices())
    if data == -1:
        if len(devices) % model:
            raise UserError(f"mesh: model={model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data * model != len(devices):
        raise UserError(f"mesh: data={data} x model={model} != {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> P:
    table = dict(rules)
    axes = []
    for name, dim in zip(logical, shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis not in mesh.shape or dim % mesh.shape[axis] or axis in axes:
            axes.append(None)
        else:
            axes.append(axis)
    return P(*axes)


def state_shardings(abstract_state: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES):
    """A pytree of NamedSharding matching ``abstract_state`` (from nnx.eval_shape/split)."""
    specs = nnx.get_partition_spec(abstract_state)

    def one(spec, leaf):
        logical = tuple(spec) if isinstance(spec, P) else ()
        logical = logical + (None,) * (len(leaf.shape) - len(logical))
        return NamedSharding(mesh, logical_to_spec(logical, leaf.shape, mesh, rules))

    return jax.tree.map(one, specs, abstract_state, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over `data`, the rest replicated."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))
