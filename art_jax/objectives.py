"""Training objectives: pure functions of embeddings (and labels) -> (loss, metrics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def score_scale(hidden: int, temperature_multiplier: float = 1.0, score_scaling: bool = True) -> jax.Array:
    """tau: ``m * sqrt(hidden)`` with score scaling (Sachan et al. 2021), else ``m``."""
    return jnp.float32(temperature_multiplier) * (jnp.sqrt(jnp.float32(hidden)) if score_scaling else 1.0)


def retrieval_scores(questions: jax.Array, passages: jax.Array) -> jax.Array:
    """q.d [B, K] in float32; questions [B, H], passages [B, K, H]."""
    return jnp.einsum("bh,bkh->bk", questions, passages, preferred_element_type=jnp.float32)


def student_log_probs(questions: jax.Array, passages: jax.Array, temperature_multiplier: float = 1.0,
                      score_scaling: bool = True) -> jax.Array:
    """log_softmax over K of q.d / tau; questions [B, H], passages [B, K, H]."""
    return retriever_log_probs(retrieval_scores(questions, passages),
                               score_scale(questions.shape[-1], temperature_multiplier, score_scaling))


def retriever_log_probs(scores: jax.Array, tau) -> jax.Array:
    """log p(z | q): log_softmax over the last axis of scores / tau."""
    return jax.nn.log_softmax(scores / tau, axis=-1)


def mean_entropy(log_probs: jax.Array) -> jax.Array:
    """Entropy of each row's distribution over the last axis, mean over the rows."""
    return -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, -1))


