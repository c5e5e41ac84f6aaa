"""Cached-gradient accumulation (Gao et al. 2021, "GradCache") for losses over a whole batch.

A contrastive loss couples every example of the batch (each question's negatives are every
other passage), so plain accumulation, which takes each micro-batch's loss alone, would
shrink the negatives to one micro-batch. Instead: (1) embed every micro-batch without
gradient, (2) take the loss and its gradient with respect to the embeddings of the whole
batch, (3) embed each micro-batch again with a vector-Jacobian product against its slice
of that gradient, summing the parameter gradients. Same loss and gradients as the whole
batch at once (each micro-batch keeps its dropout key in both passes); the cost is one
more forward pass of the encoders and the whole batch's embeddings held at once, while
activations are held for one micro-batch only.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# (params, micro_batch, key) -> embeddings (a pytree of arrays, leading axis the micro-batch's rows)
EncodeFn = Callable[..., object]
# (embeddings with a leading micro-batch axis A, batch) -> (loss, metrics)
LossOfEmbeddings = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def micro_batch_key(key: jax.Array, index) -> jax.Array:
    return jax.random.fold_in(key, index)


def whole_batch_loss(encode: EncodeFn, loss_of: LossOfEmbeddings, params, batch: dict[str, jax.Array],
                     key: jax.Array):
    """The loss of the whole batch (every array with a leading micro-batch axis), embedded in
    one pass: what ``cached_gradients`` reproduces, with the same dropout keys."""
    count = jax.tree.leaves(batch)[0].shape[0]
    embeddings = [encode(params, jax.tree.map(lambda x, i=i: x[i], batch), micro_batch_key(key, i))
                  for i in range(count)]
    return loss_of(jax.tree.map(lambda *xs: jnp.stack(xs), *embeddings), batch)


def cached_gradients(encode: EncodeFn, loss_of: LossOfEmbeddings, params, batch: dict[str, jax.Array],
                     key: jax.Array):
    """((loss, metrics), gradients) of ``whole_batch_loss``, holding one micro-batch's
    activations at a time. One micro-batch is plain backpropagation."""
    count = jax.tree.leaves(batch)[0].shape[0]
    if count == 1:
        return jax.value_and_grad(lambda p: whole_batch_loss(encode, loss_of, p, batch, key), has_aux=True)(params)
    indices = jnp.arange(count)
    frozen = jax.lax.stop_gradient(params)
    embeddings = jax.lax.map(lambda xs: encode(frozen, xs[1], micro_batch_key(key, xs[0])), (indices, batch))
    (loss, metrics), embedding_grads = jax.value_and_grad(loss_of, has_aux=True)(embeddings, batch)

    def body(total, xs):
        i, micro_batch, cotangent = xs
        _, vjp = jax.vjp(lambda p: encode(p, micro_batch, micro_batch_key(key, i)), params)
        (grads,) = vjp(cotangent)
        return jax.tree.map(jnp.add, total, grads), None

    grads, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), (indices, batch, embedding_grads))
    return (loss, metrics), grads
