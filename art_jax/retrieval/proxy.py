"""In-memory validation for model selection (DPR-PAQ, Oguz et al. 2022): the MRR of dev
questions over a proxy corpus of their own positives and up to ``negatives`` hard negatives
each, embedded and searched in device memory at every evaluation instead of re-indexing the
whole evidence (up to 300k passages: 6.5k NQ dev questions x 46).

The proxy passages are tokenized once; an evaluation embeds them with the current passage
tower (split over the mesh's ``data`` axis), embeds the questions, and ranks: a question's
rank is 1 + the number of proxy passages that are not its positives and score above its best
positive (ties count for the question); MRR = mean of 1 / rank (no cut-off)."""

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
from art_jax.core.sharding import from_identical
from art_jax.data.examples import TrainingExample
from art_jax.data.tokenization import Tokens, tokenize_passages, tokenize_questions


@dataclasses.dataclass
class ProxyCorpus:
    questions: Tokens  # [Q, Lq]
    passages: Tokens  # [N, Lp], N padded to a multiple of the batch (the padding is no one's positive)
    count: int  # real passages
    positives: np.ndarray  # [Q, N] bool

    @classmethod
    def build(cls, examples: list[TrainingExample], tokenizer, *, question_max_length: int, passage_max_length: int,
              negatives: int = 50, question_truncation: str = "right", multiple: int = 8) -> ProxyCorpus:
        """Passages deduplicated by id (or by title and text when they have none)."""
        rows: dict[object, int] = {}
        passages, owners = [], []
        for q, example in enumerate(examples):
            for is_positive, passage in [(True, p) for p in example.positives] + \
                                        [(False, p) for p in example.hard_negatives[:negatives]]:
                key = passage.passage_id if passage.passage_id is not None else (passage.title, passage.text)
                if key not in rows:
                    rows[key] = len(passages)
                    passages.append(passage)
                if is_positive:
                    owners.append((q, rows[key]))
        if not examples:
            raise UserError("data.dev_examples: no example with a positive passage")
        count = len(passages)
        padded = round_up(count, multiple)
        passages += [passages[-1]] * (padded - count)
        positives = np.zeros((len(examples), padded), bool)
        positives[tuple(np.asarray(owners).T)] = True
        return cls(tokenize_questions(tokenizer, [e.question for e in examples], question_max_length,
                                      pad_to=question_max_length, truncation_side=question_truncation),
                   tokenize_passages(tokenizer, [p.title for p in passages], [p.text for p in passages],
                                     passage_max_length, pad_to=passage_max_length),
                   count, positives)

    def ranks(self, question_tower, passage_tower, mesh, *, batch_size: int = 256) -> np.ndarray:
        """Each question's rank of its best positive among the proxy passages."""
        rows = NamedSharding(mesh, P("data"))
        batch_size = round_up(min(batch_size, self.passages.ids.shape[0]), mesh.shape["data"])
        embed = functools.partial(_embed, rows)
        p = jnp.concatenate([embed(passage_tower, *_pad_batch(self.passages, s, batch_size))
                             for s in range(0, self.passages.ids.shape[0], batch_size)])[:self.positives.shape[1]]
        ranks = []
        for s in range(0, self.questions.ids.shape[0], batch_size):
            ids, mask = _pad_batch(self.questions, s, batch_size)
            q = embed(question_tower, ids, mask)
            positives = np.zeros((q.shape[0], self.positives.shape[1]), bool)
            chunk = self.positives[s:s + batch_size]
            positives[:len(chunk)] = chunk
            valid = np.arange(self.positives.shape[1]) < self.count
            ranks.append(np.asarray(_ranks(q, p, jnp.asarray(positives), jnp.asarray(valid)))[:len(chunk)])
        return np.concatenate(ranks)

    def mrr(self, question_tower, passage_tower, mesh) -> float:
        return float(np.mean(1.0 / self.ranks(question_tower, passage_tower, mesh)))


def _pad_batch(tokens: Tokens, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = tokens.ids[start:start + size], tokens.mask[start:start + size]
    missing = size - ids.shape[0]
    if missing:
        ids, mask = np.pad(ids, ((0, missing), (0, 0))), np.pad(mask, ((0, missing), (0, 0)))
        mask[-missing:, 0] = 1  # a padding row attends to one token
    return ids, mask


def _embed(rows: NamedSharding, tower, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    graph, state = nnx.split(tower)
    return _embed_jit(graph, state, from_identical(rows, ids), from_identical(rows, mask))


@functools.partial(jax.jit, static_argnums=0)
def _embed_jit(graph, state, ids, mask):
    return nnx.merge(graph, state).embed_cls(ids, mask)


@jax.jit
def _ranks(q, p, positives, valid):
    scores = jnp.einsum("qh,nh->qn", q, p)
    best = jnp.max(jnp.where(positives, scores, -jnp.inf), axis=1, keepdims=True)
    return 1 + jnp.sum((scores >= best) & ~positives & valid[None, :], axis=1)