def art_loss(questions: jax.Array, passages: jax.Array, teacher_scores: jax.Array,
             temperature_multiplier: float = 1.0, score_scaling: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ART: KL(teacher || student) over the K passages, mean over the batch. The teacher
    distribution is softmax of its scores (no temperature) and gets no gradient."""
    log_student = student_log_probs(questions, passages, temperature_multiplier, score_scaling)
    log_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_scores.astype(jnp.float32)), axis=-1)
    teacher = jnp.exp(log_teacher)
    kl = jnp.sum(teacher * (log_teacher - log_student), axis=-1)
    metrics = {
        "teacher_entropy": mean_entropy(log_teacher),
        "student_entropy": mean_entropy(log_student),
        "argmax_agreement": jnp.mean(jnp.argmax(log_teacher, -1) == jnp.argmax(log_student, -1)),
    }
    return jnp.mean(kl), metrics


def contrastive_loss(questions: jax.Array, passages: jax.Array, temperature_multiplier: float = 1.0,
                     score_scaling: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPR's NLL: each question's positive among every passage of the batch.

    questions [B, H]; passages [B * P, H], question i's own P passages at rows i*P .. i*P+P-1,
    its positive first (P = 1 + hard negatives). Scores q.z / tau over all B * P passages,
    mean over questions of -log p(positive). With global arrays this is the global batch: every
    question sees every device's passages (XLA gathers them). Repeated passages are not
    deduplicated, as in DPR."""
    batch, per_question = questions.shape[0], passages.shape[0] // questions.shape[0]
    scores = jnp.einsum("bh,nh->bn", questions, passages, preferred_element_type=jnp.float32)
    log_probs = retriever_log_probs(scores, score_scale(questions.shape[-1], temperature_multiplier, score_scaling))
    positives = jnp.arange(batch) * per_question
    nll = -jnp.take_along_axis(log_probs, positives[:, None], axis=-1)[:, 0]
    positive_scores = jnp.take_along_axis(log_probs, positives[:, None], axis=-1)
    metrics = {
        "accuracy": jnp.mean(jnp.argmax(log_probs, -1) == positives),  # the positive ranked first in the batch
        "positive_rank": jnp.mean(jnp.sum(log_probs > positive_scores, -1).astype(jnp.float32)) + 1,
    }
    return jnp.mean(nll), metrics


# Reader objectives (methods.md 4-7). Inputs are log-likelihoods the reader already gathered at
# the gold answer tokens: token log-probs [B, T] (FiD over all K passages) or [B, K, T] (one
# passage at a time), with the answer's 0/1 label mask [B, T] (its </s> included). Retriever
# log-probs [B, K] are ``student_log_probs`` of the K retrieved passages.

def _answer_tokens(token_log_probs: jax.Array, label_mask: jax.Array) -> jax.Array:
    """float32 log-probs, 0 off the answer: padding's values may be anything, -inf included, and
    must not leak into sums (nor NaN into gradients)."""
    return jnp.where(label_mask.astype(bool), token_log_probs.astype(jnp.float32), 0.0)


def fid_nll(token_log_probs: jax.Array, label_mask: jax.Array,
            reduction: str = "tokens") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reader's NLL of the answer, token log-probs [B, T].

    ``reduction="tokens"`` (default): mean over every answer token of the batch, what Hugging
    Face's T5ForConditionalGeneration loss is (cross entropy, padding ignored) and so FiD's
    training loss, and EMDR2's reference code's. ``"sequence"``: -log p(a | q) per question
    (sum over its tokens), mean over questions, the papers' notation; it weighs long answers more.
    Metrics: both."""
    answer = _answer_tokens(token_log_probs, label_mask)
    per_token = -jnp.sum(answer) / jnp.maximum(jnp.sum(label_mask.astype(jnp.float32)), 1.0)
    per_answer = -jnp.mean(jnp.sum(answer, -1))
    losses = {"tokens": per_token, "sequence": per_answer}
    if reduction not in losses:
        raise ValueError(f"reduction {reduction!r}: expected tokens or sequence")
    return losses[reduction], {"token_nll": per_token, "answer_nll": per_answer}


def individual_topk_loss(passage_token_log_probs: jax.Array, retriever_log_probs: jax.Array,
                         label_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Individual top-K (Sachan et al. 2021, 3.1): -log sum_k p(a | q, z_k) p(z_k | q), mean over
    the batch; p(a | q, z_k) the product over the answer's tokens of the reader reading passage k
    alone. Gradient reaches both the reader and the retriever. passage_token_log_probs [B, K, T],
    retriever_log_probs [B, K], label_mask [B, T]."""
    answer = jnp.sum(_answer_tokens(passage_token_log_probs, label_mask[:, None, :]), -1)  # log p(a | q, z_k)
    retriever = retriever_log_probs.astype(jnp.float32)
    nll = -jax.nn.logsumexp(answer + retriever, axis=-1)
    return jnp.mean(nll), {"retriever_entropy": mean_entropy(retriever)}


def emdr2_loss(fid_token_log_probs: jax.Array, passage_token_log_probs: jax.Array, retriever_log_probs: jax.Array,
               label_mask: jax.Array, *, marginalise: str = "sequence") -> tuple[jax.Array, dict[str, jax.Array]]:
    """EMDR2 (Sachan et al. 2021, eq. 6): the FiD reader's NLL (``fid_nll``, per token, the reader's
    only gradient) plus the retriever's -log sum_k SG(p(a | q, z_k)) p(z_k | q). The one-passage
    log-probs ``passage_token_log_probs`` [B, K, T] are stopped here: they train nothing.

    ``marginalise="sequence"`` (default): p(a | q, z_k) of the whole answer, as the paper's
    equation writes it (the papers win over the reference code, methods.md); mean over questions.
    ``"token"``: EMDR2's reference code, a mixture over passages for each answer token,
    -logsumexp_k(log p(z_k | q) + SG log p(a_t | q, z_k, a_<t)), averaged over every answer token
    of the batch as that code averages it. The two terms reach disjoint parameters (reader,
    retriever), so their different scales weigh each one's own gradient, except through the
    update's global-norm clip, which scales both together when it is active.
    Metrics: the two terms and the retriever's entropy."""
    passages = jax.lax.stop_gradient(passage_token_log_probs)
    reader, _ = fid_nll(fid_token_log_probs, label_mask)
    if marginalise == "sequence":
        retriever, _ = individual_topk_loss(passages, retriever_log_probs, label_mask)
    elif marginalise == "token":
        retriever_lp = retriever_log_probs.astype(jnp.float32)[:, :, None]
        mixture = jax.nn.logsumexp(retriever_lp + _answer_tokens(passages, label_mask[:, None, :]), axis=1)
        retriever, _ = fid_nll(mixture, label_mask)
    else:
        raise ValueError(f"marginalise {marginalise!r}: expected sequence or token")
    metrics = {"reader_nll": reader, "retriever_nll": retriever,
               "retriever_entropy": mean_entropy(retriever_log_probs.astype(jnp.float32))}
    return reader + retriever, metrics


def joint_topk_memory_weights(retriever_scores: jax.Array, tau: jax.Array | float, lam: jax.Array) -> jax.Array:
    """Joint top-K (Sachan et al. 2021, 3.2): lam * p(z_k | q) = lam * softmax_k(scores / tau), [B, K],
    the bias FiD's decoder adds to its cross-attention logits at every encoder position of passage
    k (repeated over the passage's N positions by the caller). The loss is then ``fid_nll``; the
    question tower and lam (trainable) learn through this bias."""
    return lam * jax.nn.softmax(retriever_scores.astype(jnp.float32) / tau, axis=-1)
