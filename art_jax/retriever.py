"""The dual encoder: question and passage BERT towers, [CLS] embeddings.

Inputs follow DPR/ART: question ``[CLS] q [SEP]``, passage ``[CLS] title [SEP] text [SEP]``
with only the text cut to fit, token type ids all 0 (the towers ignore them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from art_jax.batching import pad_rows, round_up
from art_jax.errors import UserError
from art_jax.models.bert import Bert
from art_jax.models.hf import load_bert, load_tokenizer


@dataclasses.dataclass
class Tokens:
    """A padded batch: int32 ids and 0/1 mask, both [B, L]."""

    ids: np.ndarray
    mask: np.ndarray


def _pad(rows: list[list[int]], pad_id: int, length: int | None) -> Tokens:
    return Tokens(*pad_rows(rows, length or round_up(max(map(len, rows), default=1), 8), pad_id))


def tokenize_questions(tokenizer, questions: Sequence[str], max_length: int, *,
                       pad_to: int | None = None) -> Tokens:
    for i, q in enumerate(questions):
        if not q or not q.strip():
            raise UserError(f"question {i} is empty")
    rows = tokenizer(list(questions), truncation=True, max_length=max_length)["input_ids"]
    return _pad(rows, tokenizer.pad_token_id, pad_to)


def passage_rows(tokenizer, titles: Sequence[str], texts: Sequence[str], max_length: int) -> list[list[int]]:
    """``[CLS] title [SEP] text [SEP]`` ids, only the text cut to fit ``max_length`` (a title
    too long to leave room for any text is cut too, rather than failing the batch: the pair
    loses its end and keeps its final [SEP], as the corpus store re-cuts it)."""
    try:
        return tokenizer(list(titles), list(texts), truncation="only_second", max_length=max_length)["input_ids"]
    except Exception:  # the fast tokenizer refuses a pair whose first part alone is too long
        return [_passage_row(tokenizer, title, text, max_length) for title, text in zip(titles, texts)]


def _passage_row(tokenizer, title: str, text: str, max_length: int) -> list[int]:
    try:
        return tokenizer(title, text, truncation="only_second", max_length=max_length)["input_ids"]
    except Exception:
        return tokenizer(title, text)["input_ids"][:max_length - 1] + [tokenizer.sep_token_id]


def tokenize_passages(tokenizer, titles: Sequence[str], texts: Sequence[str], max_length: int, *,
                      pad_to: int | None = None) -> Tokens:
    return _pad(passage_rows(tokenizer, titles, texts, max_length), tokenizer.pad_token_id, pad_to)


@dataclasses.dataclass
class DualEncoder:
    """Two towers (the same module when shared) and their tokenizer."""

    question: Bert
    passage: Bert
    tokenizer: object
    question_max_length: int = 256
    passage_max_length: int = 256

    @classmethod
    def from_pretrained(cls, question: str, passage: str | None = None, *, shared: bool = False,
                        mesh=None, **overrides) -> "DualEncoder":
        """Towers from Hugging Face checkpoints. With one checkpoint both towers start from
        it (separate weights unless ``shared``)."""
        q_tower = load_bert(question, mesh=mesh, **overrides)
        p_tower = q_tower if shared else load_bert(passage or question, mesh=mesh, **overrides)
        return cls(q_tower, p_tower, load_tokenizer(question))

    def embed_questions(self, questions: Sequence[str]) -> jax.Array:
        tokens = tokenize_questions(self.tokenizer, questions, self.question_max_length)
        return _embed(self.question, tokens.ids, tokens.mask)

    def embed_passages(self, titles: Sequence[str], texts: Sequence[str]) -> jax.Array:
        tokens = tokenize_passages(self.tokenizer, titles, texts, self.passage_max_length)
        return _embed(self.passage, tokens.ids, tokens.mask)


# NNX modules are pytrees: the tower is an ordinary jit argument.
_embed = jax.jit(lambda tower, ids, mask: tower.embed_cls(ids, mask))
