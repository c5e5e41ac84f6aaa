"""Training objectives over K retrieved passages per question."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def student_log_probs(questions: jax.Array, passages: jax.Array, temperature_multiplier: float = 1.0) -> jax.Array:
    """log_softmax over K of q.d / (m * sqrt(hidden)); questions [B, H], passages [B, K, H]."""
    scale = temperature_multiplier * jnp.sqrt(jnp.float32(questions.shape[-1]))
    scores = jnp.einsum("bh,bkh->bk", questions, passages, preferred_element_type=jnp.float32) / scale
    return jax.nn.log_softmax(scores, axis=-1)


def art_loss(questions: jax.Array, passages: jax.Array, teacher_scores: jax.Array,
             temperature_multiplier: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ART: KL(teacher || student) over the K passages, mean over the batch. The teacher
    distribution is softmax of its scores (no temperature) and gets no gradient."""
    log_student = student_log_probs(questions, passages, temperature_multiplier)
    log_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_scores.astype(jnp.float32)), axis=-1)
    teacher = jnp.exp(log_teacher)
    kl = jnp.sum(teacher * (log_teacher - log_student), axis=-1)
    metrics = {
        "teacher_entropy": -jnp.mean(jnp.sum(teacher * log_teacher, -1)),
        "student_entropy": -jnp.mean(jnp.sum(jnp.exp(log_student) * log_student, -1)),
        "argmax_agreement": jnp.mean(jnp.argmax(log_teacher, -1) == jnp.argmax(log_student, -1)),
    }
    return jnp.mean(kl), metrics
