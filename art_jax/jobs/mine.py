"""`art-jax mine`: DPR training data by distant supervision, from BM25 or the project's dense index.

For each question the top-``depth`` passages are retrieved; the positive is the highest-ranked
one whose text holds an answer (DPR's has_answer, string or regex match), the hard negatives
the highest-ranked ones whose text holds none (at most ``hard_negatives``); a question without
a positive is counted and left out. The output is DPR's training JSON (biencoder-nq-train.json):
``[{"question","answers","positive_ctxs":[ctx],"negative_ctxs":[],"hard_negative_ctxs":[ctx...]}]``
with ``ctx = {"title","text","score","passage_id"}``, written whole or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.progress import progress_bar
from art_jax.data.build import Ragged, RaggedWriter
from art_jax.data.questions import Question
from art_jax.evaluation.answers import has_answer
from art_jax.retrieval.results import qid_of

METHODS = ("bm25", "dense")


def check_options(*, method: str, retriever: str | None, index: str | None, bm25_index: str | None,
                  depth: int, hard_negatives: int) -> None:
    """Refuse, before any work, options that cannot go together."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if depth < 1:
        raise UserError(f"--depth must be at least 1, got {depth}")
    if hard_negatives < 0:
        raise UserError(f"--hard-negatives must be 0 or more, got {hard_negatives}")
    if method == "dense":
        missing = [flag for flag, value in (("--retriever", retriever), ("--index", index)) if not value]
        if missing:
            raise UserError(f"--method dense needs {' and '.join(missing)} (the retriever and the index "
                            "art-jax embed built with it)")
        if bm25_index:
            raise UserError("--bm25-index is for --method bm25")
    else:
        given = [flag for flag, value in (("--retriever", retriever), ("--index", index)) if value]
        if given:
            raise UserError(f"{' and '.join(given)}: for --method dense only (this is --method bm25)")
        if jax.process_count() > 1:
            raise UserError("--method bm25 runs on the CPU of one process; run it as a single process, "
                            "without a multi-process launcher")


@dataclasses.dataclass(frozen=True)
class MineStats:
    questions: int
    mined: int
    hard_negatives: int  # over all mined questions
    depth: int  # passages retrieved per question (--depth, at most the corpus)

    @property
    def without_positive(self) -> int:
        return self.questions - self.mined

    @property
    def mean_hard_negatives(self) -> float:
        return self.hard_negatives / self.mined if self.mined else 0.0

    def summary(self, out: str) -> str:
        return (f"wrote {out}: mined {self.mined} of {self.questions} questions ({self.without_positive} without an "
                f"answer in their top-{self.depth} left out), {self.mean_hard_negatives:.2f} hard negatives per "
                "mined question")


