"""Supervised DPR (Karpukhin et al. 2020; Sachan et al. 2021 section 2.3): questions with a
positive passage and mined hard negatives, the contrastive loss over the global batch.

As DPR: the positive is the first listed; each epoch draws ``train.hard_negatives`` of an
example's hard negatives at random (seeded by seed, epoch and example); an example with
fewer is filled with random passages (of the corpus store when the run has one, else of the
training file's own passages), so every step has the same shapes. Passages repeated in a
batch are not deduplicated.
"""

from __future__ import annotations

import numpy as np

from art_jax.core.distributed import is_lead
from art_jax.core.errors import UserError
from art_jax.data.examples import read_training_examples
from art_jax.methods.common import check_input_files
from art_jax.methods.contrastive import Contrastive, Passage, draw_hard_negatives, random_fill


class Dpr(Contrastive):
    name = "dpr"

    @staticmethod
    def check_config(cfg) -> None:
        Contrastive.check_config(cfg)
        if not cfg.data.train_examples:
            raise UserError("method=dpr needs data.train_examples: DPR's training JSON (art-jax mine writes it) "
                            "or Tevatron JSONL")
        check_input_files(cfg, ("train_examples",))

    def load_examples(self, cfg) -> None:
        training = read_training_examples(cfg.data.train_examples)
        self.training = training.examples
        self.num_examples = len(self.training)
        self.hard_negatives = cfg.train.hard_negatives
        if training.without_positive and is_lead():
            print(f"{cfg.data.train_examples}: {training.without_positive} example(s) without a positive passage "
                  "left out")
        if self.store is None:  # the fill comes from the training file's own passages
            self.pool = [p for e in self.training for p in (*e.positives, *e.hard_negatives)]
            self.pool_owner = np.repeat(np.arange(len(self.training)),
                                        [len(e.positives) + len(e.hard_negatives) for e in self.training])

    def random_passages(self, rng: np.random.Generator, count: int, index: int) -> list[Passage]:
        """``count`` random passages, none of them example ``index``'s positive (by title and
        text: other examples may hold it too) nor, drawn from the file's passages, any of its own."""
        positive = self.training[index].positives[0]
        positive = (positive.title, positive.text)
        if self.store is not None:
            store = self.store
            rows = random_fill(rng, len(store), count, lambda rows: [
                (store.title(int(r)), store.text(int(r))) == positive for r in rows])
            return [(store.title(int(r)), store.text(int(r))) for r in rows]
        pool = self.pool
        picks = random_fill(rng, len(pool), count, lambda picks: [
            self.pool_owner[i] == index or (pool[i].title, pool[i].text) == positive for i in picks])
        return [(pool[int(i)].title, pool[int(i)].text) for i in picks]

    def examples(self, indices: list[int], epoch: int) -> list[tuple[str, list[Passage]]]:
        return [self._example(index, epoch) for index in indices]

    def _example(self, index: int, epoch: int) -> tuple[str, list[Passage]]:
        example = self.training[index]
        rng = np.random.default_rng([self.cfg.seed, epoch, index])
        chosen = [example.hard_negatives[int(i)]
                  for i in draw_hard_negatives(rng, len(example.hard_negatives), self.hard_negatives)]
        passages = [(p.title, p.text) for p in (example.positives[0], *chosen)]
        return example.question, passages + self.random_passages(rng, self.hard_negatives - len(chosen), index)
