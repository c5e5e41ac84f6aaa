"""Greedy and beam-search decoding of ``T5`` over a memory (the encoder's output; FiD's
passages end to end), jittable as a whole: each loop is a ``lax.while_loop`` that stops once
no row can change.

Each step goes through a decoder. ``CachedDecoder`` keeps every block's self-attention keys
and values in a functional cache (a tuple of [R, H, T, d_kv] arrays, one position written per
step), computes the cross-attention keys and values once from the memory (head-major, the
layout the contractions take, so that no step copies them), and takes the
relative position bias of the current position from a precomputed [T, T] table; positions
start at 0 for the first generated token (whose input is the start token), as in
transformers. ``UncachedDecoder`` re-runs ``T5.logits`` over the whole prefix each step: the
reference the cache is checked against (``use_cache=False``).

A row's beams are consecutive decoder rows (row * beams + beam) that read one memory row, so
neither the memory nor its keys and values are copied per beam.

Under jit, with the model as an argument (NNX modules are pytrees) and the sizes static::

    nnx.jit(greedy_decode, static_argnames=("max_new_tokens",))(model, memory, mask, max_new_tokens=16)
    jax.jit(functools.partial(beam_search, beams=4, max_new_tokens=16))(model, memory, mask)

Inputs sharded over a mesh's data axis need nothing more.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from art_jax.models.t5 import T5, cross_attention_bias

# transformers' score for what must not be chosen; added (not assigned) as it adds it, so that the
# sums round alike.
_IMPOSSIBLE = -1.0e9


class CachedDecoder:
    """One position per step, over a key/value cache (the state) of ``max_length`` positions."""

    def __init__(self, model: T5, memory, memory_mask, memory_bias, max_length: int):
        self.model = model
        self.max_length = max_length
        self.cross = model.decoder.cross_keys_values(memory)
        self.cross_bias = cross_attention_bias(memory_mask, memory_bias)
        self.self_bias = model.decoder.self_attention_bias(max_length)  # row t: position t's, causal

    def initial_state(self, rows: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
        cfg = self.model.config
        empty = jnp.zeros((rows, cfg.num_heads, self.max_length, cfg.d_kv), cfg.dtype)
        return tuple((empty, empty) for _ in self.model.decoder.blocks)

    def step(self, state, tokens, position) -> tuple[jax.Array, Any]:
        """(float32 logits [R, V] following ``tokens`` [R] at ``position``, the cache with them)."""
        self_bias = jax.lax.dynamic_slice_in_dim(self.self_bias, position, 1, axis=2)
        hidden, state = self.model.decoder.run_blocks(
            self.model.shared(tokens[:, None]), self_bias, cross=self.cross, cross_bias=self.cross_bias,
            caches=state, position=position)
        return self.model.lm_logits(self.model.decoder.final_layer_norm(hidden))[:, 0], state


class UncachedDecoder:
    """The decoder re-run over the whole prefix each step; the state is the tokens so far
    ([R, max_length], later positions hidden by the causal mask)."""

    def __init__(self, model: T5, memory, memory_mask, memory_bias, max_length: int):
        self.model = model
        self.max_length = max_length
        self.memory, self.memory_mask, self.memory_bias = memory, memory_mask, memory_bias

    def initial_state(self, rows: int) -> jax.Array:
        return jnp.zeros((rows, self.max_length), jnp.int32)

    def step(self, state, tokens, position) -> tuple[jax.Array, jax.Array]:
        state = state.at[:, position].set(tokens)
        logits = self.model.logits(self.memory, self.memory_mask, state, memory_bias=self.memory_bias)
        return jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False), state


def _decoder(model: T5, memory, memory_mask, memory_bias, max_length: int, use_cache: bool):
    return (CachedDecoder if use_cache else UncachedDecoder)(model, memory, memory_mask, memory_bias, max_length)


def _special_ids(model: T5) -> tuple[int, int, int]:
    """(eos, pad, decoder start) ids of the checkpoint."""
    cfg = model.config
    return cfg.eos_token_id, cfg.pad_token_id, cfg.decoder_start_token_id


def greedy_decode(model: T5, memory, memory_mask, *, max_new_tokens: int, memory_bias=None, use_cache: bool = True
                  ) -> jax.Array:
    """Int32 [B, max_new_tokens]: the most probable token at each step (transformers' greedy
    search), the checkpoint's pad id after a row's first eos (which is kept)."""
    rows = memory.shape[0]
    eos_id, pad_id, start_id = _special_ids(model)
    decoder = _decoder(model, memory, memory_mask, memory_bias, max_new_tokens, use_cache)

    def running(carry):
        step, _, ended, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(ended)

    def advance(carry):
        step, last, ended, tokens, state = carry
        logits, state = decoder.step(state, last, step)
        chosen = jnp.where(ended, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], step, axis=1)
        return step + 1, chosen, ended | (chosen == eos_id), tokens, state

    start = (jnp.int32(0), jnp.full((rows,), start_id, jnp.int32), jnp.zeros((rows,), bool),
             jnp.full((rows, max_new_tokens), pad_id, jnp.int32), decoder.initial_state(rows))
    return jax.lax.while_loop(running, advance, start)[3]


class _Beams(NamedTuple):
    """Beam search's loop state, per row b of the batch (transformers' names in brackets)."""
    step: jax.Array  # tokens generated so far
    last: jax.Array  # [B * beams] each running beam's newest token: the decoder's next input
    running_tokens: jax.Array  # [B, beams, T]
    running_scores: jax.Array  # [B, beams] summed log-probs, best first
    finished_tokens: jax.Array  # [B, beams, T] the best ended hypotheses [sequences]
    finished_scores: jax.Array  # [B, beams] their length-normalised scores, best first [beam_scores]
    finished: jax.Array  # [B, beams] which slots hold one [is_sent_finished]
    improvable: jax.Array  # [B] a running beam may still beat them [is_early_stop_heuristic_unsatisfied]
    state: Any  # the decoder's, B * beams rows


def _take_beams(values, indices):
    """values [B, C, ...] at indices [B, K] of axis 1."""
    return jnp.take_along_axis(values, indices.reshape(indices.shape + (1,) * (values.ndim - 2)), axis=1)


def _reorder(state, rows):
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), state)


def _finish(b: _Beams, scores, tokens, ended, length_penalty: float, stop_when_full: bool):
    """(tokens, scores, flags) of the finished slots after a step: the candidates among the first
    ``beams`` that ended, scored sum / length ** length_penalty, merged with the slots' hypotheses,
    the best kept; none enters a row that cannot improve or (``stop_when_full``) is full."""
    beams = b.finished.shape[1]
    just_finished = ended & (jnp.arange(scores.shape[1]) < beams)
    normalised = scores / (b.step + 1).astype(jnp.float32) ** length_penalty
    normalised += (jnp.all(b.finished, axis=-1, keepdims=True) & stop_when_full) * _IMPOSSIBLE
    normalised += ~b.improvable[:, None] * _IMPOSSIBLE
    normalised += ~just_finished * _IMPOSSIBLE
    finished_scores, best = jax.lax.top_k(jnp.concatenate([b.finished_scores, normalised], axis=1), beams)
    return (_take_beams(jnp.concatenate([b.finished_tokens, tokens], axis=1), best), finished_scores,
            _take_beams(jnp.concatenate([b.finished, just_finished], axis=1), best))


def beam_search(model: T5, memory, memory_mask, *, beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, memory_bias=None, use_cache: bool = True) -> jax.Array:
    """Int32 [B, max_new_tokens]: each row's best hypothesis, the pad id after its eos;
    transformers' ``generate(num_beams=beams, length_penalty=..., early_stopping=...,
    do_sample=False)`` step for step.

    Each step takes the 2 * beams best continuations of the running beams (summed log-probs);
    the best ``beams`` of those that have not ended run on, and those of the first ``beams``
    that ended (the eos or the length limit) compete for the ``beams`` finished slots on
    sum / length ** length_penalty. A row stops changing once no running beam can beat its
    worst finished one (estimated at the current length; at ``max_new_tokens`` for
    early_stopping="never" and a positive penalty) or, with early_stopping=True, once all
    its slots are full. One beam is greedy decoding, as in transformers.
    """
    if beams == 1:
        return greedy_decode(model, memory, memory_mask, max_new_tokens=max_new_tokens, memory_bias=memory_bias,
                             use_cache=use_cache)
    batch = memory.shape[0]
    eos_id, pad_id, start_id = _special_ids(model)
    candidates = 2 * beams  # transformers keeps (1 + number of eos ids) * beams
    decoder = _decoder(model, memory, memory_mask, memory_bias, max_new_tokens, use_cache)
    stop_when_full = early_stopping is True

    def open_rows(b: _Beams):
        return b.improvable & ~(jnp.all(b.finished, axis=-1) & stop_when_full)

    def advance(b: _Beams) -> _Beams:
        logits, state = decoder.step(b.state, b.last, b.step)
        vocab = logits.shape[-1]
        totals = jax.nn.log_softmax(logits).reshape(batch, beams, vocab) + b.running_scores[..., None]
        scores, flat = jax.lax.top_k(totals.reshape(batch, beams * vocab), candidates)
        source, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice_in_dim(_take_beams(b.running_tokens, source), token[..., None],
                                                     b.step, axis=2)
        ended = (token == eos_id) | (b.step + 1 >= max_new_tokens)

        running_scores, keep = jax.lax.top_k(scores + ended.astype(jnp.float32) * _IMPOSSIBLE, beams)
        parents = jnp.arange(batch)[:, None] * beams + _take_beams(source, keep)
        finished_tokens, finished_scores, finished = _finish(b, scores, tokens, ended, length_penalty, stop_when_full)
        step = b.step + 1
        best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step
        best_running = running_scores[:, :1] / jnp.asarray(best_length, jnp.float32) ** length_penalty
        worst_finished = jnp.where(finished, jnp.min(finished_scores, axis=1, keepdims=True), _IMPOSSIBLE)
        improvable = b.improvable & jnp.any(best_running > worst_finished, axis=-1)
        return _Beams(step, _take_beams(token, keep).reshape(-1), _take_beams(tokens, keep), running_scores,
                      finished_tokens, finished_scores, finished, improvable, _reorder(state, parents.reshape(-1)))

    start = _Beams(
        step=jnp.int32(0), last=jnp.full((batch * beams,), start_id, jnp.int32),
        running_tokens=jnp.full((batch, beams, max_new_tokens), pad_id, jnp.int32),
        # one live beam: the first step's candidates, all after the start token, count once
        running_scores=jnp.zeros((batch, beams)).at[:, 1:].set(_IMPOSSIBLE),
        finished_tokens=jnp.full((batch, beams, max_new_tokens), pad_id, jnp.int32),
        finished_scores=jnp.full((batch, beams), _IMPOSSIBLE), finished=jnp.zeros((batch, beams), bool),
        improvable=jnp.ones((batch,), bool), state=decoder.initial_state(batch * beams))
    end = jax.lax.while_loop(lambda b: (b.step < max_new_tokens) & jnp.any(open_rows(b)), advance, start)
    return end.finished_tokens[:, 0]
