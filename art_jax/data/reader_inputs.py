"""Fusion-in-Decoder reader inputs: each retrieved passage formatted with its question by a
template, tokenized and cut to N tokens; and the answer targets.

A template is a ``str.format`` string of ``{question}``, ``{title}`` and ``{text}``. Presets:
``fid``, FiD's ``question: q title: t context: text`` (facebookresearch/FiD src/data.py: its
prefixes joined to the fields by a space; T5's SentencePiece vocabulary), and
``emdr2``, EMDR2's ``[CLS] q [SEP] t [SEP] text [SEP]`` (a T5 with BERT's vocabulary). A
template that spells out some of the tokenizer's special tokens, as ``emdr2`` does, gets no
others; any other gets the tokenizer's own (T5: a closing ``</s>``).
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from art_jax.core.batching import pad_rows
from art_jax.core.errors import UserError

FORMATS = {
    "fid": "question: {question} title: {title} context: {text}",
    "emdr2": "[CLS] {question} [SEP] {title} [SEP] {text} [SEP]",
}
FIELDS = ("question", "title", "text")


def resolve_format(name_or_template: str, key: str) -> str:
    """The template a preset name stands for, or ``name_or_template`` itself once checked: it must
    use ``{question}`` and no field but ``{question}``, ``{title}``, ``{text}``. ``key`` (the flag or
    config key it came from) names it in the error."""
    if name_or_template in FORMATS:
        return FORMATS[name_or_template]
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(name_or_template) if field is not None}
    except ValueError as err:  # an unmatched brace
        raise UserError(f"{key}: cannot read the template {name_or_template!r} ({err})") from None
    unknown = sorted(fields - set(FIELDS))
    if unknown:
        raise UserError(f"{key}: unknown field(s) {', '.join('{' + f + '}' for f in unknown)} in "
                        f"{name_or_template!r}; a template may use {{question}}, {{title}}, {{text}}")
    if "question" not in fields:
        raise UserError(f"{key}: {name_or_template!r} is neither a preset ({', '.join(FORMATS)}) nor a template "
                        "with {question}")
    try:  # conversions, format specs and indexing ({question!x}, {title:d}, {text[0]}) fail only when used
        name_or_template.format(**{field: "x" for field in FIELDS})
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as err:
        raise UserError(f"{key}: the template {name_or_template!r} cannot be filled with text ({err!r}); "
                        "use plain {question}, {title}, {text}") from None
    return name_or_template


def _cut(ids: list[int], length: int, specials: set[int]) -> list[int]:
    """The first ``length`` ids, a closing special token (</s>, the template's [SEP]) kept last: what
    Hugging Face's truncation does to the tokens it adds itself."""
    if len(ids) <= length:
        return ids
    return ids[:length - 1] + ids[-1:] if ids[-1] in specials else ids[:length]


def encode_reader_batch(tokenizer, questions: Sequence[str], passages: Sequence[Sequence[tuple[str, str]]],
                        template: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids and 0/1 mask [B, K, N] (N = ``max_length``) of B questions, each with its K
    ``(title, text)`` passages: FiD's encoding, each formatted input tokenized on its own, cut to N
    tokens keeping its closing special token, padded with the pad id. One tokenizer call for all."""
    for i, question in enumerate(questions):
        if not question or not question.strip():
            raise UserError(f"question {i} is empty")
    k = len(passages[0]) if passages else 0
    for i, retrieved in enumerate(passages):
        if len(retrieved) != k or not k:
            raise UserError(f"question {i} has {len(retrieved)} passages; the reader reads the same K > 0 for each")
    texts = [template.format(question=q, title=title, text=text) for q, retrieved in zip(questions, passages)
             for title, text in retrieved]
    spelled_out = any(token in template for token in tokenizer.all_special_tokens)
    rows = tokenizer(texts, add_special_tokens=not spelled_out, verbose=False)["input_ids"]
    specials = set(tokenizer.all_special_ids)
    ids, mask = pad_rows([_cut(row, max_length, specials) for row in rows], max_length, tokenizer.pad_token_id)
    return ids.reshape(len(questions), k, max_length), mask.reshape(len(questions), k, max_length)


def encode_reader_inputs(tokenizer, question: str, passages: Sequence[tuple[str, str]], template: str,
                         max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """One question's [K, N] ids and mask, as ``encode_reader_batch``."""
    ids, mask = encode_reader_batch(tokenizer, [question], [passages], template, max_length)
    return ids[0], mask[0]


def fill_from_article(text: str, following: Iterable[str], min_words: int) -> str:
    """EMDR2's longer passages: ``text`` followed by the texts of the next passages of its article
    (``following``, read lazily) until it has ``min_words`` words. Give N: every word is at least
    one token, so the input then fills its N tokens and the cut drops the excess."""
    parts, words = [text], len(text.split())
    for more in following:
        if words >= min_words:
            break
        parts.append(more)
        words += len(more.split())
    return " ".join(parts)


def article_continuation(store, row: int) -> Iterator[str]:
    """Texts of the passages after ``row`` of a ``CorpusStore`` in the same article: the next rows
    while the title is the same and, in an integer-id store, each id is one more than the last."""
    title, passage_id = store.title(row), store.passage_id(row)
    for after in range(row + 1, len(store)):
        next_id = store.passage_id(after)
        if store.title(after) != title or (store.id_kind == "int" and next_id != passage_id + 1):
            return
        yield store.text(after)
        passage_id = next_id


def encode_answers(tokenizer, answers: Sequence[str], max_answer_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoder targets: int32 labels and 0/1 mask [B, T] (T = ``max_answer_tokens``), each answer's
    tokens then the eos (cut to T tokens, the eos kept), padded with 0. The eos: the tokenizer's,
    else its [SEP] (a T5 with BERT's vocabulary, as EMDR2's)."""
    eos = tokenizer.sep_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    if eos is None:
        raise UserError("the reader's tokenizer has no eos (nor [SEP]) token to end its answers with")
    rows = tokenizer(list(answers), add_special_tokens=False, verbose=False)["input_ids"]
    return pad_rows([row[:max_answer_tokens - 1] + [eos] for row in rows], max_answer_tokens, 0)


def sample_answer(answers: Sequence[str], rng: np.random.Generator) -> str:
    """One of the gold answers, uniformly, as FiD trains on one per example each epoch."""
    if not answers:
        raise UserError("an example without gold answers cannot train the reader")
    return answers[int(rng.integers(len(answers)))]
