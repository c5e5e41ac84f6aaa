"""A teacher with no weights: Dirichlet-smoothed unigram query likelihood (the offline demo's)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from art_jax.data.tokenization import tokenize_questions


class QueryLikelihoodScorer:
    """Dirichlet-smoothed unigram query likelihood, the classic log p(q | d) - the quantity
    T0 estimates with a language model, here from counts, so it needs no pretrained
    weights (the offline demo's teacher). Score = ``scale`` x the mean over question
    tokens of log((c(w, d) + mu p(w | C)) / (|d| + mu)); the scale (about the question
    length makes it a sum) sharpens the teacher's softmax, since template words shared by
    every passage dominate a mean. Tokens are the retriever's, special tokens left out."""

    def __init__(self, tokenizer, store, *, mu: float = 50.0, scale: float = 1.0, max_length: int = 64):
        self.tokenizer = tokenizer
        self.mu, self.scale, self.max_length = mu, scale, max_length
        vocab = max(len(tokenizer), int(store.meta["retriever"]["vocab_size"]))
        self.special = np.zeros(vocab, bool)
        self.special[tokenizer.all_special_ids] = True
        counts = np.bincount(np.asarray(store.retriever.data), minlength=vocab).astype(np.float64)
        counts[self.special] = 0
        # add-one, so a question word missing from the whole corpus costs a finite amount
        self.collection_log_probs = jnp.asarray(np.log((counts + 1) / (counts.sum() + vocab)), jnp.float32)

    def score_retrieved(self, questions: Sequence[str], rows: np.ndarray, store, **_) -> jax.Array:
        q = tokenize_questions(self.tokenizer, questions, self.max_length)
        p = store.retriever_tokens(rows.reshape(-1), store.meta["retriever"]["max_length"], multiple=8)
        p_ids, p_mask = (a.reshape(*rows.shape, -1) for a in (p.ids, p.mask))
        return _query_likelihood(q.ids, q.mask * ~self.special[q.ids], p_ids, p_mask * ~self.special[p_ids],
                                 self.collection_log_probs, self.mu, self.scale)


@jax.jit
def _query_likelihood(q_ids, q_mask, p_ids, p_mask, collection_log_probs, mu, scale):
    """[B, K] scores; q [B, Lq], p [B, K, Lp]; masks already exclude special tokens."""
    counts = jnp.sum((p_ids[:, :, None, :] == q_ids[:, None, :, None]) & (p_mask[:, :, None, :] > 0), -1)
    lengths = jnp.sum(p_mask, -1).astype(jnp.float32)
    background = mu * jnp.exp(collection_log_probs[q_ids])[:, None, :]
    log_probs = jnp.log(counts + background) - jnp.log(lengths + mu)[..., None]
    q_mask = q_mask.astype(jnp.float32)[:, None, :]
    return scale * jnp.sum(log_probs * q_mask, -1) / jnp.maximum(jnp.sum(q_mask, -1), 1.0)