def passage_id(value) -> str:
    """A passage id as DPR writes it: a string."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    return str(value)


# ---------------------------------------------------------------- corpora

class StoreCorpus:
    """Passages of a corpus store (art-jax prepare-corpus), row by row."""

    def __init__(self, store):
        self.store = store
        self.label = store.path
        self.count = len(store)

    def passage(self, row: int) -> tuple[str, str, str]:
        """(passage id, title, text) of ``row``."""
        store = self.store
        # a string-id store keeps its ids as strings (its ids array holds their fingerprints)
        pid = store.passage_id(row) if hasattr(store, "passage_id") else store.ids[row]
        return passage_id(pid), store.title(row), store.text(row)

    def docs(self) -> Iterator[tuple[str, str]]:
        for row in range(self.count):
            yield self.store.title(row), self.store.text(row)

    def fingerprint(self) -> str:
        from art_jax.retrieval.bm25 import content_fingerprint

        titles, texts = self.store.titles, self.store.texts
        return content_fingerprint(titles.data, titles.offsets, texts.data, texts.offsets)


class FileCorpus:
    """Passages of an evidence TSV/JSONL, parsed once into a scratch folder (ids, titles and
    texts as flat UTF-8 arrays) for the passes and lookups that follow."""

    def __init__(self, path: str, scratch: str, *, progress: bool = True):
        from art_jax.core.fileio import local_file
        from art_jax.data.corpus import iter_passages

        self.label = path
        local = local_file(path)
        columns = {name: RaggedWriter(scratch, name, np.uint8) for name in ("id", "title", "text")}
        with progress_bar(total=os.path.getsize(local), unit="B", unit_scale=True, desc="read corpus",
                          disable=not progress) as bar:
            batch = []
            for passage in iter_passages(local):
                batch.append(passage)
                if len(batch) == 8192:
                    self._append(columns, batch)
                    bar.update(batch[-1].end - bar.n)
                    batch = []
            if batch:
                self._append(columns, batch)
                bar.update(batch[-1].end - bar.n)
        for column in columns.values():
            column.close()
        self.ids, self.titles, self.texts = (Ragged(scratch, name, np.uint8) for name in ("id", "title", "text"))
        self.count = len(self.ids)

    @staticmethod
    def _append(columns: dict[str, RaggedWriter], batch) -> None:
        columns["id"].append([passage_id(p.id).encode("utf-8") for p in batch])
        columns["title"].append([p.title.encode("utf-8") for p in batch])
        columns["text"].append([p.text.encode("utf-8") for p in batch])

    def passage(self, row: int) -> tuple[str, str, str]:
        return tuple(column.row(row).tobytes().decode("utf-8") for column in (self.ids, self.titles, self.texts))

    def docs(self) -> Iterator[tuple[str, str]]:
        for row in range(self.count):
            yield self.passage(row)[1:]

    def fingerprint(self) -> str:
        from art_jax.retrieval.bm25 import content_fingerprint

        return content_fingerprint(self.titles.data, self.titles.offsets, self.texts.data, self.texts.offsets)


def open_corpus(path: str, scratch: str, *, progress: bool = True) -> StoreCorpus | FileCorpus:
    """A corpus store folder, or an evidence TSV/JSONL (parsed into ``scratch``)."""
    from art_jax.data.corpus import CorpusStore, is_corpus_store

    if storage.isdir(path):
        if not is_corpus_store(path):
            raise UserError(f"--corpus {path}: a folder, but not a corpus store (no meta.json of one); give a store "
                            "from art-jax prepare-corpus or an evidence TSV/JSONL")
        return StoreCorpus(CorpusStore(path))
    return FileCorpus(path, scratch, progress=progress)


def dense_store(path: str, version):
    """The corpus store of a dense mining run: a store (not an evidence file) matching the index."""
    from art_jax.data.corpus import is_corpus_store
    from art_jax.retrieval.results import open_corpus_for

    if not storage.exists(path):
        raise UserError(f"--corpus {path}: not found")
    if not storage.isdir(path) or not is_corpus_store(path):
        raise UserError(f"--corpus {path}: --method dense needs a corpus store (the one art-jax embed indexed, from "
                        "art-jax prepare-corpus), not an evidence file")
    return open_corpus_for(version, path)


# ---------------------------------------------------------------- distant supervision

def distant_supervision(questions: Sequence[Question], rankings: Sequence[tuple[Sequence[int], Sequence[float]]],
                        corpus, *, hard_negatives: int = 1, match: str = "string", depth: int = 0,
                        progress: bool = True) -> tuple[list[dict], MineStats]:
    """DPR training items from each question's ranked (rows, scores), best first; ``corpus.passage(row)``
    gives (passage id, title, text). Answers are looked for in the text only, as DPR does."""
    items, negatives_total = [], 0
    with progress_bar(total=len(questions), unit="question", desc="mine", disable=not progress) as bar:
        for question, (rows, scores) in zip(questions, rankings, strict=True):
            positive, negatives = None, []
            for row, score in zip(rows, scores):
                if positive is not None and len(negatives) >= hard_negatives:
                    break
                pid, title, text = corpus.passage(int(row))
                ctx = {"title": title, "text": text, "score": float(score), "passage_id": pid}
                if has_answer(question.answers, text, match):
                    if positive is None:
                        positive = ctx
                elif len(negatives) < hard_negatives:
                    negatives.append(ctx)
            bar.update(1)
            if positive is None:
                continue
            negatives_total += len(negatives)
            items.append({"question": question.question, "answers": list(question.answers),
                          "positive_ctxs": [positive], "negative_ctxs": [], "hard_negative_ctxs": negatives})
    return items, MineStats(len(questions), len(items), negatives_total, depth)


def _write(out: str, items: list[dict]) -> None:
    storage.write_text(out, json.dumps(items, indent=1, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def _bm25_rankings(corpus_path: str, questions: Sequence[Question], depth: int, *, bm25_index: str | None = None,
                   threads: int | None = None, progress: bool = True, **build_options):
    """(corpus, each question's BM25 (rows, scores) best first, the depth searched) over
    ``corpus_path`` (a store or an evidence file). With ``bm25_index`` the index is kept in that
    folder, or reused from it when it was built for this corpus; else it is built in a scratch
    folder and dropped."""
    from art_jax.retrieval import bm25

    scratch = tempfile.mkdtemp(prefix="art_jax-mine-")
    try:
        corpus = open_corpus(corpus_path, scratch, progress=progress)
        if corpus.count == 0:
            raise UserError(f"--corpus {corpus_path}: no passages")
        folder = bm25_index or os.path.join(scratch, "bm25")
        index = bm25.open_or_build(folder, corpus.docs, count=corpus.count, fingerprint=corpus.fingerprint,
                                   corpus=corpus.label, progress=progress, **build_options)
        depth = min(depth, corpus.count)
        rankings = index.search([q.question for q in questions], depth, threads=threads, progress=progress)
        del index  # its memory maps, before the scratch folder goes
        yield corpus, rankings, depth
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def mine_bm25(corpus_path: str, questions: Sequence[Question], out: str, *, depth: int = 100,
              hard_negatives: int = 1, match: str = "string", bm25_index: str | None = None,
              threads: int | None = None, progress: bool = True, **build_options) -> MineStats:
    """BM25 distant supervision over ``corpus_path`` (see ``_bm25_rankings``)."""
    with _bm25_rankings(corpus_path, questions, depth, bm25_index=bm25_index, threads=threads, progress=progress,
                        **build_options) as (corpus, rankings, depth):
        items, stats = distant_supervision(questions, rankings, corpus, hard_negatives=hard_negatives, match=match,
                                           depth=depth, progress=progress)
    _write(out, items)
    return stats


def bm25_results(corpus_path: str, questions: Sequence[Question], out: str, *, depth: int = 100,
                 progress: bool = True) -> None:
    """BM25's top ``depth`` passages of each question as DPR-format results, what `art-jax search`
    writes (the FiD demo reads them)."""
    with _bm25_rankings(corpus_path, questions, depth, progress=progress) as (corpus, rankings, _):
        results = []
        for position, (question, (rows, scores)) in enumerate(zip(questions, rankings, strict=True)):
            ctxs = [dict(zip(("id", "title", "text"), corpus.passage(int(row))), score=float(score))
                    for row, score in zip(rows, scores)]
            results.append({"qid": qid_of(question, position), "question": question.question,
                            "answers": list(question.answers), "ctxs": ctxs})
    _write(out, results)


def mine_dense(encoder, version, index, store, questions: Sequence[Question], out: str, *, depth: int = 100,
               hard_negatives: int = 1, match: str = "string", batch_size: int = 64,
               progress: bool = True) -> MineStats | None:
    """Dense distant supervision: exact top-``depth`` over the sharded index, as `art-jax search`
    retrieves. Every process searches (the index spans all of them); process 0 mines and
    writes ``out`` and returns the stats (the others None)."""
    from art_jax.retrieval.results import retrieve

    dim = encoder.question.config.embedding_dim
    if dim != version.dim:
        raise UserError(f"--index {version.path} holds {version.dim}-dimensional embeddings, but the retriever's "
                        f"question tower gives {dim}; mine with the retriever the index was embedded with")
    depth = min(depth, version.count)
    scores, rows = retrieve(encoder, index, list(questions), depth, batch_size=batch_size, progress=progress)
    if jax.process_index() != 0:
        return None
    items, stats = distant_supervision(questions, list(zip(rows, scores)), StoreCorpus(store),
                                       hard_negatives=hard_negatives, match=match, depth=depth, progress=progress)
    _write(out, items)
    return stats
