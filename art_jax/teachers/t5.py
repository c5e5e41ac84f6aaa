"""Frozen teachers that score how well a passage reconstructs a question.

``T5Scorer`` is ART's teacher: the mean log-probability of every target token of
``Question: {q}</s>`` given ``Passage: {title} {text} . Please write a question based on
this passage.</s>`` under a frozen T5/T0 (bfloat16 parameters, float32 logits).
The same scorer re-ranks retrieved passages zero-shot (UPR).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from art_jax.core.batching import pad_rows, round_up
from art_jax.core.progress import progress_bar
from art_jax.core.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    from_process_rows,
    local_data_positions,
    to_process_rows,
)
from art_jax.data.prompts import PromptBuilder, PromptConfig
from art_jax.models.hf import load_t5, load_tokenizer
from art_jax.models.t5 import T5


def teacher_scores(model: T5, enc_ids, enc_mask, labels, label_mask) -> jax.Array:
    """ART score per pair: mean over the target tokens of log p(token | prefix, passage)."""
    log_probs = model.target_log_probs(enc_ids, enc_mask, labels)
    label_mask = label_mask.astype(jnp.float32)
    return jnp.sum(log_probs * label_mask, axis=-1) / jnp.maximum(jnp.sum(label_mask, axis=-1), 1.0)


@functools.partial(jax.jit, static_argnames="sharding")
def _teacher_scores(model: T5, enc_ids, enc_mask, labels, label_mask, *, sharding=None) -> jax.Array:
    """``teacher_scores`` jitted; ``sharding`` pins the output's (each process reads back its
    own rows, so the compiler must not choose another layout)."""
    scores = teacher_scores(model, enc_ids, enc_mask, labels, label_mask)
    return scores if sharding is None else jax.lax.with_sharding_constraint(scores, sharding)


class T5Scorer:
    """A frozen T5/T0 teacher: bfloat16 parameters by default, outside any optimizer."""

    def __init__(self, model: T5, tokenizer, prompt: PromptConfig = PromptConfig(), mesh=None,
                 length_multiple: int = 32):
        self.model = model
        self.builder = PromptBuilder(tokenizer, prompt)
        self.mesh = mesh
        self.length_multiple = length_multiple

    @classmethod
    def from_pretrained(cls, name: str, *, dtype: str = "bfloat16", prompt: PromptConfig = PromptConfig(),
                        mesh=None, rules=DEFAULT_RULES) -> "T5Scorer":
        model = load_t5(name, mesh=mesh, rules=rules, dtype=dtype, param_dtype=dtype)
        return cls(model, load_tokenizer(name), prompt, mesh)

    @property
    def data_parallelism(self) -> int:
        """Scorer replicas on this process's devices: the rows it adds to each global batch."""
        if self.mesh is None:
            return 1
        return len(local_data_positions(self.mesh))

    def padded_lengths(self, enc_rows: list[list[int]], dec_rows: list[list[int]]) -> tuple[int, int]:
        """(encoder, decoder) lengths one batch of prompts is padded to: a few static shapes."""
        return round_up(max(map(len, enc_rows)), self.length_multiple), round_up(max(map(len, dec_rows)), 8)

    def dispatch(self, enc_rows: list[list[int]], dec_rows: list[list[int]],
                 lengths: tuple[int, int] | None = None) -> jax.Array:
        """Start scoring one batch of built prompts; returns the (padded) device result
        without waiting, so the host can prepare the next batch meanwhile. Under several
        processes each brings its own prompts (the same number) into one global batch, padded
        to ``lengths`` that all of them agreed on."""
        batch = round_up(len(enc_rows), self.data_parallelism)
        filler = batch - len(enc_rows)  # rows that make the batch divide the mesh, dropped later
        enc_length, dec_length = lengths or self.padded_lengths(enc_rows, dec_rows)
        arrays = (*pad_rows(enc_rows + enc_rows[:1] * filler, int(enc_length)),
                  *pad_rows(dec_rows + dec_rows[:1] * filler, int(dec_length)))
        if self.mesh is None:
            return _teacher_scores(self.model, *arrays)
        return _teacher_scores(self.model, *(from_process_rows(self.mesh, a) for a in arrays),
                               sharding=batch_sharding(self.mesh, 1))

    def score(self, titles: Sequence[str], texts: Sequence[str], questions: Sequence[str], *,
              batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """ART teacher score of each (passage, question) pair, float32 [N], input order."""
        if not (len(titles) == len(texts) == len(questions)):
            raise ValueError("score: titles, texts and questions must have the same length")
        return self.score_prompts(self.builder.encoder_ids(titles, texts), self.builder.decoder_ids(questions),
                                  batch_size=batch_size, progress=progress)

    def score_retrieved(self, questions: Sequence[str], rows: np.ndarray, store, *, batch_size: int = 32) -> np.ndarray:
        """Scores [B, K] of each question with each of its K retrieved corpus-store rows,
        prompts built from the store's pre-tokenized passages."""
        enc_rows = self.builder.encoder_ids_from_passages(store.scorer_passages(rows.reshape(-1)))
        dec_rows = [row for row in self.builder.decoder_ids(questions) for _ in range(rows.shape[1])]
        return self.score_prompts(enc_rows, dec_rows, batch_size=batch_size).reshape(rows.shape)

    def score_prompts(self, enc_rows: list[list[int]], dec_rows: list[list[int]], *, batch_size: int = 32,
                      progress: bool = False) -> np.ndarray:
        """Scores of built prompts, in order of prompt length so that each batch pads little;
        two batches are kept in flight."""
        order = np.argsort([len(r) for r in enc_rows], kind="stable")
        chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        lengths = np.array([self.padded_lengths([enc_rows[i] for i in chunk], [dec_rows[i] for i in chunk])
                            for chunk in chunks], np.int64).reshape(-1, 2)
        if jax.process_count() > 1:  # one global shape per batch, the longest of any process, agreed once
            lengths = multihost_utils.process_allgather(lengths).max(axis=0)
        scores = np.empty(len(order), np.float32)
        in_flight: list[tuple[np.ndarray, jax.Array]] = []
        with progress_bar(total=len(order), desc="scoring", unit="pair", disable=not progress) as bar:
            def collect():
                chunk, result = in_flight.pop(0)
                scores[chunk] = to_process_rows(result)[:len(chunk)]
                bar.update(len(chunk))

            for chunk, chunk_lengths in zip(chunks, lengths):
                in_flight.append((chunk, self.dispatch([enc_rows[i] for i in chunk], [dec_rows[i] for i in chunk],
                                                       tuple(chunk_lengths))))
                if len(in_flight) > 2:
                    collect()
            while in_flight:
                collect()
        return scores
