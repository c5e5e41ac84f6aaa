"""Retriever inputs as DPR and ART build them: question ``[CLS] q [SEP]``, passage
``[CLS] title [SEP] text [SEP]`` with only the text cut to fit, padded to a few static shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from art_jax.core.batching import pad_rows, round_up
from art_jax.core.errors import UserError


@dataclasses.dataclass
class Tokens:
    """A padded batch: int32 ids and 0/1 mask, both [B, L]."""

    ids: np.ndarray
    mask: np.ndarray


def _pad(rows: list[list[int]], pad_id: int, length: int | None) -> Tokens:
    return Tokens(*pad_rows(rows, length or round_up(max(map(len, rows), default=1), 8), pad_id))


def question_rows(tokenizer, questions: Sequence[str], max_length: int, truncation: str = "right") -> list[list[int]]:
    """``[CLS] q [SEP]`` ids, unpadded; a question too long loses its end (``right``) or its
    start (``left``), its special tokens kept."""
    before, tokenizer.truncation_side = tokenizer.truncation_side, truncation
    try:
        return tokenizer(list(questions), truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = before


def tokenize_questions(tokenizer, questions: Sequence[str], max_length: int, *,
                       pad_to: int | None = None, truncation_side: str = "right") -> Tokens:
    for i, q in enumerate(questions):
        if not q or not q.strip():
            raise UserError(f"question {i} is empty")
    return _pad(question_rows(tokenizer, questions, max_length, truncation_side), tokenizer.pad_token_id, pad_to)


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
