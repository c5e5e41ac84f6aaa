"""Pair pre-training (DPR-PAQ, Oguz et al. 2022): the contrastive loss over the global batch on
tens of millions of (question, positive, hard negatives) pairs, read pre-tokenized from a
pair store (``art-jax prepare-pairs``; ``data/pairs.py``).

As DPR: a question's positive comes first; each epoch draws ``train.hard_negatives`` of its
pair's hard negatives at random (seeded by seed, epoch and pair); a pair with fewer is filled
with random passages (corpus store rows when the run has one, else other pairs' positives),
so every step has the same shapes. Questions are re-cut to ``retriever.question_max_length``
from the side ``retriever.question_truncation`` says ("left" keeps the end of a dialogue's
context, as DPR-PAQ does), passages to ``retriever.train_passage_max_length``.

Nothing grows with the number of pairs: the columns are memory-mapped, the epoch's order is a
permutation evaluated at the step's positions (``data/shuffle.py``), a step reads only its
own pairs' rows.
"""

from __future__ import annotations

import numpy as np

from art_jax.core.errors import UserError
from art_jax.data.pairs import PairStore, corpus_tokens_match, is_pair_store
from art_jax.data.tokenization import Tokens
from art_jax.methods.contrastive import Contrastive, draw_hard_negatives, random_fill


class Pairs(Contrastive):
    name = "pairs"

    @staticmethod
    def check_config(cfg) -> None:
        Contrastive.check_config(cfg)
        if not cfg.data.pairs:
            raise UserError("method=pairs needs data.pairs: a pair store (art-jax prepare-pairs --out ...)")
        if not is_pair_store(cfg.data.pairs):
            raise UserError(f"data.pairs: {cfg.data.pairs} is not a pair store (no meta.json of one); "
                            "build it with art-jax prepare-pairs")

    def load_examples(self, cfg) -> None:
        self.pairs = PairStore(cfg.data.pairs)
        self.num_examples = len(self.pairs)
        self.hard_negatives = cfg.train.hard_negatives
        meta, retriever = self.pairs.meta, cfg.retriever
        self.pairs.check_tokenizer(self.tokenizer, "data.pairs")
        stored = meta["question"]
        if retriever.question_max_length > stored["max_length"]:
            raise UserError(f"retriever.question_max_length={retriever.question_max_length}: data.pairs holds "
                            f"questions cut at {stored['max_length']} tokens; prepare the pairs with a larger "
                            "--question-max-length")
        if retriever.question_truncation != stored["truncation"] and stored["at_max_length"]:
            raise UserError(f"retriever.question_truncation={retriever.question_truncation!r}: data.pairs cut its "
                            f"questions on the {stored['truncation']!r} ({stored['at_max_length']} reach its max "
                            "length); prepare the pairs with --question-truncation "
                            f"{retriever.question_truncation}")
        length = retriever.train_passage_max_length
        if meta["inline_passages"] and length > meta["passage"]["max_length"]:
            raise UserError(f"retriever.train_passage_max_length={length}: data.pairs holds passages cut at "
                            f"{meta['passage']['max_length']} tokens; prepare the pairs with a larger "
                            "--passage-max-length")
        self.pairs.check_corpus(self.store, "data.pairs")
        if self.store is not None:
            key = "data.corpus_store" if cfg.data.corpus_store else "data.corpus"
            if not corpus_tokens_match(self.store, self.tokenizer):
                raise UserError(f"{key}: {self.store.path} was tokenized with "
                                f"{self.store.meta['retriever']['tokenizer']!r}, whose tokens differ from "
                                "retriever.checkpoint's; prepare the store with the run's retriever")
            if length > self.store.meta["retriever"]["max_length"]:
                raise UserError(f"retriever.train_passage_max_length={length}: {self.store.path} holds passages "
                                f"cut at {self.store.meta['retriever']['max_length']} tokens")

    def references(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        """[n, 1 + hard_negatives] passage references of the pairs ``rows`` in ``epoch``:
        positive first, then the drawn hard negatives, then the fill."""
        refs = np.empty((len(rows), 1 + self.hard_negatives), np.int64)
        refs[:, 0] = self.pairs.positive(rows)
        if not self.hard_negatives:
            return refs
        for j, row in enumerate(rows.tolist()):
            rng = np.random.default_rng([self.cfg.seed, epoch, row])
            hard = self.pairs.hard_negatives(row)
            chosen = hard[draw_hard_negatives(rng, len(hard), self.hard_negatives)]
            refs[j, 1:1 + len(chosen)] = chosen
            missing = self.hard_negatives - len(chosen)
            if missing and self.store is not None:  # random corpus rows, not the pair's positive
                refs[j, 1 + len(chosen):] = random_fill(rng, len(self.store), missing,
                                                        lambda r, own=refs[j, 0]: r == own)
            elif missing:  # other pairs' positives
                refs[j, 1 + len(chosen):] = self.pairs.positive(
                    random_fill(rng, len(self.pairs), missing, lambda r, own=row: r == own))
        return refs

    def passage_tokens(self, refs: np.ndarray) -> Tokens:
        """Tokens of the references ``refs`` [m]: corpus rows from the corpus store, inline
        passages from the pair store, each re-cut to train_passage_max_length."""
        length = self.cfg.retriever.train_passage_max_length
        ids = np.empty((len(refs), length), np.int32)
        mask = np.empty((len(refs), length), np.int32)
        corpus = refs >= 0
        for where, tokens in ((corpus, lambda r: self.store.retriever_tokens(r, length)),
                              (~corpus, lambda r: self.pairs.passage_tokens(-1 - r, length))):
            if where.any():
                part = tokens(refs[where])
                ids[where], mask[where] = part.ids, part.mask
        return Tokens(ids, mask)

    def tokens(self, indices: list[int], epoch: int) -> tuple[Tokens, Tokens]:
        """Straight from the memory-mapped columns: questions [n, question_max_length], passages
        [n * (1 + hard_negatives), train_passage_max_length], each question's positive first."""
        rows = np.asarray(indices, np.int64)
        questions = self.pairs.question_tokens(rows, self.cfg.retriever.question_max_length,
                                               self.cfg.retriever.question_truncation)
        return questions, self.passage_tokens(self.references(rows, epoch).reshape(-1))
