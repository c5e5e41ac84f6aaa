"""Questions -> question tower -> exact top-K over the sharded index -> DPR-format results
``[{"qid","question","answers","ctxs":[{"id","title","text","score","has_answer"}]}]`` and top-k
accuracy (`art-jax search` and the trainer's evaluation alike), or a TREC run."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.progress import progress_bar
from art_jax.data.corpus import CorpusStore
from art_jax.data.questions import Question
from art_jax.evaluation.answers import evaluate_results
from art_jax.evaluation.qrels import Run, format_trec_run
from art_jax.retrieval.encoder import DualEncoder
from art_jax.retrieval.index import IndexVersion
from art_jax.retrieval.search import ShardedIndex


def open_corpus_for(version: IndexVersion, corpus: str | None) -> CorpusStore:
    """The corpus store an index was built from (or ``corpus``), checked to match it."""
    path = corpus or version.meta["corpus"]
    if not storage.isdir(path):
        raise UserError(f"{version.path}: its corpus store {path} is missing; pass --corpus")
    store = CorpusStore(path)
    if len(store) != version.count or not np.array_equal(store.ids[:1000], version.ids[:1000]):
        raise UserError(f"{path}: this corpus store does not match index {version.path} "
                        f"({len(store)} vs {version.count} passages)")
    return store


SEARCH_BATCH = 64  # questions embedded and searched together


def retrieve(encoder: DualEncoder, index: ShardedIndex, questions: list[Question], k: int, *,
             batch_size: int = SEARCH_BATCH, progress: bool = True, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and index rows [Q, k] of each question's top-k passages; ``exclude`` [Q] or
    [Q, E]: index rows kept out of each question's (``ShardedIndex.search``)."""
    scores, rows = [], []
    with progress_bar(total=len(questions), unit="question", desc="search", disable=not progress) as bar:
        for start in range(0, len(questions), batch_size):
            batch = [q.question for q in questions[start:start + batch_size]]
            excluded = None if exclude is None else exclude[start:start + batch_size]
            s, r = index.search(np.asarray(encoder.embed_questions(batch)), k, excluded)
            scores.append(s)
            rows.append(r)
            bar.update(len(batch))
    return np.concatenate(scores), np.concatenate(rows)


def qid_of(question: Question, position: int) -> str:
    """A question's qid: the one read with it, else its 1-based position."""
    return question.qid if question.qid is not None else str(position + 1)


def passage_id_of(store: CorpusStore, ids, row) -> str:
    """Row ``row``'s passage id as results and runs write it: ``ids[row]`` (the index's ids) in an
    integer-id store; a string-id store's own string (its ``ids`` are fingerprints)."""
    if getattr(store, "id_kind", "int") == "str":
        return store.passage_id(int(row))
    return str(int(ids[row]))


def dpr_results(questions: list[Question], scores: np.ndarray, rows: np.ndarray, store: CorpusStore, ids,
                match: str = "string", ks: Iterable[int] | None = None,
                excluded: int = 0) -> tuple[dict[int, float], list[dict]]:
    """DPR-format results with has_answer computed from each passage's text, and top-k
    accuracy keyed by int k in the order of ``ks`` (default: ``report_ks`` of the retrieved
    depth K, e.g. 1, 5, 10 for K=10). A k past K is refused, unless K is the whole store but the
    ``excluded`` rows kept out of each question's: then it is exactly top-K (a small dev corpus
    under ``train.eval_topk``)."""
    results = [{
        "qid": qid_of(q, i), "question": q.question, "answers": list(q.answers),
        "ctxs": [{"id": passage_id_of(store, ids, r), "title": store.title(r), "text": store.text(r),
                  "score": float(s)} for s, r in zip(q_scores, q_rows)],
    } for i, (q, q_scores, q_rows) in enumerate(zip(questions, scores, rows))]
    return evaluate_results(results, match, ks, source="search results", exhaustive=rows.shape[1] + excluded >= len(store))


def check_qids(questions: list[Question]) -> list[str]:
    """The questions' qids, checked to name each question once and fit a TREC run."""
    qids, seen = [qid_of(q, i) for i, q in enumerate(questions)], set()
    for qid in qids:
        if qid in seen:
            raise UserError(f"two questions have the qid {qid!r}; a run names each question by its qid")
        if any(c.isspace() for c in qid):
            raise UserError(f"qid {qid!r} cannot be written in a TREC run (fields are whitespace-separated)")
        seen.add(qid)
    return qids


def trec_run(questions: list[Question], scores: np.ndarray, rows: np.ndarray, store: CorpusStore, ids) -> Run:
    """qid -> passage id -> score of each question's retrieved passages."""
    return {qid: {passage_id_of(store, ids, r): float(s) for s, r in zip(q_scores, q_rows)}
            for qid, q_scores, q_rows in zip(check_qids(questions), scores, rows)}


def trec_run_text(questions: list[Question], scores: np.ndarray, rows: np.ndarray, store: CorpusStore, ids) -> str:
    """The TREC run ``qid Q0 docid rank score art_jax``, ranks in trec_eval's order."""
    return format_trec_run(trec_run(questions, scores, rows, store, ids))
