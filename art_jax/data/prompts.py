"""ART's teacher prompts as token ids (megatron/model/art_model.py): the encoder reads
``Passage: {title} {text} . Please write a question based on this passage.</s>``, the decoder
is scored on ``Question: {q}</s>``. The corpus store keeps each passage's ``title + text`` ids;
the head and the verbalizer are added when a prompt is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from art_jax.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    head: str = "Passage: "
    verbalizer: str = " . Please write a question based on this passage."
    question_prefix: str = "Question: "
    max_encoder_tokens: int = 512  # passage prompt, verbalizer and </s> included
    max_decoder_tokens: int = 128  # question target, </s> included


class PromptBuilder:
    """Token ids of ART's teacher prompts, built from ids as the reference does: the
    passage part ``head + title + text`` is cut from its end so that it, the verbalizer
    and </s> fit ``max_encoder_tokens``; the question keeps its </s> when cut."""

    def __init__(self, tokenizer, prompt: PromptConfig = PromptConfig()):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.eos = tokenizer.eos_token_id
        self.head = self._ids([prompt.head])[0]
        self.verbalizer = self._ids([prompt.verbalizer])[0]
        self.passage_budget = prompt.max_encoder_tokens - len(self.verbalizer) - 1
        if self.passage_budget < len(self.head):
            raise UserError(f"prompt: max_encoder_tokens={prompt.max_encoder_tokens} leaves no room "
                             "for the passage after the head and verbalizer")

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def passage_ids(self, titles: Sequence[str], texts: Sequence[str]) -> list[list[int]]:
        """Title ids followed by text ids, no separator (what the corpus store keeps)."""
        return [title + text for title, text in zip(self._ids(titles), self._ids(texts))]

    def encoder_ids(self, titles: Sequence[str], texts: Sequence[str]) -> list[list[int]]:
        return self.encoder_ids_from_passages(self.passage_ids(titles, texts))

    def encoder_ids_from_passages(self, passages: Sequence[Sequence[int]]) -> list[list[int]]:
        return [(self.head + list(p))[:self.passage_budget] + self.verbalizer + [self.eos] for p in passages]

    def decoder_ids(self, questions: Sequence[str]) -> list[list[int]]:
        for i, q in enumerate(questions):
            if not q or not q.strip():
                raise UserError(f"question {i} is empty")
        budget = self.prompt.max_decoder_tokens - 1
        return [ids[:budget] + [self.eos] for ids in self._ids([self.prompt.question_prefix + q for q in questions])]
