"""The reader objectives against float64 torch written here from probabilities (products and sums,
not the implementation's logsumexp): FiD's NLL as Hugging Face's T5 loss, Individual top-K, EMDR2's
sequence and per-token marginals, joint top-K's attention bias; values and autograd gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from art_jax.objectives import (
    emdr2_loss,
    fid_nll,
    individual_topk_loss,
    joint_topk_memory_weights,
    score_scale,
    student_log_probs,
)

SHAPES = [(4, 3, 6), (3, 5, 7), (5, 4, 5)]  # (B, K, T)


def _inputs(b: int, k: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Gold-token log-probs with answers of 1, T and random lengths; padding holds -inf and
    garbage (a reader's padded positions may hold anything)."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[1, t], rng.integers(1, t + 1, b - 2)])
    mask = np.arange(t)[None, :] < lengths[:, None]
    garbage = np.where(rng.random((b, k, t)) < 0.5, -np.inf, 3.0)
    passage = np.where(mask[:, None, :], np.log(rng.uniform(0.05, 0.95, (b, k, t))), garbage)
    fid = np.where(mask, np.log(rng.uniform(0.05, 0.95, (b, t))), garbage[:, 0])
    scores = rng.standard_normal((b, k)) * 1.5
    retriever = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    return {"fid": fid, "passage": passage, "retriever": retriever, "mask": mask.astype(np.int32)}


def _torch(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def _answer_prob(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """p(a | ...) as the product of the answer tokens' probabilities (padding counts 1)."""
    return torch.where(mask, token_log_probs.exp(), torch.ones_like(token_log_probs)).prod(-1)


