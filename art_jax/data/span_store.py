"""The salient-span store: masked-salient-span examples (``data/salient_spans.py``) of a corpus
store's passages, made once by ``art-jax prepare-salient-spans`` and read memory-mapped by the
end-to-end methods (``data.salient_spans`` names one: ``methods/questions.py``).

A folder of ragged columns (``data/build.py``), one row per example, in passage order:

- ``query``: the masked sentence, UTF-8, each masked span ``PLACEHOLDER``;
- ``answers``: the masked spans, UTF-8, ``PLACEHOLDER`` between them;
- ``passage``: the corpus store row the sentence came from (one int64): training keeps that
  passage out of the example's top-K, else the reader would copy the span from its source;
- ``meta.json``: the corpus store (path, count, fingerprint: training refuses a span store of
  another corpus), the tagger (pipeline, version, labels), the masking and its seed, counts, and
  the tagging rate of one process.

Tagging is the slow part (spaCy's small English NER: about 60 Wikipedia-sized passages a second
on one CPU core, so days for the 21M passages of DPR's Wikipedia): the build splits it over the
processes of a job (``launch/local.sh`` or one per host), each tagging every P-th chunk, and a
killed build is taken up where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np

from art_jax.core import storage
from art_jax.core.distributed import is_lead
from art_jax.core.errors import UserError
from art_jax.core.progress import progress_bar
from art_jax.core.remote import local_copy
from art_jax.data.build import Build, Ragged, read_meta
from art_jax.data.corpus import CorpusStore, corpus_fingerprint
from art_jax.data.salient_spans import (
    DEFAULT_TAGGER,
    ENTITY_TOKEN_RATE,
    MASKINGS,
    PLACEHOLDER,
    SALIENT_LABELS,
    SpacyTagger,
    salient_examples,
)

SPAN_FORMAT = 1
KIND = "a salient-span store (no meta.json of one)"


def is_span_store(path: str) -> bool:
    """Whether the folder ``path`` holds a salient-span store (by its meta.json)."""
    meta = read_meta(path) or {}
    return meta.get("kind") == "salient_spans" and meta.get("format") == SPAN_FORMAT


class SpanStore:
    def __init__(self, path: str):
        self.path = path if storage.is_remote(path) else os.path.abspath(path)
        if not is_span_store(path):
            raise UserError(f"{path}: not a salient-span store (no meta.json of one); build one with "
                            "art-jax prepare-salient-spans")
        local = local_copy(path)
        with open(os.path.join(local, "meta.json")) as f:
            self.meta = json.load(f)
        self.queries = Ragged(local, "query", np.uint8)
        self.spans = Ragged(local, "answers", np.uint8)
        self.passages = Ragged(local, "passage", np.int64).data[:len(self.queries)]

    def __len__(self) -> int:
        return len(self.queries)

    def query(self, i: int) -> str:
        return self.queries.row(i).tobytes().decode("utf-8")

    def answers(self, i: int) -> tuple[str, ...]:
        return tuple(self.spans.row(i).tobytes().decode("utf-8").split(PLACEHOLDER))

    def passage(self, i: int) -> int:
        return int(self.passages[i])

    def check_corpus(self, store: CorpusStore, key: str) -> None:
        """The examples came from ``store``'s passages (their ``passage`` rows point into it)."""
        recorded = self.meta["corpus"]
        if len(store) != recorded["count"] or corpus_fingerprint(store) != recorded["fingerprint"]:
            raise UserError(f"{key}: {self.path} holds sentences of the corpus store {recorded['path']} "
                            f"({recorded['count']} passages), not of the run's {store.path} ({len(store)} "
                            "passages): the passage each came from could not be kept out of its top-K")


