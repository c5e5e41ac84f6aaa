"""Packed tokens: an encoder that skips its inputs' padding.

A FiD reader encodes K passages of N tokens per question, and real passages leave a quarter to
a third of those N as padding. Every position-wise part of a T5 block (norms, projections, the
feed-forward) runs as well on the real tokens alone, gathered into ``capacity`` slots per group
of rows (a question's K inputs); only the attention needs the padded [rows, N] layout, and its
q, k, v are scattered back into it (padding as zeros, masked anyway). The outputs stay packed:
at every real token they equal the padded encoder's, and ``unpack`` lays them out padded. A FiD
decoder reads them packed (``models.reader.packed_fid_encode``): its cross-attention has no
positions, so each of its steps then reads the real tokens' keys alone.

``capacity`` is static (it is a shape): the caller picks it from the batch's masks on the host
(``packed_capacity``), so that no group has more real tokens than slots. Nothing checks that
inside the program: a group's tokens past its slots would read as zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Packing(NamedTuple):
    """Where each group's real tokens sit in the padded layout (``index`` [G, C], spare slots
    pointing at position 0) and the slot of every padded position (``inverse`` [G, R / G, L],
    C for padding: the zero row ``unpack`` appends)."""

    index: jax.Array
    inverse: jax.Array

    @classmethod
    def of(cls, mask: jax.Array, groups: int, capacity: int) -> Packing:
        """The packing of ``mask`` [R, L] (R a multiple of ``groups``: consecutive rows share a group)."""
        rows, length = mask.shape
        flat = mask.reshape(groups, -1).astype(bool)
        index = jax.vmap(lambda m: jnp.nonzero(m, size=capacity, fill_value=0)[0])(flat)
        inverse = jnp.where(flat, jnp.cumsum(flat, axis=1) - 1, capacity)
        return cls(index.astype(jnp.int32), inverse.reshape(groups, rows // groups, length).astype(jnp.int32))

    def pack(self, x: jax.Array) -> jax.Array:
        """[R, L, ...] -> [G, C, ...]: the real tokens of each group."""
        groups = self.index.shape[0]
        return jax.vmap(lambda a, i: a[i])(x.reshape(groups, -1, *x.shape[2:]), self.index)

    def unpack(self, packed: jax.Array) -> jax.Array:
        """[G, C, ...] -> [R, L, ...], zeros at the padding."""
        groups, _, length = self.inverse.shape
        padded = jnp.concatenate([packed, jnp.zeros_like(packed[:, :1])], axis=1)
        out = jax.vmap(lambda a, i: a[i])(padded, self.inverse.reshape(groups, -1))
        return out.reshape(-1, length, *packed.shape[2:])


def packed_capacity(mask: np.ndarray, step: int) -> int:
    """The slots per group of a host mask [G, ...]: its fullest group's real tokens rounded up to
    a multiple of ``step`` (few distinct capacities, so few compiled shapes), at most the padded size."""
    groups = mask.reshape(mask.shape[0], -1)
    most = int(np.count_nonzero(groups, axis=1).max(initial=0))
    return min(groups.shape[1], max(step, -(-most // step) * step))