def _torch_token_mean_nll(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return -token_log_probs.masked_select(mask).sum() / mask.sum()


def _jax(x: dict[str, np.ndarray], *names: str) -> list[jax.Array]:
    return [jnp.asarray(x[n], jnp.float32) if n != "mask" else jnp.asarray(x[n]) for n in names]


def test_fid_nll_default_is_hugging_face_t5_loss():
    """fid_nll's default reduction on a T5's gold-token log-probs is T5ForConditionalGeneration's loss."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                                num_heads=2, decoder_start_token_id=0)).eval()
    labels = torch.randint(2, 40, (4, 7))
    lengths = torch.tensor([1, 7, 3, 5])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    with torch.no_grad():
        out = model(input_ids=torch.randint(2, 40, (4, 9)), labels=labels.masked_fill(~mask, -100))
    gold = out.logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    loss, metrics = fid_nll(jnp.asarray(gold.numpy()), jnp.asarray(mask.numpy()))
    np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
    assert float(loss) == float(metrics["token_nll"])


@pytest.mark.parametrize("shape", SHAPES)
def test_fid_nll_both_reductions(shape):
    x = _inputs(*shape)
    fid, mask = _torch(x["fid"]), torch.tensor(x["mask"], dtype=torch.bool)
    per_answer = -_answer_prob(fid, mask).log().mean()
    loss, metrics = fid_nll(*_jax(x, "fid", "mask"), reduction="sequence")
    np.testing.assert_allclose(float(loss), float(per_answer), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["answer_nll"]), float(per_answer), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["token_nll"]), float(_torch_token_mean_nll(fid, mask)), rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        fid_nll(*_jax(x, "fid", "mask"), reduction="mean")


def _grads(fn, x, names, **kwargs):
    """(loss, gradients w.r.t. every input but the mask)."""
    args = _jax(x, *names)
    loss, grads = jax.value_and_grad(lambda *a: fn(*a, args[-1], **kwargs)[0], argnums=tuple(range(len(names) - 1)))(
        *args[:-1])
    return float(loss), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("shape", SHAPES)
def test_individual_topk_loss_and_gradients(shape):
    x = _inputs(*shape)
    passage, retriever = _torch(x["passage"], True), _torch(x["retriever"], True)
    mask = torch.tensor(x["mask"], dtype=torch.bool)
    expected = -(_answer_prob(passage, mask[:, None, :]) * retriever.exp()).sum(-1).log().mean()
    expected.backward()
    loss, (g_passage, g_retriever) = _grads(individual_topk_loss, x, ("passage", "retriever", "mask"))
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)
    np.testing.assert_allclose(g_passage, passage.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g_retriever, retriever.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert np.all(g_passage[~np.broadcast_to(x["mask"][:, None, :], g_passage.shape).astype(bool)] == 0)
    assert np.abs(g_passage).max() > 1e-3 and np.abs(g_retriever).max() > 1e-3


def _torch_emdr2(x, marginalise: str):
    """(loss, fid leaf, retriever leaf): the reader's token-mean NLL plus the retriever's term with
    the one-passage probabilities detached."""
    fid, passage, retriever = _torch(x["fid"], True), _torch(x["passage"]), _torch(x["retriever"], True)
    mask = torch.tensor(x["mask"], dtype=torch.bool)
    weights = retriever.exp()
    if marginalise == "sequence":
        retriever_nll = -(_answer_prob(passage, mask[:, None, :]).detach() * weights).sum(-1).log().mean()
    else:  # one mixture over passages per answer token, averaged over all answer tokens of the batch
        answer = passage.masked_fill(~mask[:, None, :], 0.0)  # padding's -inf would make NaN gradients here
        mixture = (answer.exp().detach() * weights[:, :, None]).sum(1)
        retriever_nll = _torch_token_mean_nll(mixture.log(), mask)
    return _torch_token_mean_nll(fid, mask) + retriever_nll, retriever_nll, fid, retriever


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("marginalise", ["sequence", "token"])
def test_emdr2_loss_and_gradients(shape, marginalise):
    x = _inputs(*shape)
    expected, retriever_nll, fid, retriever = _torch_emdr2(x, marginalise)
    expected.backward()
    loss, (g_fid, g_passage, g_retriever) = _grads(emdr2_loss, x, ("fid", "passage", "retriever", "mask"),
                                                   marginalise=marginalise)
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)
    assert np.all(g_passage == 0)  # the one-passage reader passes train nothing, whatever the caller does
    np.testing.assert_allclose(g_fid, fid.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g_retriever, retriever.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert np.abs(g_retriever).max() > 1e-3
    _, metrics = emdr2_loss(*_jax(x, "fid", "passage", "retriever", "mask"), marginalise=marginalise)
    np.testing.assert_allclose(float(metrics["retriever_nll"]), retriever_nll.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reader_nll"]), (expected - retriever_nll).item(), rtol=1e-5)
    p = np.exp(x["retriever"])
    np.testing.assert_allclose(float(metrics["retriever_entropy"]), -np.mean(np.sum(p * x["retriever"], -1)),
                               rtol=1e-5)


def test_emdr2_marginals_differ_and_default_is_sequence():
    x = _inputs(4, 4, 6, seed=3)
    args = _jax(x, "fid", "passage", "retriever", "mask")
    sequence, token = (float(emdr2_loss(*args, marginalise=m)[1]["retriever_nll"]) for m in ("sequence", "token"))
    assert abs(sequence - token) > 0.1
    assert float(emdr2_loss(*args)[0]) == float(emdr2_loss(*args, marginalise="sequence")[0])
    with pytest.raises(ValueError, match="marginalise"):
        emdr2_loss(*args, marginalise="tokens")


def test_losses_are_float32_from_bfloat16():
    x = _inputs(3, 3, 4)
    fid, passage, retriever, mask = (a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a
                                     for a in _jax(x, "fid", "passage", "retriever", "mask"))
    assert fid_nll(fid, mask)[0].dtype == jnp.float32
    assert individual_topk_loss(passage, retriever, mask)[0].dtype == jnp.float32
    for marginalise in ("sequence", "token"):
        loss, metrics = emdr2_loss(fid, passage, retriever, mask, marginalise=marginalise)
        assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


def test_individual_topk_trains_both_towers_through_student_log_probs():
    """Composed with the retriever's log-probs: gradients to question and passage embeddings as torch's."""
    x = _inputs(3, 4, 5, seed=1)
    rng = np.random.default_rng(2)
    q, d = rng.standard_normal((3, 16)), rng.standard_normal((3, 4, 16))

    def loss_fn(q, d):
        return individual_topk_loss(jnp.asarray(x["passage"], jnp.float32), student_log_probs(q, d),
                                    jnp.asarray(x["mask"]))[0]

    loss, (g_q, g_d) = jax.value_and_grad(loss_fn, argnums=(0, 1))(jnp.asarray(q, jnp.float32),
                                                                  jnp.asarray(d, jnp.float32))
    tq, td = _torch(q, True), _torch(d, True)
    prior = torch.softmax(torch.einsum("bh,bkh->bk", tq, td) / 4.0, -1)  # tau = sqrt(16)
    mask = torch.tensor(x["mask"], dtype=torch.bool)
    expected = -(_answer_prob(_torch(x["passage"]), mask[:, None, :]) * prior).sum(-1).log().mean()
    expected.backward()
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_q), tq.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_d), td.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_joint_topk_memory_weights():
    rng = np.random.default_rng(0)
    scores, probe = rng.standard_normal((3, 5)) * 8, rng.standard_normal((3, 5))
    tau = score_scale(64)

    def probe_sum(scores, lam):  # a scalar through the bias, for gradients
        return jnp.sum(joint_topk_memory_weights(scores, tau, lam) * probe)

    weights = joint_topk_memory_weights(jnp.asarray(scores, jnp.float32), tau, jnp.float32(0.7))
    assert weights.shape == (3, 5) and weights.dtype == jnp.float32
    g_scores, g_lam = jax.grad(probe_sum, argnums=(0, 1))(jnp.asarray(scores, jnp.float32), jnp.float32(0.7))
    ts, tl = _torch(scores, True), _torch(np.array(0.7), True)
    expected = tl * torch.softmax(ts / 8.0, -1)
    (expected * _torch(probe)).sum().backward()
    np.testing.assert_allclose(np.asarray(weights), expected.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_scores), ts.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(g_lam), float(tl.grad), rtol=1e-5)
