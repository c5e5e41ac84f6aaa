"""The encoder's hand-written gradients and its shortcut, against independent references: the
dense layers' and attention's VJPs (written for XLA:CPU's speed) give torch autograd's gradients,
dropout and a trained bias included; a tower computing only [CLS] in its last layer gives the
full forward's [CLS] and the same parameter gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from art_jax.models.bert import Bert, BertConfig
from art_jax.models.hf import init_module
from art_jax.models.layers import attend, dense


@pytest.mark.parametrize("features", [(6, 20), (20, 6)], ids=["narrow-input", "wide-input"])
def test_dense_gradients_are_torch_s(features):
    fan_in, fan_out = features
    with nnx.use_eager_sharding(False):
        layer = dense(fan_in, fan_out, ("embed", "mlp"), use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                      rngs=nnx.Rngs(0), stddev=0.5)
    x = np.random.default_rng(0).standard_normal((3, 5, fan_in)).astype(np.float32)
    graph, params = nnx.split(layer, nnx.Param)

    def loss(params, x):
        return jnp.sum(jnp.tanh(nnx.merge(graph, params)(x)) ** 2)

    grads, dx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    kernel = torch.tensor(np.asarray(layer.kernel[...]), requires_grad=True)
    bias = torch.tensor(np.asarray(layer.bias[...]), requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)
    (torch.tanh(tx @ kernel + bias) ** 2).sum().backward()
    np.testing.assert_allclose(np.asarray(grads["kernel"][...]), kernel.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["bias"][...]), bias.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["mask-bias", "trained-bias-and-dropout", "cross-attention-bf16"])
def test_attention_gradients_are_torch_s(case):
    """q [B, Lq, H, D] against k, v [B, Lk, H, D]; the bias a key mask ([B, 1, 1, Lk], no gradient
    wanted but given) or a trained [1, H, Lq, Lk] table (T5's relative positions); dropout's mask is
    the one the key draws, applied to torch's softmax."""
    rng = np.random.default_rng(1)
    b, lq, lk, h, d = 2, 5 if case == "cross-attention-bf16" else 7, 7, 3, 4
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
    if case == "mask-bias":
        keep_keys = np.ones((b, lk), bool)
        keep_keys[1, 4:] = False
        bias = np.where(keep_keys[:, None, None, :], 0.0, np.finfo(np.float32).min).astype(np.float32)
    else:
        bias = rng.standard_normal((1, h, lq, lk)).astype(np.float32)
    rate, key = (0.3, jax.random.key(3)) if case == "trained-bias-and-dropout" else (0.0, None)
    dtype = jnp.bfloat16 if case == "cross-attention-bf16" else jnp.float32
    scale = d ** -0.5
    target = rng.standard_normal((b, lq, h, d)).astype(np.float32)

    def loss(q, k, v, bias):
        out = attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), bias, scale=scale, dropout_rate=rate, key=key)
        return jnp.sum(out.astype(jnp.float32) * target)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*map(jnp.asarray, (q, k, v, bias)))
    keep = (np.asarray(jax.random.bernoulli(key, 1 - rate, (b, h, lq, lk))) if key is not None
            else np.ones((b, h, lq, lk), bool))
    assert key is None or 0 < keep.mean() < 1
    tq, tk, tv, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v, bias))
    scores = torch.einsum("bqhd,bkhd->bhqk", tq, tk) * scale + tb
    weights = torch.softmax(scores, -1) * torch.tensor(keep) / (1 - rate)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, tv)
    (out * torch.tensor(target, dtype=torch.float64)).sum().backward()
    tolerance = 3e-2 if dtype == jnp.bfloat16 else 1e-4
    for name, got, want in zip("qkvb", grads, (tq, tk, tv, tb), strict=True):
        want = want.grad.numpy()
        assert np.abs(want).max() > 1e-2, f"uninformative gradient of {name}"
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tolerance, atol=tolerance, err_msg=name)


@pytest.mark.parametrize("model_type", ["bert", "megatron-bert"])
def test_a_tower_computing_only_cls_in_its_last_layer_is_exact(model_type):
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24,
                     max_position_embeddings=12, model_type=model_type, hidden_dropout=0.0, attention_dropout=0.0)
    tower = init_module(Bert, cfg)
    graph, params, rest = nnx.split(tower, nnx.Param, ...)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params)
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(1, 50, (4, 10)), jnp.int32)
    mask = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [6], [3], [8]]), jnp.int32)

    def cls(params, first_only):
        return nnx.merge(graph, params, rest)(ids, mask, first_only=first_only)[:, 0]

    full, short = cls(params, False), cls(params, True)
    assert float(jnp.abs(full - full[:1]).max()) > 0.1
    np.testing.assert_allclose(np.asarray(short), np.asarray(full), rtol=1e-5, atol=1e-5)
    g_full, g_short = (jax.grad(lambda p, f=f: jnp.sum(jnp.sin(cls(p, f))))(params) for f in (False, True))
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g_full),
                                 jax.tree_util.tree_leaves_with_path(g_short), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_inside_shard_map_the_gradients_are_autodiff_s():
    """Under shard_map (manual axes) the hand-written VJPs step aside: the data-parallel gradient
    of a replicated kernel equals the one computed on the whole batch."""
    from jax.sharding import PartitionSpec as P

    from art_jax.core.sharding import make_mesh

    mesh = make_mesh()
    with nnx.use_eager_sharding(False):
        layer = dense(6, 20, ("embed", "mlp"), use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                      rngs=nnx.Rngs(0), stddev=0.5)
    graph, params = nnx.split(layer, nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 5, 6)).astype(np.float32))
    q = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4, 2, 3)).astype(np.float32))

    def loss(params, x, q):
        hidden = jnp.tanh(nnx.merge(graph, params)(x))
        out = attend(q, q, q, jnp.zeros((q.shape[0], 1, 1, q.shape[1])), scale=0.5)
        return jnp.sum(hidden ** 2) + jnp.sum(out ** 3)

    def sharded(params, x, q):
        return jax.lax.psum(loss(params, x, q), "data")

    want = jax.grad(loss)(params, x, q)
    got = jax.jit(jax.shard_map(jax.grad(sharded), mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                out_specs=P()))(params, x, q)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
