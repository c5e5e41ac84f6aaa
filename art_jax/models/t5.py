"""T5 encoder-decoder in Flax NNX: v1.0 (ReLU FFN, tied embeddings, scaled LM head) and
v1.1 / LM-adapted / T0 (gated-GELU FFN, untied ``lm_head``), with T5's bucketed
relative position biases. Teacher-forced scoring and training live here; incremental
decoding (a key/value cache over the same blocks) in ``art_jax.models.generation``, the
Fusion-in-Decoder reader in ``art_jax.models.reader``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from art_jax.models.layers import (
    KeyStream,
    attend,
    attention_bias_from_mask,
    checkpoint_policy,
    dense,
    dropout,
    embed,
    merge_heads,
    scanned_remat,
    split_heads,
)
from art_jax.models.packing import Packing


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    gated: bool = False  # v1.1: wi_0 (activated) * wi_1
    activation: str = "relu"  # "relu" | "gelu_new" (tanh approximation)
    untied_lm_head: bool = False  # v1.1 checkpoints carry their own lm_head
    scale_decoder_outputs: bool = True  # v1.0 multiplies by d_model**-0.5 before the tied head
    dropout_rate: float = 0.1
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # the frozen teacher keeps bfloat16 parameters
    remat: bool = False  # recompute each block's activations in the backward pass (training memory)
    remat_policy: str = "nothing_saveable"  # what a recomputed block keeps (layers.REMAT_POLICIES)
    # the checkpoint's special tokens (Hugging Face's config; a T5 with BERT's vocabulary has its own)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0


_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def relative_position_buckets(query_len: int, key_len: int, *, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
    """[query_len, key_len] bucket ids, as Mesh TensorFlow / HF T5 compute them.

    Half the buckets are exact offsets, the rest log-spaced up to ``max_distance``;
    bidirectional (encoder) splits the buckets between the two directions. Built with
    numpy: the shapes are static, so XLA sees a constant.
    """
    relative = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    # float32 arithmetic, as the checkpoints were trained with: float64 moves bucket edges.
    ratio = np.maximum(relative, 1).astype(np.float32) / np.float32(max_exact)
    large = max_exact + (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(relative < max_exact, relative, large)


class RMSNorm(nnx.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

    def __init__(self, cfg: T5Config):
        self.weight = nnx.Param(jnp.ones((cfg.d_model,), cfg.param_dtype), out_sharding=("embed",))
        self.eps = cfg.layer_norm_epsilon
        self.dtype = cfg.dtype

    def __call__(self, x):
        variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        normed = (x.astype(jnp.float32) * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed


def cross_attention_bias(memory_mask: jax.Array, memory_bias: jax.Array | None = None) -> jax.Array:
    """[B, 1, 1, M] float32 bias of the decoder's cross-attention logits: padding masked out,
    plus ``memory_bias`` [B, M] when given (the same for every layer, head and query)."""
    bias = attention_bias_from_mask(memory_mask)
    if memory_bias is None:
        return bias
    return bias + memory_bias.astype(jnp.float32)[:, None, None, :]


def shift_right(labels: jax.Array, start_token_id: int) -> jax.Array:
    """Teacher forcing's decoder inputs: the start token, then the labels but the last."""
    return jnp.concatenate([jnp.full_like(labels[:, :1], start_token_id), labels[:, :-1]], axis=1)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, *, has_relative_bias: bool, bidirectional: bool):
        inner = cfg.num_heads * cfg.d_kv
        kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q = dense(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.k = dense(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.v = dense(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.o = dense(inner, cfg.d_model, ("heads", "embed"), **kw)
        self.relative_attention_bias = (
            embed(cfg.relative_attention_num_buckets, cfg.num_heads, (None, "heads_out"),
                  dtype=jnp.float32, param_dtype=cfg.param_dtype, rngs=rngs)
            if has_relative_bias else None)
        self.num_heads = cfg.num_heads
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.dropout_rate = cfg.dropout_rate

    def position_bias(self, query_len: int, key_len: int) -> jax.Array:
        """[1, H, Q, K] float32 bias; only the first block of a stack owns the table."""
        buckets = relative_position_buckets(query_len, key_len, bidirectional=self.bidirectional,
                                            num_buckets=self.num_buckets, max_distance=self.max_distance)
        values = self.relative_attention_bias(jnp.asarray(buckets))  # [Q, K, H]
        return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

    def keys_values(self, memory, packing: Packing | None = None) -> tuple[jax.Array, jax.Array]:
        """[B, H, S, d_kv] keys and values of what is attended to: head-major, the layout the
        contractions take, so that keys kept over decoding steps are laid out once. (``packing``:
        ``memory`` is packed tokens, the keys and values come out padded.)"""
        return tuple(jnp.swapaxes(split_heads(_padded(proj(memory), packing), self.num_heads), 1, 2)
                     for proj in (self.k, self.v))

    def __call__(self, x, keys_values, bias, dropout_key, packing: Packing | None = None):
        """``x`` [R, L, D] attending over ``keys_values`` of R / G rows: each G consecutive rows of
        ``x`` (a memory row's beams) read one key row as G * L query positions, so beams never
        copy the memory or its keys and values. With ``packing``, ``x`` and the output are packed
        tokens; the attention itself runs padded."""
        k, v = keys_values
        q = split_heads(_padded(self.q(x), packing), self.num_heads)
        rows, length = q.shape[:2]
        q = q.reshape(k.shape[0], rows // k.shape[0] * length, *q.shape[2:])
        # T5 folds 1/sqrt(d_kv) into its initialisation: no scaling here.
        out = attend(q, k, v, bias, scale=1.0, dropout_rate=self.dropout_rate, key=dropout_key, heads_first_kv=True)
        out = merge_heads(out.reshape(rows, length, *out.shape[2:]))
        return self.o(out if packing is None else packing.pack(out))


def _padded(x: jax.Array, packing: Packing | None) -> jax.Array:
    return x if packing is None else packing.unpack(x)


class T5FeedForward(nnx.Module):
    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if cfg.gated:
            self.wi_0 = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
            self.wi_1 = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        else:
            self.wi = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.wo = dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)
        self.gated = cfg.gated
        self.act = _ACTIVATIONS[cfg.activation]
        self.dropout_rate = cfg.dropout_rate

    def __call__(self, x, keys: KeyStream):
        hidden = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(dropout(hidden, self.dropout_rate, keys()))


class T5Block(nnx.Module):
    """Pre-norm residual block: self-attention, [cross-attention], feed-forward."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, *, is_decoder: bool, has_relative_bias: bool):
        self.self_attention = T5Attention(cfg, rngs, has_relative_bias=has_relative_bias,
                                          bidirectional=not is_decoder)
        self.self_attention_norm = RMSNorm(cfg)
        if is_decoder:
            self.cross_attention = T5Attention(cfg, rngs, has_relative_bias=False, bidirectional=False)
            self.cross_attention_norm = RMSNorm(cfg)
        self.feed_forward = T5FeedForward(cfg, rngs)
        self.feed_forward_norm = RMSNorm(cfg)
        self.is_decoder = is_decoder
        self.dropout_rate = cfg.dropout_rate

    def __call__(self, x, self_bias, dropout_key, cross=None, cross_bias=None, cache=None, position=None,
                 packing=None):
        """(output, the self-attention's keys and values).

        ``cross``: the memory [B, M, D], its keys and values computed here (so that remat
        recomputes rather than stores them), or those of every decoding step, computed once.
        ``cache``: (keys, values) [R, H, T, d_kv] of earlier positions; ``x`` is then the input
        at ``position``, its keys and values written into the cache it attends over.
        ``packing``: ``x`` is an encoder's packed tokens (``art_jax.models.packing``).
        """
        keys = KeyStream(dropout_key)
        if isinstance(self_bias, tuple):  # the encoder's positions and padding (``self_attention_bias``)
            self_bias = self_bias[0] + self_bias[1]
        normed = self.self_attention_norm(x)
        self_kv = self.self_attention.keys_values(normed, packing)
        if cache is not None:
            self_kv = tuple(jax.lax.dynamic_update_slice_in_dim(past, new.astype(past.dtype), position, axis=2)
                            for past, new in zip(cache, self_kv))
        x = x + dropout(self.self_attention(normed, self_kv, self_bias, keys(), packing), self.dropout_rate, keys())
        if self.is_decoder:
            cross_kv = cross if isinstance(cross, tuple) else self.cross_attention.keys_values(cross)
            normed = self.cross_attention_norm(x)
            x = x + dropout(self.cross_attention(normed, cross_kv, cross_bias, keys()), self.dropout_rate, keys())
        normed = self.feed_forward_norm(x)
        return x + dropout(self.feed_forward(normed, keys), self.dropout_rate, keys()), self_kv


@functools.cache
def _rematerialised_block(policy: str):
    """T5Block.__call__ recomputed in the backward pass, keeping what ``policy`` saves. Tree mode:
    graph mode writes the blocks' state back after the call, which fails where they are closed over
    inside a lax loop (decoding)."""
    return nnx.remat(T5Block.__call__, graph=False, policy=checkpoint_policy(policy))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, *, is_decoder: bool):
        count = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.blocks = nnx.List([T5Block(cfg, rngs, is_decoder=is_decoder, has_relative_bias=(i == 0))
                                for i in range(count)])
        self.final_layer_norm = RMSNorm(cfg)
        self.is_decoder = is_decoder
        self.dropout_rate = cfg.dropout_rate
        self.remat, self.remat_policy = cfg.remat, cfg.remat_policy

    def self_attention_bias(self, length: int, mask=None) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Relative positions plus the causal mask (decoder, [1, H, L, L]), or the encoder's
        (relative positions [1, H, L, L], padding mask [B, 1, 1, L]): float32. The encoder's two
        are summed inside each block, so that no [B, H, L, L] bias (nor its gradient, for K x N
        tokens a question hundreds of MiB) outlives its layer."""
        bias = self.blocks[0].self_attention.position_bias(length, length)
        if self.is_decoder:
            causal = jnp.tril(jnp.ones((length, length), bool))
            return bias + jnp.where(causal, 0.0, jnp.finfo(jnp.float32).min)[None, None]
        return bias, attention_bias_from_mask(mask)

    def cross_keys_values(self, memory) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """Every block's cross-attention (keys, values) of ``memory``."""
        return tuple(block.cross_attention.keys_values(memory) for block in self.blocks)

    def run_blocks(self, x, self_bias, dropout_key=None, *, cross=None, cross_bias=None, caches=None,
                   position=None, packing=None):
        """``x`` through every block (see ``T5Block``; ``cross``: the memory, or one (keys, values)
        per block) -> (hidden states before the final norm, each block's self-attention (keys, values))."""
        keys = KeyStream(dropout_key)
        block_keys = [keys() for _ in self.blocks]
        if self.remat and caches is None and not isinstance(cross, tuple) and len(self.blocks) > 1:
            return self._scanned_blocks(x, self_bias, block_keys, cross, cross_bias, packing)
        call = _rematerialised_block(self.remat_policy) if self.remat else T5Block.__call__
        self_kvs = []
        for i, block in enumerate(self.blocks):
            block_cross = cross[i] if isinstance(cross, tuple) else cross
            block_cache = None if caches is None else caches[i]
            x, self_kv = call(block, x, self_bias, block_keys[i], block_cross, cross_bias, block_cache, position,
                              packing)
            self_kvs.append(self_kv)
        return x, tuple(self_kvs)

    def _scanned_blocks(self, x, self_bias, block_keys, cross, cross_bias, packing):
        """Training under remat: block 0 (it holds the relative-position table) alone, then the others
        as ``scanned_remat``."""
        x, first_kv = _rematerialised_block(self.remat_policy)(self.blocks[0], x, self_bias, block_keys[0], cross,
                                                               cross_bias, None, None, packing)
        x, kvs = scanned_remat(
            self.blocks[1:],
            lambda block, x, key: T5Block.__call__(block, x, self_bias, key, cross, cross_bias, packing=packing), x,
            None if block_keys[0] is None else jnp.stack(block_keys[1:]), policy=self.remat_policy)
        return x, (first_kv, *(jax.tree.map(lambda a, i=i: a[i], kvs) for i in range(len(self.blocks) - 1)))

    def __call__(self, x, mask, dropout_key=None, *, memory=None, memory_mask=None, memory_bias=None,
                 packing=None):
        """The encoder over padded inputs (or their packed tokens, ``packing``), or the decoder under
        teacher forcing (``memory_bias``: see ``cross_attention_bias``)."""
        keys = KeyStream(dropout_key)
        cross_bias = cross_attention_bias(memory_mask, memory_bias) if self.is_decoder else None
        x = dropout(x, self.dropout_rate, keys())
        length = x.shape[1] if packing is None else packing.inverse.shape[-1]
        x, _ = self.run_blocks(x, self.self_attention_bias(length, mask), keys(), cross=memory,
                               cross_bias=cross_bias, packing=packing)
        return dropout(self.final_layer_norm(x), self.dropout_rate, keys())


class T5(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.shared = embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, rngs=rngs, stddev=1.0)
        self.encoder = T5Stack(cfg, rngs, is_decoder=False)
        self.decoder = T5Stack(cfg, rngs, is_decoder=True)
        self.lm_head = (dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                              dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
                        if cfg.untied_lm_head else None)

    def encode(self, input_ids, attention_mask, *, dropout_key=None, packing: Packing | None = None) -> jax.Array:
        """[R, L, D]; with ``packing`` the padding is skipped: [G, C, D], the real tokens' outputs
        in their packed slots (``packing.unpack`` lays them out as [R, L, D], zeros at the padding)."""
        if packing is None:
            return self.encoder(self.shared(input_ids), attention_mask, dropout_key)
        return self.encoder(self.shared(packing.pack(input_ids)), attention_mask, dropout_key, packing=packing)

    def logits(self, encoded, attention_mask, decoder_input_ids, *, dropout_key=None, memory_bias=None) -> jax.Array:
        """Float32 [R, T, V] next-token logits under teacher forcing over the memory ``encoded``
        [B, M, D] (R = B, or G * B: G consecutive decoder rows per memory row, beams).
        ``memory_bias`` [B, M] is added to the cross-attention logits of every layer, head and
        query for memory position m (FiD's passage weights; it gets its gradient)."""
        hidden = self.decoder(self.shared(decoder_input_ids), None, dropout_key, memory=encoded,
                              memory_mask=attention_mask, memory_bias=memory_bias)
        return self.lm_logits(hidden)

    def lm_logits(self, hidden) -> jax.Array:
        """Float32 logits of the decoder's final hidden states, accumulated in float32 whatever
        the compute dtype."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * (self.config.d_model ** -0.5)
        head = self.shared.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return jnp.matmul(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)

    def label_log_probs(self, encoded, attention_mask, labels, *, memory_bias=None, dropout_key=None) -> jax.Array:
        """log p(labels[t] | labels[<t], memory) for every position, float32 [B, T].

        Decoder input = labels shifted right with the checkpoint's decoder start token (T5's pad
        id 0); padding after the targets cannot affect them under the causal mask.
        """
        logits = self.logits(encoded, attention_mask, shift_right(labels, self.config.decoder_start_token_id),
                             dropout_key=dropout_key, memory_bias=memory_bias)
        target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        return target - jax.nn.logsumexp(logits, axis=-1)

    def target_log_probs(self, input_ids, attention_mask, labels) -> jax.Array:
        """``label_log_probs`` given the encoder's input rather than its output."""
        return self.label_log_probs(self.encode(input_ids, attention_mask), attention_mask, labels)
