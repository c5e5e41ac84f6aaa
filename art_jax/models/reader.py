"""Fusion-in-Decoder (Izacard & Grave, 2021) on top of ``T5``: each of a question's K
(question + passage) inputs is encoded on its own, and the decoder reads the K encodings
concatenated as one memory. Generation over that memory: ``art_jax.models.generation``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from art_jax.models.packing import Packing
from art_jax.models.t5 import T5


def fid_encode(model: T5, input_ids, attention_mask, *, dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """(memory [B, K * N, D], memory_mask [B, K * N]) of inputs [B, K, N]: the K inputs of a row
    encoded separately (one [B * K, N] batch), then laid end to end in passage order."""
    batch, passages, length = input_ids.shape
    mask = attention_mask.reshape(batch * passages, length)
    encoded = model.encode(input_ids.reshape(batch * passages, length), mask, dropout_key=dropout_key)
    return (encoded.reshape(batch, passages * length, encoded.shape[-1]),
            attention_mask.reshape(batch, passages * length))


def packed_fid_encode(model: T5, input_ids, attention_mask, capacity: int, memory_bias=None
                      ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``fid_encode``'s memory without its padding, for decoding: each row's real tokens, in order,
    in ``capacity`` slots (at least the row's count: ``packing.packed_capacity``), the encoder run
    on them alone (``art_jax.models.packing``). T5's cross-attention has no positions (no relative
    bias), so a decoder reads this memory as the padded one, with fewer keys at every step.
    Returns (memory [B, C, D], memory_mask [B, C]: the filled slots, ``memory_bias`` [B, K * N]
    taken to the slots [B, C], or None)."""
    batch, passages, length = input_ids.shape
    mask = attention_mask.reshape(batch * passages, length)
    packing = Packing.of(mask, batch, capacity)
    memory = model.encode(input_ids.reshape(batch * passages, length), mask, packing=packing)
    filled = jnp.arange(capacity) < jnp.sum(mask.reshape(batch, -1), axis=1, dtype=jnp.int32)[:, None]
    if memory_bias is not None:
        memory_bias = jnp.take_along_axis(memory_bias, packing.index, axis=1)
    return memory, filled.astype(attention_mask.dtype), memory_bias


def answer_log_probs(model: T5, memory, memory_mask, labels, *, memory_bias=None, dropout_key=None) -> jax.Array:
    """Float32 [B, T]: log p(labels[t] | labels[<t], memory) under teacher forcing (decoder
    input: the labels shifted right after T5's start token 0). Every position is returned;
    the caller masks the padding after each answer's ``</s>``. ``memory_bias`` [B, M] is added
    to every cross-attention logit over memory position m (see ``passage_memory_bias``)."""
    return model.label_log_probs(memory, memory_mask, labels, memory_bias=memory_bias, dropout_key=dropout_key)


def passage_memory_bias(weights, passage_length: int) -> jax.Array:
    """[B, K * N] memory bias of per-passage values [B, K]: each repeated over its N positions."""
    return jnp.repeat(weights, passage_length, axis=-1)
