"""Logical axis names -> mesh shardings.

Modules tag parameters with logical names; this module alone knows the mesh. A
logical axis maps to a mesh axis only when that axis exists in the mesh and divides
the dimension, otherwise the dimension is replicated (tiny test configs, odd vocabs).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.errors import UserError

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
    # process-major: each process's devices hold one contiguous run of a batch's rows
    devices = sorted(devices if devices is not None else jax.devices(), key=lambda d: (d.process_index, d.id))
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


# Multi-process batches: each process holds its own rows of a global batch (its questions), or
# the same host array as every other process (what all of them computed alike).

def local_data_positions(mesh: Mesh) -> list[int]:
    """The positions along `data` that hold a device of this process."""
    return [i for i, devices in enumerate(mesh.devices) if any(d.process_index == jax.process_index() for d in devices)]


def process_rows(mesh: Mesh, rows: int) -> slice:
    """Which of a ``rows``-row batch split over `data` this process's devices hold."""
    mine = local_data_positions(mesh)
    per_position = rows // mesh.shape["data"]
    return slice(mine[0] * per_position, (mine[-1] + 1) * per_position)


def from_process_rows(mesh: Mesh, local: np.ndarray) -> jax.Array:
    """The global batch split over `data` whose rows ``process_rows`` are this process's ``local``."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)


def from_identical(sharding: NamedSharding, value: np.ndarray) -> jax.Array:
    """A host array that every process holds identically, as a global array with ``sharding``. (A
    device array, on this process's devices only, is read to the host first: slicing it on its
    device would compile a program per shape of slice.)"""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_process_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array split along its first axis, in order."""
    shards = {shard.index[0].start or 0: shard for shard in array.addressable_shards}  # model-axis copies once
    return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])


def local_replica(module: nnx.Module, mesh: Mesh | None = None) -> nnx.Module:
    """A copy of a module whose parameters span every process's devices (replicated, or split
    by FSDP: then gathered first, which every process must ask for together), held by this
    process's devices alone (``mesh``: a local mesh; default its first device), for work each
    process does on its own: embedding its chunks of the corpus, the dev questions."""
    graphdef, state = nnx.split(module)
    state = _replicated(state)
    target = NamedSharding(mesh, P()) if mesh is not None else jax.local_devices()[0]
    state = jax.tree.map(lambda x: jax.device_put(x.addressable_data(0) if isinstance(x, jax.Array) else x, target),
                         state)
    return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=None)
def _gather(mesh: Mesh):
    return jax.jit(lambda xs: xs, out_shardings=NamedSharding(mesh, P()))


def _replicated(state):
    """``state`` with its split arrays gathered (one collective for all of them)."""
    split = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array) and not x.is_fully_replicated]
    if not split:
        return state
    gathered = iter(_gather(split[0].sharding.mesh)(split))
    return jax.tree.map(lambda x: next(gathered) if isinstance(x, jax.Array) and not x.is_fully_replicated else x,
                        state)
