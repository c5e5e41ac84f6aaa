"""BERT encoder in Flax NNX with the Hugging Face ``BertModel`` architecture, RoBERTa's and
Megatron-LM's pre-LayerNorm BERT.

Post-LayerNorm blocks (pre-LN for Megatron's, below), learned absolute positions, token types,
exact GELU (or its tanh form, ``hidden_act="gelu_new"``). Attribute names follow the HF module tree
so that ``art_jax.models.hf`` maps weights by name.

Megatron's BERT (``model_type="megatron-bert"``, transformers' ``MegatronBertModel``; the towers
of ART's and EMDR2's released retrievers) normalises before each sub-layer instead of after it:
no LayerNorm on the embeddings, ``x + attention(LN(x))``, ``x + mlp(LN(x))``, and one final
LayerNorm on the last layer's output. It cannot be rewritten as a post-LN BERT, so it is a
switch of the same modules.

RoBERTa (``model_type="roberta"``) is the same network with two switches: its position ids
start at ``pad_token_id + 1`` and skip padding (transformers' ``create_position_ids_from_input_ids``),
and its config has one token type and ``layer_norm_eps`` 1e-5 (read from its config.json).
Either tower may carry a projection head on the [CLS] vector: DPR-PAQ's (Oguz et al. 2022), a Dense
of the same size then LayerNorm; or DPR's ``encode_proj``, a Dense to ``projection_dim`` alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from art_jax.models.layers import (
    KeyStream,
    PresetKeys,
    attend,
    attention_bias_from_mask,
    dense,
    dropout,
    embed,
    merge_heads,
    scanned_remat,
    split_heads,
)

MODEL_TYPES = ("bert", "roberta", "megatron-bert")
ACTIVATIONS = ("gelu", "gelu_new")
# sentence-transformers' LayerNorm module is torch's nn.LayerNorm(dim): eps 1e-5, whatever the body's
HEAD_LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02  # std of the random init (Hugging Face's name)
    with_pooler: bool = True  # kept only so exported checkpoints are complete
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False  # recompute each layer's activations in the backward pass (layers.scanned_remat)
    remat_policy: str = "nothing_saveable"  # what a recomputed layer keeps (layers.REMAT_POLICIES)
    model_type: str = "bert"  # one of MODEL_TYPES: the Hugging Face architecture
    pad_token_id: int = 0  # RoBERTa's padding_idx: its positions count from pad_token_id + 1
    hidden_act: str = "gelu"  # exact erf GELU; "gelu_new" is the tanh form (Megatron's fused bias-GELU)
    projection: bool = False  # a head on [CLS]: Dense (with bias), then LayerNorm when projection_norm
    projection_dim: int = 0  # the head's output size; 0: the hidden size
    projection_norm: bool = True  # DPR-PAQ's LayerNorm after the Dense (DPR's encode_proj has none)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"BertConfig.model_type={self.model_type!r}; expected one of {MODEL_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r}; expected one of {ACTIVATIONS}")

    @property
    def pre_layer_norm(self) -> bool:
        return self.model_type == "megatron-bert"

    @property
    def embedding_dim(self) -> int:
        """The size of the retriever embedding: the projection's output, else the hidden size."""
        return (self.projection_dim or self.hidden_size) if self.projection else self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        """Rows of the position table before the first token's: RoBERTa's pad_token_id + 1."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @property
    def max_length(self) -> int:
        """The longest input the position table serves (RoBERTa-base: 514 rows, 512 tokens)."""
        return self.max_position_embeddings - self.position_offset


def _gelu(x: jax.Array) -> jax.Array:
    """Exact GELU in transformers' own form, x/2 (1 + erf(x/sqrt 2)), in float32 (1 + erf cancels
    for negative x in bfloat16): jax.nn.gelu's erfc form compiles to a select chain that runs
    5x slower on XLA:CPU."""
    wide = x.astype(jnp.float32)
    return (0.5 * wide * (1.0 + jax.lax.erf(wide * 0.7071067811865476))).astype(x.dtype)


_ACTIVATIONS = {"gelu": _gelu, "gelu_new": lambda x: jax.nn.gelu(x, approximate=True)}


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs, epsilon: float | None = None) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps if epsilon is None else epsilon, dtype=cfg.dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)), rngs=rngs)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs, stddev=cfg.initializer_range)
        self.word_embeddings = embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        self.position_embeddings = embed(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), **kw)
        self.token_type_embeddings = embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), **kw)
        self.LayerNorm = None if cfg.pre_layer_norm else _layer_norm(cfg, rngs)
        self.dropout_rate = cfg.hidden_dropout
        self.roberta_positions = cfg.model_type == "roberta"
        self.padding_idx = cfg.pad_token_id

    def __call__(self, input_ids, attention_mask, token_type_ids, keys: KeyStream):
        if self.roberta_positions:  # real tokens at padding_idx + 1, + 2, ...; padding at padding_idx
            real = (attention_mask > 0).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=1) * real + self.padding_idx
        else:
            positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        if self.LayerNorm is not None:
            x = self.LayerNorm(x)
        return dropout(x, self.dropout_rate, keys())


KEYS_PER_LAYER = 3  # BertLayer's dropout sites: attention probabilities, attention output, MLP output


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs, stddev=cfg.initializer_range)
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.query = dense(h, h, ("embed", "heads"), **kw)
        self.key = dense(h, h, ("embed", "heads"), **kw)
        self.value = dense(h, h, ("embed", "heads"), **kw)
        self.attention_output = dense(h, h, ("heads", "embed"), **kw)
        self.attention_norm = _layer_norm(cfg, rngs)
        self.intermediate = dense(h, f, ("embed", "mlp"), **kw)
        self.output = dense(f, h, ("mlp", "embed"), **kw)
        self.output_norm = _layer_norm(cfg, rngs)  # pre-LN: the norm before the MLP
        self.pre_layer_norm = cfg.pre_layer_norm
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim ** -0.5
        self.hidden_dropout = cfg.hidden_dropout
        self.attention_dropout = cfg.attention_dropout

    def __call__(self, x, bias, keys: KeyStream, queries: int | None = None):
        """The layer's output at every position, or at the first ``queries`` ones only (they still
        attend to every position)."""
        if self.pre_layer_norm:
            normed = self.attention_norm(x)
            x = x[:, :queries] + self._attention(normed[:, :queries], normed, bias, keys)
            return x + self._mlp(self.output_norm(x), keys)
        x = self.attention_norm(x[:, :queries] + self._attention(x[:, :queries], x, bias, keys))
        return self.output_norm(x + self._mlp(x, keys))

    def _attention(self, x_queries, x, bias, keys: KeyStream):
        q = split_heads(self.query(x_queries), self.num_heads)
        k, v = (split_heads(proj(x), self.num_heads) for proj in (self.key, self.value))
        context = merge_heads(attend(q, k, v, bias, scale=self.scale,
                                     dropout_rate=self.attention_dropout, key=keys()))
        return dropout(self.attention_output(context), self.hidden_dropout, keys())

    def _mlp(self, x, keys: KeyStream):
        return dropout(self.output(self.activation(self.intermediate(x))), self.hidden_dropout, keys())


class BertPooler(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), use_bias=True,
                           dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs)


class ProjectionHead(nnx.Module):
    """The head on the [CLS] vector: DPR-PAQ's ``LayerNorm(Dense(x))`` (hidden -> hidden), or DPR's
    ``Dense(x)`` (hidden -> projection_dim) without the norm; sentence-transformers' Dense (identity
    activation) and LayerNorm modules compute the same."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = dense(cfg.hidden_size, cfg.embedding_dim, ("embed", "embed_out"), use_bias=True,
                           dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs, stddev=cfg.initializer_range)
        self.norm = (nnx.LayerNorm(cfg.embedding_dim, epsilon=HEAD_LAYER_NORM_EPS, dtype=cfg.dtype, rngs=rngs,
                                   scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed_out",)),
                                   bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed_out",)))
                     if cfg.projection_norm else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.dense(x)
        return x if self.norm is None else self.norm(x)


class Bert(nnx.Module):
    """``Bert(cfg)(input_ids, attention_mask) -> last hidden states [B, L, H]``."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _layer_norm(cfg, rngs) if cfg.pre_layer_norm else None  # Megatron's last LayerNorm
        self.pooler = BertPooler(cfg, rngs) if cfg.with_pooler else None
        self.head = ProjectionHead(cfg, rngs=rngs) if cfg.projection else None

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                 dropout_key: jax.Array | None = None, first_only: bool = False) -> jax.Array:
        """Dropout is on exactly when ``dropout_key`` is given. Token type ids are all 0,
        as DPR and ART feed them. ``first_only``: the last layer computes the first position
        alone ([B, 1, H]), the only one a [CLS] embedding reads (its keys and values still cover
        every position): most of one layer's work saved; the same values (with dropout, that
        layer draws masks of its own shapes)."""
        keys = KeyStream(dropout_key)
        x = self.embeddings(input_ids, attention_mask, jnp.zeros_like(input_ids), keys)
        bias = attention_bias_from_mask(attention_mask)
        last = len(self.layers) - 1
        unrolled = range(len(self.layers))
        if self.config.remat and last > 0:
            # the same keys as unrolled: each layer draws KEYS_PER_LAYER from the stream, in order
            scanned_keys = None if dropout_key is None else jnp.stack(
                [jnp.stack([keys() for _ in range(KEYS_PER_LAYER)]) for _ in range(last)])
            x, _ = scanned_remat(self.layers[:last], lambda layer, x, k: (layer(x, bias, PresetKeys(k)), None), x,
                                 scanned_keys, policy=self.config.remat_policy)
            unrolled = [last]
        for i in unrolled:
            x = self.layers[i](x, bias, keys, queries=1 if first_only and i == last else None)
        return x if self.final_norm is None else self.final_norm(x)

    def embed_cls(self, input_ids, attention_mask, *, dropout_key=None) -> jax.Array:
        """The retriever embedding: last-layer hidden state at [CLS] (RoBERTa's <s>), through the
        projection head when the tower has one, in float32."""
        cls = self(input_ids, attention_mask, dropout_key=dropout_key, first_only=True)[:, 0]
        if self.head is not None:
            cls = self.head(cls)
        return cls.astype(jnp.float32)