def prepare_salient_spans(corpus: str, out: str, *, tagger: str | None = None,
                          labels: Sequence[str] = SALIENT_LABELS, masking: str = "span",
                          rate: float = ENTITY_TOKEN_RATE, seed: int = 0, chunk_passages: int = 1000,
                          progress: bool = True) -> SpanStore:
    """Tag every passage of the corpus store ``corpus`` and write its masked-salient-span examples
    to a span store at ``out`` (a staged, resumable build of every process of the job: each tags
    its share of the chunks of ``chunk_passages`` passages). ``tagger``: a spaCy pipeline (default
    ``DEFAULT_TAGGER``) whose entities of ``labels`` are salient; ``masking``/``rate``: as
    ``salient_spans.mask_sentence``; the masks drawn per passage from ``seed``, so a build resumed
    or split otherwise writes the same store."""
    out = out.rstrip("/")
    if masking not in MASKINGS:
        raise UserError(f"--masking {masking!r} is not one of {', '.join(MASKINGS)}")
    if not 0 < rate <= 1:
        raise UserError(f"--mask-rate={rate} is not in (0, 1]")
    if chunk_passages < 1:
        raise UserError(f"--chunk-passages={chunk_passages} must be at least 1")
    storage.check_replaceable(out, KIND, is_span_store)
    store = CorpusStore(corpus)
    if not labels:
        raise UserError("--labels: give at least one entity label")
    tag = SpacyTagger(tagger or DEFAULT_TAGGER, labels)
    corpus_meta = {"path": store.path, "count": len(store), "fingerprint": corpus_fingerprint(store)}
    options = {"masking": masking, "rate": rate if masking == "entity-tokens" else None, "seed": seed}
    key = {"store": "salient_spans", "format": SPAN_FORMAT, "corpus": corpus_meta, "tagger": tag.description,
           **options, "chunk_passages": chunk_passages}
    clock = {"seconds": 0.0, "passages": 0}  # this process's tagging, for the rate it reports

    def tag_chunk(rows: range):
        start = time.perf_counter()
        # a placeholder in the text would read as a mask
        texts = [store.text(r).replace(PLACEHOLDER, " ") for r in rows]
        examples = [(row, example) for row, text, tagged in zip(rows, texts, tag(texts))
                    for example in salient_examples(text, tagged, masking=masking, rate=rate, dates="DATE" in labels,
                                                    rng=np.random.default_rng([seed, row]))]
        clock["seconds"] += time.perf_counter() - start
        clock["passages"] += len(rows)
        return examples

    with Build(out, "prepare_salient_spans", kind=KIND, is_kind=is_span_store, key=key) as build:
        writers = {name: build.writer(name, dtype) for name, dtype in
                   (("query", np.uint8), ("answers", np.uint8), ("passage", np.int64))}

        def write(examples) -> None:
            writers["query"].append([e.query.encode("utf-8") for _, e in examples])
            writers["answers"].append([PLACEHOLDER.join(e.answers).encode("utf-8") for _, e in examples])
            writers["passage"].append_flat(np.array([row for row, _ in examples], np.int64),
                                           np.ones(len(examples), np.int64))

        with progress_bar(total=len(store), unit="passage", desc="prepare-salient-spans",
                          disable=not progress) as bar:

            def chunks():
                for start in range(0, len(store), chunk_passages):
                    yield range(start, min(start + chunk_passages, len(store)))
                    bar.update(min(chunk_passages, len(store) - start))

            build.run(chunks(), tag_chunk, write)
        rate_here = clock["passages"] / clock["seconds"] if clock["seconds"] else None
        if build.finish():
            count = len(Ragged(build.staging, "query", np.uint8))
            meta = {"kind": "salient_spans", "format": SPAN_FORMAT, "corpus": corpus_meta, "tagger": tag.description,
                    **options, "examples": count, "processes": build.processes,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "passages_per_second_per_process": round(rate_here, 1) if rate_here else None}
            storage.write_text(os.path.join(build.staging, "meta.json"), json.dumps(meta, indent=1))
            build.publish("meta.json")
    if progress and is_lead() and rate_here:
        print(f"prepare-salient-spans: tagged {rate_here:.1f} passages/s per process")
    return SpanStore(out)
