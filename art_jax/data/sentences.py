"""Sentence splitting with spaCy's rule-based sentencizer: no model to download, so it runs
offline; the masked-salient-span pre-training uses spaCy too."""

from __future__ import annotations

import functools


@functools.cache
def _pipeline():
    import spacy  # lazy: only ICT (and MSS) split sentences

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


def split_sentences(texts: list[str]) -> list[list[str]]:
    """Each text's sentences, stripped, empty ones dropped (a text without any gives [text])."""
    out = []
    for doc, text in zip(_pipeline().pipe(texts), texts):
        sentences = [s.text.strip() for s in doc.sents if s.text.strip()]
        out.append(sentences or [text])
    return out
