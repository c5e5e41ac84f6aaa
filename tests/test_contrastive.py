"""The contrastive objective (DPR's NLL over the global batch): equal to torch's DPR loss on
the same embeddings; loss and gradients the same on 8 devices as on 1, with and without hard
negatives and accumulation; cached-gradient accumulation equal to the whole batch at once."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.sharding import make_mesh
from art_jax.methods import contrastive
from art_jax.models.bert import Bert, BertConfig
from art_jax.models.hf import init_module
from art_jax.objectives import contrastive_loss
from art_jax.training.state import ParamGroups


def _torch_dpr_nll(q: np.ndarray, ctx: np.ndarray, per_question: int, tau: float) -> float:
    """DPR's BiEncoderNllLoss: scores q @ ctx^T over all contexts, log_softmax, NLL of each
    question's positive (at i * per_question), mean."""
    scores = torch.tensor(q, dtype=torch.float64) @ torch.tensor(ctx, dtype=torch.float64).T / tau
    positives = torch.arange(q.shape[0]) * per_question
    return float(torch.nn.functional.nll_loss(torch.log_softmax(scores, dim=1), positives, reduction="mean"))


@pytest.mark.parametrize("hard_negatives", [0, 1, 3])
@pytest.mark.parametrize("scaling", [True, False])
def test_loss_equals_torch_dpr_nll(hard_negatives, scaling):
    rng = np.random.default_rng(hard_negatives)
    per_question, hidden = 1 + hard_negatives, 16
    q = rng.standard_normal((8, hidden)).astype(np.float32)
    ctx = rng.standard_normal((8 * per_question, hidden)).astype(np.float32)
    loss, metrics = contrastive_loss(jnp.asarray(q), jnp.asarray(ctx), 1.0, scaling)
    tau = np.sqrt(hidden) if scaling else 1.0
    np.testing.assert_allclose(float(loss), _torch_dpr_nll(q, ctx, per_question, tau), rtol=1e-5)
    scores = q @ ctx.T
    assert float(metrics["accuracy"]) == np.mean(scores.argmax(1) == np.arange(8) * per_question)
    # a multiplier m scales tau
    half, _ = contrastive_loss(jnp.asarray(q), jnp.asarray(ctx), 0.5, scaling)
    np.testing.assert_allclose(float(half), _torch_dpr_nll(q, ctx, per_question, tau * 0.5), rtol=1e-5)


def test_loss_sees_every_passage_of_the_batch():
    """A question's loss changes when another question's hard negative changes: the negatives
    are the whole batch's passages."""
    rng = np.random.default_rng(0)
    q, ctx = rng.standard_normal((4, 8)), rng.standard_normal((8, 8))
    before = float(contrastive_loss(jnp.asarray(q), jnp.asarray(ctx))[0])
    ctx[7] = q[0] * 3  # question 3's hard negative, aligned with question 0
    after = float(contrastive_loss(jnp.asarray(q), jnp.asarray(ctx))[0])
    assert after > before + 0.1


def _groups(shared: bool, dropout: float):
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                     max_position_embeddings=32, hidden_dropout=dropout, attention_dropout=dropout,
                     initializer_range=0.3)
    question = init_module(Bert, cfg, seed=0)
    passage = question if shared else init_module(Bert, cfg, seed=1)
    return ParamGroups.split({"question": question, "passage": passage})


def _batch(batch_size: int, per_question: int, accumulation: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    b = batch_size // accumulation

    def tokens(rows, length):
        ids = rng.integers(5, 60, (accumulation, rows, length))
        lengths = rng.integers(2, length + 1, (accumulation, rows))
        mask = (np.arange(length) < lengths[..., None]).astype(np.int32)
        return jnp.asarray(ids * mask, jnp.int32), jnp.asarray(mask)

    q_ids, q_mask = tokens(b, 6)
    p_ids, p_mask = tokens(b * per_question, 10)
    return {"question_ids": q_ids, "question_mask": q_mask, "passage_ids": p_ids, "passage_mask": p_mask}


def _run(groups, params, batch, mesh, accumulation: int):
    objective = contrastive.objective(groups, accumulation=accumulation)
    shardings = contrastive.batch_shardings(mesh)
    replicated = NamedSharding(mesh, P())
    fn = jax.jit(objective.gradients, in_shardings=(replicated, shardings, replicated),
                 out_shardings=replicated)
    placed = {name: jax.device_put(value, shardings[name]) for name, value in batch.items()}
    (loss, _), grads = fn(jax.device_put(params, replicated), placed, jax.random.key(7))
    return float(loss), jax.tree.map(np.asarray, grads)


def _close(a, b, rtol=2e-4, atol=2e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("hard_negatives,accumulation,shared", [(0, 1, False), (2, 2, True)])
def test_eight_devices_equal_one(hard_negatives, accumulation, shared):
    """The same global batch (dropout on, the same key) on 8 devices and on 1."""
    groups, params = _groups(shared, dropout=0.1)
    batch = _batch(8 * accumulation, 1 + hard_negatives, accumulation)
    one = _run(groups, params, batch, make_mesh(devices=jax.devices()[:1]), accumulation)
    eight = _run(groups, params, batch, make_mesh(), accumulation)
    np.testing.assert_allclose(one[0], eight[0], rtol=1e-5)
    _close(one[1], eight[1])
    assert any(np.abs(g).max() > 1e-4 for g in jax.tree.leaves(one[1]))  # gradients reach the towers


def test_cached_gradients_equal_autodiff_of_the_whole_batch():
    """Accumulation over 4 micro-batches (GradCache) gives the loss and gradients of one
    backward pass through the whole batch, with dropout on: each micro-batch keeps its key in
    both passes."""
    groups, params = _groups(True, dropout=0.3)
    batch = _batch(8, 2, 4, seed=5)
    objective = contrastive.objective(groups, accumulation=4)
    key = jax.random.key(1)
    (loss, _), grads = jax.jit(objective.gradients)(params, batch, key)
    expected_loss, expected = jax.value_and_grad(lambda p: objective.loss(p, batch, key)[0])(params)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5)
    _close(grads, expected)
    # dropout is on: another key gives another loss
    assert abs(float(objective.loss(params, batch, jax.random.key(2))[0]) - float(loss)) > 1e-4
