"""The dual encoder: question and passage BERT towers, [CLS] embeddings (token type ids all 0,
as DPR and ART feed them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from art_jax.data.tokenization import tokenize_passages, tokenize_questions
from art_jax.models.bert import Bert
from art_jax.models.hf import load_bert, load_tokenizer


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
