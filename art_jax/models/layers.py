"""Building blocks shared by the BERT and T5 modules.

Parameters carry logical axis names (``embed``, ``heads``, ``mlp``, ``vocab``) that
``art_jax.core.sharding`` maps onto a mesh; modules never see the mesh themselves.
Dropout is a pure function of an explicit key so that a train step stays a pure
function of (state, batch): no RNG state lives inside the modules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _transposed(x: jax.Array) -> jax.Array:
    """``x`` with its last two axes swapped, as an array of its own on XLA:CPU.

    In a backward pass XLA:CPU otherwise folds the transpose into the matmul, and its matmul
    with a transposed operand (contracting a leading axis) runs without the XNNPACK kernels,
    or it transposes the larger operand instead, in a loop fusion far slower than the matmul.
    Transposing the smaller operand explicitly made a BERT tower's forward and backward 1.1x
    faster on CPU (a 128x12x128x32 attention's, 1.4x); GPUs and TPUs take transposed operands
    as they are."""
    return jax.lax.platform_dependent(jnp.swapaxes(x, -1, -2), cpu=jax.lax.optimization_barrier,
                                      default=lambda swapped: swapped)


def _hand_written_gradients() -> bool:
    """Whether the VJPs below apply: not inside shard_map (manual axes) nor on a mesh of explicit
    axes, whose typing of sharded values they do not follow; there, autodiff's own gradient.
    (Being custom VJPs, they also rule out forward-mode differentiation: jax.jvp, jacfwd.)"""
    mesh = jax.sharding.get_abstract_mesh()
    return not (mesh.explicit_axes or mesh.manual_axes)


@jax.custom_vjp
def _linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.matmul(x, kernel)


def _linear_fwd(x, kernel):
    return jnp.matmul(x, kernel), (x, kernel)


def _linear_bwd(residuals, dy):
    x, kernel = residuals
    dx = jnp.matmul(dy, kernel.T).astype(x.dtype)
    x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    if x.shape[-1] <= dy.shape[-1]:  # x^T dy, transposing the narrower of the two
        dkernel = _transposed(x) @ dy
    else:
        dkernel = (_transposed(dy) @ x).T
    return dx, dkernel.astype(kernel.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """nnx.Linear's contraction (the last axis of ``lhs`` with the first of a 2-D kernel) through
    ``_linear``, whose gradient is the same with the kernel's computed faster on CPU."""
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2 or precision is not None or (
            preferred_element_type not in (None, lhs.dtype)) or out_sharding is not None or (
            not _hand_written_gradients()):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    return _linear(lhs, rhs)


INIT_STDDEV = 0.02  # BERT's and T5's initialiser range, what dense and embed draw with


def dense(in_features: int, out_features: int, axes: tuple[str, str], *, use_bias: bool,
          dtype, param_dtype, rngs: nnx.Rngs, stddev: float = INIT_STDDEV) -> nnx.Linear:
    """A Linear whose kernel (and bias) are tagged with logical axis names."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(stddev), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, (axes[1],)),
        dot_general=_dot_general, rngs=rngs)


def embed(num: int, features: int, axes: tuple[str, str], *, dtype, param_dtype,
          rngs: nnx.Rngs, stddev: float = INIT_STDDEV) -> nnx.Embed:
    return nnx.Embed(
        num, features, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(stddev), axes),
        rngs=rngs)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``key`` is None (inference) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class KeyStream:
    """Hands out a fresh dropout key per call site, or None when dropout is off."""

    def __init__(self, key: jax.Array | None):
        self._key = key
        self._count = 0

    def __call__(self) -> jax.Array | None:
        if self._key is None:
            return None
        self._count += 1
        return jax.random.fold_in(self._key, self._count)


class PresetKeys:
    """A ``KeyStream`` that hands out given keys (one block's, under ``scanned_remat``), or None."""

    def __init__(self, keys: jax.Array | None):
        self._keys, self._count = keys, 0

    def __call__(self) -> jax.Array | None:
        if self._keys is None:
            return None
        self._count += 1
        return self._keys[self._count - 1]


COMPUTE_DTYPES = ("float32", "bfloat16")  # every model's compute choice: float32 parameters, logits and softmax
# What a rematerialised layer keeps for its backward pass (jax.checkpoint_policies): nothing (all of its
# forward recomputed: least memory), its matmuls without batch dimensions (the dense layers' outputs;
# attention and the elementwise work recomputed), or every matmul (attention's scores and mixes too)
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


def checkpoint_policy(name: str):
    """The ``jax.checkpoint_policies`` member of a ``REMAT_POLICIES`` name."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r}; expected one of {', '.join(REMAT_POLICIES)}")
    return getattr(jax.checkpoint_policies, name)


def scanned_remat(blocks, call, x, inputs=None, *, policy: str = "nothing_saveable"):
    """``x`` through ``blocks`` (modules of one structure) as one ``lax.scan`` of the rematerialised
    ``call(block, x, block_inputs) -> (x, output)`` over their stacked weights; ``inputs``: per-block
    arrays stacked on a leading axis (or None); ``policy``: what each block keeps (``REMAT_POLICIES``).
    Returns (x, the stacked outputs). Every model's remat
    (T5's blocks, BERT's layers): unrolled, XLA may schedule every block's recomputation before the
    first backward one and keep all their activations alive at once (XLA:CPU did: T5-base FiD's
    step compiled to 66 GiB with remat as without), where a loop runs one block's backward at a time."""
    graph, _ = nnx.split(blocks[0])
    weights = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(nnx.split(block)[1] for block in blocks))

    def step(x, per_block):
        state, block_inputs = per_block
        return call(nnx.merge(graph, state), x, block_inputs)

    return jax.lax.scan(jax.checkpoint(step, prevent_cse=False, policy=checkpoint_policy(policy)), x,
                        (weights, inputs))


def attention_bias_from_mask(mask: jax.Array) -> jax.Array:
    """[B, S] 0/1 key mask -> additive [B, 1, 1, S] bias (float32)."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    batch, length, width = x.shape
    return x.reshape(batch, length, num_heads, width // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    batch, length, heads, head_dim = x.shape
    return x.reshape(batch, length, heads * head_dim)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *, scale: float,
           dropout_rate: float = 0.0, key: jax.Array | None = None, heads_first_kv: bool = False) -> jax.Array:
    """Softmax attention over [B, L, H, D] inputs; scores and softmax in float32; ``bias``
    broadcasts to [B, H, Lq, Lk] (and gets its gradient: T5's relative positions are trained).

    The contractions run head-major ([B, H, L, D]): on XLA:CPU the batched matmuls are
    4x faster in that layout than contracting the [B, L, H, D] views directly.
    ``heads_first_kv``: ``k`` and ``v`` are given head-major already ([B, H, S, D]; a decoder
    that reads the same keys every step lays them out once).
    """
    q = jnp.swapaxes(q, 1, 2)
    if not heads_first_kv:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    keep = None
    if key is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(key, 1.0 - dropout_rate, (*q.shape[:3], k.shape[2]))
    attention = _attention if _hand_written_gradients() else _attention.fun
    return jnp.swapaxes(attention(q, k, v, bias, keep, scale, dropout_rate), 1, 2)


def _attention_weights(q, k, bias, scale):
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    return jax.nn.softmax(scores + bias, axis=-1)


def _dropped(weights, keep, rate):
    return weights if keep is None else jnp.where(keep, weights / (1.0 - rate), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, bias, keep, scale, rate):
    weights = _dropped(_attention_weights(q, k, bias, scale), keep, rate)
    return jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v)


def _attention_fwd(q, k, v, bias, keep, scale, rate):
    weights = _attention_weights(q, k, bias, scale)
    out = jnp.einsum("bhqk,bhkd->bhqd", _dropped(weights, keep, rate).astype(v.dtype), v)
    # the bias itself is not kept (a T5 encoder's is [B, H, L, L] in every layer): only which of its
    # axes are broadcast (size 1), as an empty array, for the shape of its gradient
    broadcast = jnp.zeros(tuple(1 if n == 1 else 0 for n in bias.shape), bias.dtype)
    return out, (q, k, v, broadcast, keep, weights)


def _attention_bwd(scale, rate, residuals, d_out):
    """Autodiff's gradient (up to rounding: the scores' gradient is taken to the inputs' dtype
    before its two matmuls), the matmuls that contract a leading axis given the small
    [B, H, L, D] operand transposed explicitly (see ``_transposed``)."""
    q, k, v, broadcast, keep, weights = residuals
    bias_shape = tuple(1 if n == 1 else full for n, full in zip(broadcast.shape, weights.shape[-broadcast.ndim:]))
    dropped = _dropped(weights, keep, rate).astype(v.dtype)
    dv = jnp.swapaxes(_transposed(d_out) @ dropped, -1, -2)
    d_dropped = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    d_weights = _dropped(d_dropped, keep, rate)
    d_logits = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
    d_bias = _unbroadcast(d_logits, bias_shape)
    d_scores = (d_logits * scale).astype(q.dtype)
    dq = jnp.matmul(d_scores, k, preferred_element_type=jnp.float32).astype(q.dtype)
    dk = jnp.swapaxes(jnp.matmul(_transposed(q), d_scores, preferred_element_type=jnp.float32), -1, -2)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), d_bias.astype(broadcast.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _unbroadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The gradient of an array of ``shape`` that was broadcast to ``x.shape``."""
    x = jnp.sum(x, axis=tuple(range(x.ndim - len(shape))))
    return jnp.sum(x, axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1), keepdims=True)
