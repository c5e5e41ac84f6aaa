"""In-memory validation for model selection (DPR-PAQ, Oguz et al. 2022): the MRR of dev
questions over a proxy corpus of their own positives and up to ``negatives`` hard negatives
each, embedded and searched in device memory at every evaluation instead of re-indexing the
whole evidence (up to 300k passages: 6.5k NQ dev questions x 46).

The proxy passages are tokenized once; an evaluation embeds them with the current passage
tower (split over the mesh's ``data`` axis), embeds the questions, and ranks: a question's
rank is 1 + the number of proxy passages that are not its positives and score at least as
high as its best positive (ties count against the question); MRR = mean of 1 / rank (no
cut-off). Each process evaluates alone on its own devices (pass a local mesh and towers)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.batching import round_up
from art_jax.core.errors import UserError
from art_jax.data.examples import TrainingExample
from art_jax.data.tokenization import Tokens, tokenize_passages, tokenize_questions


@dataclasses.dataclass
class ProxyCorpus:
    questions: Tokens  # [Q, Lq]
    passages: Tokens  # [N, Lp]
    positives: np.ndarray  # [Q, M] each question's positive rows, padded with -1 (M: the most any has)

    @property
    def count(self) -> int:
        return self.passages.ids.shape[0]

    @classmethod
    def build(cls, examples: list[TrainingExample], tokenizer, *, question_max_length: int, passage_max_length: int,
              negatives: int = 50, question_truncation: str = "right") -> ProxyCorpus:
        """Passages deduplicated by id (or by title and text when they have none)."""
        if not examples:
            raise UserError("data.dev_examples: no example with a positive passage")
        rows: dict[object, int] = {}
        passages, positives = [], []
        for example in examples:
            own = []
            for is_positive, passage in [(True, p) for p in example.positives] + \
                                        [(False, p) for p in example.hard_negatives[:negatives]]:
                key = passage.passage_id if passage.passage_id is not None else (passage.title, passage.text)
                if key not in rows:
                    rows[key] = len(passages)
                    passages.append(passage)
                if is_positive:
                    own.append(rows[key])
            positives.append(sorted(set(own)))
        padded = np.full((len(examples), max(map(len, positives))), -1, np.int32)
        for i, own in enumerate(positives):
            padded[i, :len(own)] = own
        return cls(tokenize_questions(tokenizer, [e.question for e in examples], question_max_length,
                                      pad_to=question_max_length, truncation_side=question_truncation),
                   tokenize_passages(tokenizer, [p.title for p in passages], [p.text for p in passages],
                                     passage_max_length, pad_to=passage_max_length),
                   padded)

    def ranks(self, question_tower, passage_tower, mesh, *, batch_size: int = 256) -> np.ndarray:
        """Each question's rank of its best positive among the proxy passages."""
        rows = NamedSharding(mesh, P("data"))
        batch_size = round_up(batch_size, mesh.shape["data"])
        p = jnp.concatenate([_embed(rows, passage_tower, self.passages, s, batch_size)
                             for s in range(0, self.count, batch_size)])[:self.count]
        ranks = []
        for s in range(0, self.questions.ids.shape[0], batch_size):
            q = _embed(rows, question_tower, self.questions, s, batch_size)
            positives = self.positives[s:s + batch_size]
            ranks.append(np.asarray(_ranks(q[:len(positives)], p, jnp.asarray(positives))))
        return np.concatenate(ranks)

    def mrr(self, question_tower, passage_tower, mesh) -> float:
        return float(np.mean(1.0 / self.ranks(question_tower, passage_tower, mesh)))


def _embed(rows: NamedSharding, tower, tokens: Tokens, start: int, size: int) -> jax.Array:
    """[size, H] embeddings of rows start.. of ``tokens`` (past the end: padding rows)."""
    ids, mask = tokens.ids[start:start + size], tokens.mask[start:start + size]
    missing = size - ids.shape[0]
    if missing:
        ids, mask = np.pad(ids, ((0, missing), (0, 0))), np.pad(mask, ((0, missing), (0, 0)))
        mask[-missing:, 0] = 1  # a padding row attends to one token
    graph, state = nnx.split(tower)
    return _embed_jit(graph, state, jax.device_put(ids, rows), jax.device_put(mask, rows))


@functools.partial(jax.jit, static_argnums=0)
def _embed_jit(graph, state, ids, mask):
    return nnx.merge(graph, state).embed_cls(ids, mask)


@jax.jit
def _ranks(q, p, positives):
    """1 + the passages scoring at least the best positive, less the positives among them."""
    scores = jnp.einsum("qh,nh->qn", q, p)
    own = jnp.take_along_axis(scores, jnp.maximum(positives, 0), axis=1)
    own = jnp.where(positives >= 0, own, -jnp.inf)
    best = jnp.max(own, axis=1, keepdims=True)
    return 1 + jnp.sum(scores >= best, axis=1) - jnp.sum(own >= best, axis=1)
