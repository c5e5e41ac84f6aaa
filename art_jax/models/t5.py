"""T5 encoder-decoder in Flax NNX: v1.0 (ReLU FFN, tied embeddings, scaled LM head) and
v1.1 / LM-adapted / T0 (gated-GELU FFN, untied ``lm_head``), with T5's bucketed
relative position biases. Only what teacher-forced scoring needs: no cache, no
generation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from art_jax.models.layers import (
    KeyStream,
    attend,
    attention_bias_from_mask,
    dense,
    dropout,
    embed,
    merge_heads,
    split_heads,
)


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

    def __call__(self, x, memory, bias, keys: KeyStream):
        q = split_heads(self.q(x), self.num_heads)
        k = split_heads(self.k(memory), self.num_heads)
        v = split_heads(self.v(memory), self.num_heads)
        # T5 folds 1/sqrt(d_kv) into its initialisation: no scaling here.
        out = attend(q, k, v, bias, scale=1.0, dropout_rate=self.dropout_rate, key=keys())
        return self.o(merge_heads(out))


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

    def __call__(self, x, self_bias, keys: KeyStream, memory=None, cross_bias=None):
        normed = self.self_attention_norm(x)
        x = x + dropout(self.self_attention(normed, normed, self_bias, keys), self.dropout_rate, keys())
        if self.is_decoder:
            normed = self.cross_attention_norm(x)
            x = x + dropout(self.cross_attention(normed, memory, cross_bias, keys), self.dropout_rate, keys())
        normed = self.feed_forward_norm(x)
        return x + dropout(self.feed_forward(normed, keys), self.dropout_rate, keys())


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, *, is_decoder: bool):
        count = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.blocks = nnx.List([T5Block(cfg, rngs, is_decoder=is_decoder, has_relative_bias=(i == 0))
                                for i in range(count)])
        self.final_layer_norm = RMSNorm(cfg)
        self.is_decoder = is_decoder
        self.dropout_rate = cfg.dropout_rate

    def __call__(self, x, mask, keys: KeyStream, memory=None, memory_mask=None):
        length = x.shape[1]
        self_bias = self.blocks[0].self_attention.position_bias(length, length)
        if self.is_decoder:
            causal = jnp.tril(jnp.ones((length, length), bool))
            self_bias = self_bias + jnp.where(causal, 0.0, jnp.finfo(jnp.float32).min)[None, None]
        else:
            self_bias = self_bias + attention_bias_from_mask(mask)
        cross_bias = attention_bias_from_mask(memory_mask) if self.is_decoder else None
        x = dropout(x, self.dropout_rate, keys())
        for block in self.blocks:
            x = block(x, self_bias, keys, memory, cross_bias)
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

    def encode(self, input_ids, attention_mask, *, dropout_key=None) -> jax.Array:
        return self.encoder(self.shared(input_ids), attention_mask, KeyStream(dropout_key))

    def logits(self, encoded, attention_mask, decoder_input_ids, *, dropout_key=None) -> jax.Array:
        """Float32 [B, T, V] next-token logits under teacher forcing."""
        hidden = self.decoder(self.shared(decoder_input_ids), None, KeyStream(dropout_key),
                              memory=encoded, memory_mask=attention_mask)
        if self.config.scale_decoder_outputs:
            hidden = hidden * (self.config.d_model ** -0.5)
        if self.lm_head is not None:
            out = self.lm_head(hidden)
        else:
            out = self.shared.attend(hidden)
        return out.astype(jnp.float32)

    def target_log_probs(self, input_ids, attention_mask, labels, *, start_token_id: int = 0) -> jax.Array:
        """log p(labels[t] | labels[<t], input) for every position, float32 [B, T].

        Decoder input = labels shifted right with the start token (T5's pad id 0);
        padding after the targets cannot affect them under the causal mask.
        """
        decoder_input_ids = jnp.concatenate(
            [jnp.full_like(labels[:, :1], start_token_id), labels[:, :-1]], axis=1)
        logits = self.logits(self.encode(input_ids, attention_mask), attention_mask, decoder_input_ids)
        target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        return target - jax.nn.logsumexp(logits, axis=-1)
