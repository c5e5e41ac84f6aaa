"""Exact maximum-inner-product top-K over an index sharded across every device.

The index is a list of blocks, each a global array of ``rows_per_device x devices``
contiguous rows sharded over every device of the mesh (both its `data` and `model` axes: a
teacher split over `model` does not multiply the index), so every device holds a slice of
every block.
Searching dispatches one ``shard_map`` step per block - a local matmul (index dtype
inputs, float32 accumulation) and top-k, merged into each device's running top-K -
then one all_gather of every device's K candidates and a global top-K. Scratch memory
is O(B x rows_per_device); the [B, N] score matrix never exists. top_k is never left
to automatic partitioning over the sharded axis (jax issue 19271).

Blocks are dispatched from the host rather than looped inside one program: on XLA:CPU
a matmul inside a while loop ran 2-4x slower than the same matmul at top level, and
asynchronous dispatch hides the per-block launch cost.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.batching import round_up
from art_jax.core.errors import UserError

# every device of the ('data', 'model') mesh, in row-major order
DEVICES = ("data", "model")
ROWS = P(DEVICES, None)
ACCELERATOR_ROWS_PER_DEVICE = 1 << 20


def default_rows_per_device() -> int:
    """Rows one device scores per block: small enough that the [B, rows] scores stay in
    cache-friendly scratch on CPU, large enough to amortise a dispatch on accelerators."""
    return 65536 if jax.default_backend() == "cpu" else ACCELERATOR_ROWS_PER_DEVICE


def block_layout(count: int, devices: int, rows_per_device: int) -> tuple[int, int]:
    """(blocks, rows per device in each) of an index of ``count`` rows over ``devices``, at most
    ``rows_per_device`` a device and block, as few blocks as that allows."""
    num_blocks = -(-count // (devices * rows_per_device))
    return num_blocks, round_up(-(-count // (num_blocks * devices)), 8)


@dataclasses.dataclass
class ShardedIndex:
    """Embeddings on device: ``blocks[b]`` holds global rows [b * block_rows, (b+1) * block_rows);
    rows at or past ``count`` are zero padding and are never returned."""

    blocks: list[jax.Array]
    count: int
    mesh: Mesh

    @property
    def block_rows(self) -> int:
        return self.blocks[0].shape[0]

    @property
    def dtype(self):
        return self.blocks[0].dtype

    @classmethod
    def from_reader(cls, read: Callable[[int, int], np.ndarray], count: int, dim: int, mesh: Mesh, *,
                    rows_per_device: int | None = None, dtype=None) -> "ShardedIndex":
        """Build the blocks from ``read(start, stop)`` (rows, zero-padded past ``count``). Each
        process reads only the rows of its own devices."""
        devices = mesh.size
        num_blocks, per_device = block_layout(count, devices, rows_per_device or default_rows_per_device())
        block_rows = per_device * devices
        sharding = NamedSharding(mesh, ROWS)

        def block(b):
            def shard(index):
                rows = index[0]
                start = b * block_rows + (rows.start or 0)
                stop = b * block_rows + (rows.stop if rows.stop is not None else block_rows)
                data = read(start, stop)
                return data if dtype is None else data.astype(dtype)
            return jax.make_array_from_callback((block_rows, dim), sharding, shard)

        return cls([block(b) for b in range(num_blocks)], count, mesh)

    @classmethod
    def from_array(cls, embeddings: np.ndarray, mesh: Mesh, **kwargs) -> "ShardedIndex":
        def read(start, stop):
            out = np.zeros((stop - start, embeddings.shape[1]), embeddings.dtype)
            real = embeddings[start:min(stop, len(embeddings))]
            out[:len(real)] = real
            return out
        return cls.from_reader(read, len(embeddings), embeddings.shape[1], mesh, **kwargs)

    @classmethod
    def from_version(cls, version, mesh: Mesh, **kwargs) -> "ShardedIndex":
        """A published ``art_jax.retrieval.index.IndexVersion`` loaded onto ``mesh``."""
        return cls.from_reader(version.read, version.count, version.dim, mesh, **kwargs)

    def search(self, queries, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` rows by inner product: float32 scores and int64 row numbers [B, k],
        best first. ``queries`` [B, dim] must be the same on every process. ``exclude`` [B] or
        [B, E]: rows kept out of each query's top-k (-1: none), as a masked sentence's own passage
        (the top k + E are searched and the excluded dropped, which is exact)."""
        if exclude is None:
            return self._search(queries, k)
        exclude = np.asarray(exclude, np.int64).reshape(len(queries), -1)
        scores, rows = self._search(queries, min(k + exclude.shape[1], self.count))
        kept = ~(rows[:, :, None] == exclude[:, None, :]).any(-1)
        order = np.argsort(~kept, axis=1, kind="stable")[:, :k]  # the kept rows first, best first
        if not np.take_along_axis(kept, order, 1).all():
            raise UserError(f"search: top-k {k} is larger than the passages left once the excluded are ({self.count} "
                            "in the index)")
        return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)

    def vectors(self, rows, sharding: NamedSharding) -> jax.Array:
        """The stored vectors of ``rows`` (row numbers below ``count``, the same on every process):
        a global array of shape ``rows.shape + (dim,)`` in the index's dtype, placed as ``sharding``.
        Each device takes the asked rows it holds and one psum over every device completes them."""
        rows = np.asarray(rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.count):
            raise ValueError(f"rows outside the index's {self.count}")
        flat = rows.reshape(-1).astype(np.int32)
        asked = jax.make_array_from_callback(flat.shape, NamedSharding(self.mesh, P()), lambda index: flat[index])
        return _gather_rows(self.mesh, len(self.blocks), rows.shape, sharding)(asked, tuple(self.blocks))

    def _search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise UserError(f"search: top-k must be positive, got {k}")
        if k > self.count:
            raise UserError(f"search: top-k {k} is larger than the index ({self.count} passages)")
        queries = np.asarray(queries, self.dtype)
        replicated = NamedSharding(self.mesh, P())
        q = jax.make_array_from_callback(queries.shape, replicated, lambda index: queries[index])
        best = _empty_candidates(self.mesh, len(queries), k)()
        for b, block in enumerate(self.blocks):
            start = b * self.block_rows
            masked = start + self.block_rows > self.count
            best = _block_step(self.mesh, k, masked)(q, block, *best, np.int32(start), np.int32(self.count))
        scores, rows = _merge_devices(self.mesh, k)(*best)
        return np.asarray(scores.addressable_data(0)), np.asarray(rows.addressable_data(0)).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _empty_candidates(mesh: Mesh, batch: int, k: int):
    """Makes each device's starting top-k (fresh arrays per search: the steps donate them)."""
    rows = mesh.size * batch
    sharding = NamedSharding(mesh, ROWS)
    return jax.jit(lambda: (jnp.full((rows, k), -jnp.inf, jnp.float32), jnp.full((rows, k), -1, jnp.int32)),
                   out_shardings=(sharding, sharding))


