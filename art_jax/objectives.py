"""Training objectives: pure functions of embeddings (and labels) -> (loss, metrics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def score_scale(hidden: int, temperature_multiplier: float = 1.0, score_scaling: bool = True) -> jax.Array:
    """tau: ``m * sqrt(hidden)`` with score scaling (Sachan et al. 2021), else ``m``."""
    return jnp.float32(temperature_multiplier) * (jnp.sqrt(jnp.float32(hidden)) if score_scaling else 1.0)


def student_log_probs(questions: jax.Array, passages: jax.Array, temperature_multiplier: float = 1.0,
                      score_scaling: bool = True) -> jax.Array:
    """log_softmax over K of q.d / tau; questions [B, H], passages [B, K, H]."""
    scores = jnp.einsum("bh,bkh->bk", questions, passages, preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(scores / score_scale(questions.shape[-1], temperature_multiplier, score_scaling), -1)


def art_loss(questions: jax.Array, passages: jax.Array, teacher_scores: jax.Array,
             temperature_multiplier: float = 1.0, score_scaling: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ART: KL(teacher || student) over the K passages, mean over the batch. The teacher
    distribution is softmax of its scores (no temperature) and gets no gradient."""
    log_student = student_log_probs(questions, passages, temperature_multiplier, score_scaling)
    log_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_scores.astype(jnp.float32)), axis=-1)
    teacher = jnp.exp(log_teacher)
    kl = jnp.sum(teacher * (log_teacher - log_student), axis=-1)
    metrics = {
        "teacher_entropy": -jnp.mean(jnp.sum(teacher * log_teacher, -1)),
        "student_entropy": -jnp.mean(jnp.sum(jnp.exp(log_student) * log_student, -1)),
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
    log_probs = jax.nn.log_softmax(scores / score_scale(questions.shape[-1], temperature_multiplier, score_scaling), -1)
    positives = jnp.arange(batch) * per_question
    nll = -jnp.take_along_axis(log_probs, positives[:, None], axis=-1)[:, 0]
    positive_scores = jnp.take_along_axis(log_probs, positives[:, None], axis=-1)
    metrics = {
        "accuracy": jnp.mean(jnp.argmax(log_probs, -1) == positives),  # the positive ranked first in the batch
        "positive_rank": jnp.mean(jnp.sum(log_probs > positive_scores, -1).astype(jnp.float32)) + 1,
    }
    return jnp.mean(nll), metrics
