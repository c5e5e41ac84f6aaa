"""`art-jax search`: a question file -> DPR-format results JSON or a TREC run, top-k accuracy printed."""

from __future__ import annotations

import json

import jax

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.data.corpus import CorpusStore
from art_jax.data.questions import Question
from art_jax.retrieval.encoder import DualEncoder
from art_jax.retrieval.index import IndexVersion
from art_jax.retrieval.results import check_qids, dpr_results, retrieve, trec_run_text
from art_jax.retrieval.search import ShardedIndex

FORMATS = ("dpr", "trec")


def search_file(encoder: DualEncoder, version: IndexVersion, index: ShardedIndex, store: CorpusStore,
                questions: list[Question], out: str, k: int, *, batch_size: int = 64, match: str = "string",
                progress: bool = True, fmt: str = "dpr") -> dict[int, float] | None:
    """Every process searches (the index spans all of them); process 0 writes ``out``: DPR-format
    results (``fmt="dpr"``) or a TREC run (``"trec"``). Returns top-k accuracy; for a TREC run
    only when some question has answers (else None)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown results format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "trec":
        check_qids(questions)  # before the search, not after it
    dim = encoder.question.config.embedding_dim
    if dim != version.dim:  # else the first batch fails deep inside the search's matmul
        raise UserError(f"--index {version.path} holds {version.dim}-dimensional embeddings, but the retriever's "
                        f"question tower gives {dim}; search with the retriever the index was embedded with")
    scores, rows = retrieve(encoder, index, questions, k, batch_size=batch_size, progress=progress)
    if fmt == "trec":
        text = trec_run_text(questions, scores, rows, store, version.ids)
        answered = any(q.answers for q in questions)
        accuracy = dpr_results(questions, scores, rows, store, version.ids, match)[0] if answered else None
    else:
        accuracy, results = dpr_results(questions, scores, rows, store, version.ids, match)
        text = json.dumps(results, indent=1, ensure_ascii=False) + "\n"
    if jax.process_index() == 0:
        storage.write_text(out, text)
    return accuracy