@functools.lru_cache(maxsize=None)
def _block_step(mesh: Mesh, k: int, masked: bool):
    """One block: each device scores its rows and merges them into its running top-k."""

    def local(q, block, best_scores, best_rows, start, count):
        rows_here = block.shape[0]
        first = start + lax.axis_index(DEVICES) * rows_here
        scores = lax.dot_general(q, block, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if masked:  # only the last block holds padding; the others skip this pass
            scores = jnp.where(first + jnp.arange(rows_here)[None, :] < count, scores, -jnp.inf)
        top_scores, top_rows = lax.top_k(scores, min(k, rows_here))
        return _top_k(jnp.concatenate([best_scores, top_scores], 1),
                      jnp.concatenate([best_rows, top_rows + first], 1), k)

    step = jax.shard_map(local, mesh=mesh, in_specs=(P(), ROWS, ROWS, ROWS, P(), P()), out_specs=(ROWS, ROWS))
    return jax.jit(step, donate_argnums=(2, 3))


@functools.lru_cache(maxsize=None)
def _merge_devices(mesh: Mesh, k: int):
    """all_gather every device's K candidates, keep the global top-K (replicated)."""

    def local(scores, rows):
        scores = lax.all_gather(scores, DEVICES, axis=1, tiled=True)
        rows = lax.all_gather(rows, DEVICES, axis=1, tiled=True)
        return _top_k(scores, rows, k)

    # all_gather's result is the same everywhere but not typed as such, hence check_vma=False
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(ROWS, ROWS), out_specs=(P(), P()), check_vma=False))


@functools.lru_cache(maxsize=None)
def _gather_rows(mesh: Mesh, num_blocks: int, shape: tuple[int, ...], sharding: NamedSharding):
    """rows [N] -> their vectors, shaped ``shape + (dim,)``: every device takes its own rows of every
    block, zeros for the rest, and a psum over the devices completes them (one device holds each row:
    the sum is exact in any dtype)."""

    def local(rows, blocks):
        found = 0
        for b, block in enumerate(blocks):
            rows_here = block.shape[0]
            at = rows - (b * mesh.size + lax.axis_index(DEVICES)) * rows_here
            mine = (at >= 0) & (at < rows_here)
            found = found + jnp.where(mine[:, None], block[jnp.clip(at, 0, rows_here - 1)], 0)
        return lax.psum(found, DEVICES)

    gather = jax.shard_map(local, mesh=mesh, in_specs=(P(), (ROWS,) * num_blocks), out_specs=P())
    return jax.jit(lambda rows, blocks: gather(rows, blocks).reshape(*shape, blocks[0].shape[1]),
                   out_shardings=sharding)


def _top_k(scores, rows, k):
    scores, where = lax.top_k(scores, k)
    return scores, jnp.take_along_axis(rows, where, axis=1)
