"""Inverse Cloze Task pre-training (Lee et al. 2019; Sachan et al. 2021): from the evidence
alone, no labels.

Example i of an epoch is corpus passage ``order(i)``: its pseudo-query is one of its sentences
drawn at random, its positive the passage with that sentence removed (kept in 10% of the
examples, as ORQA does, so the model also learns word matching), its title kept; the other
passages of the global batch are the negatives. A one-sentence passage keeps its sentence.
Draws are seeded by (seed, epoch, row), so a step alone fixes its examples.
"""

from __future__ import annotations

import numpy as np

from art_jax.core.errors import UserError
from art_jax.data.sentences import split_sentences
from art_jax.methods.contrastive import Contrastive, Passage

KEEP_SENTENCE = 0.1  # ORQA's probability of leaving the query sentence in its context


def ict_example(sentences: list[str], title: str, rng: np.random.Generator) -> tuple[str, Passage]:
    """(pseudo-query, (title, context)) from a passage's sentences."""
    chosen = int(rng.integers(len(sentences)))
    keep = len(sentences) == 1 or rng.random() < KEEP_SENTENCE
    context = sentences if keep else sentences[:chosen] + sentences[chosen + 1:]
    return sentences[chosen], (title, " ".join(context))


class Ict(Contrastive):
    name = "ict"

    @staticmethod
    def check_config(cfg) -> None:
        Contrastive.check_config(cfg)
        if not (cfg.data.corpus or cfg.data.corpus_store):
            raise UserError("method=ict trains on the evidence: set data.corpus or data.corpus_store")
        if cfg.train.hard_negatives != 0:
            raise UserError(f"method=ict takes in-batch negatives only: set train.hard_negatives=0 "
                            f"(it is {cfg.train.hard_negatives})")

    def load_examples(self, cfg) -> None:
        self.num_examples = len(self.store)
        self.hard_negatives = 0

    def examples(self, indices: list[int], epoch: int) -> list[tuple[str, list[Passage]]]:
        out = []  # one spaCy pass over the step's passages, then each example's draws
        for row, sentences in zip(indices, split_sentences([self.store.text(row) for row in indices])):
            rng = np.random.default_rng([self.cfg.seed, epoch, row])
            question, passage = ict_example(sentences, self.store.title(row), rng)
            out.append((question, [passage]))
        return out
