"""Retrieval metrics against relevance judgements (qrels), computed with ir-measures.

Qrels: a TREC qrels file (``qid iteration docid relevance``, whitespace separated) or BEIR's
``qrels/*.tsv`` (header ``query-id corpus-id score``, tab separated). Runs: a TREC run
(``qid Q0 docid rank score tag``) or DPR-format results JSON (each result's ``qid``, its
ctxs' ``id`` and ``score``).

A run is evaluated in trec_eval's order: score descending, ties broken by docid descending
(strcmp); ``format_trec_run`` writes its ranks in that order, so the written ranks are the
evaluated ones. Every provider ir-measures picks (its RR@k comes from MS MARCO's code, which
breaks ties the other way) is given that order as distinct scores. The mean is over every
query of the qrels: a query the run lacks counts 0 (``trec_eval -c``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.fileio import local_file, read_json, text_lines

# qid -> docid -> relevance, and qid -> docid -> score
Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

DEFAULT_METRICS = ("nDCG@10", "RR@10", "R@100")
BEIR_HEADER = ["query-id", "corpus-id", "score"]
RUN_TAG = "art_jax"
# a score as trec_eval reads one (atof), finite
_NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
_INTEGER = re.compile(r"[-+]?[0-9]+")
_MAX_CUTOFF = (1 << 31) - 1


# ---------------------------------------------------------------- metrics

def parse_metrics(names: Iterable) -> list:
    """ir-measures measures of ``names`` (``nDCG@10``, ``RR@10``, ``R@100``, ``P@5``, ``AP``, ...;
    parsed measures pass through), each once; a name it cannot parse or compute is a UserError."""
    import ir_measures

    measures = {}
    for name in names:
        try:
            measure = ir_measures.parse_measure(name)
        except (ValueError, NameError, AssertionError, TypeError) as err:
            raise UserError(f"unknown metric {name!r} ({err}); expected ir-measures names such as "
                            f"{' '.join(DEFAULT_METRICS)} P@5 AP") from None
        cutoff = measure.params.get("cutoff")
        if isinstance(cutoff, int) and not 1 <= cutoff <= _MAX_CUTOFF:
            raise UserError(f"metric {name!r}: the cutoff must be between 1 and {_MAX_CUTOFF}")
        if not ir_measures.DefaultPipeline.supports(measure):
            raise UserError(f"metric {name!r}: no installed ir-measures provider computes it")
        measures.setdefault(str(measure), measure)
    if not measures:
        raise UserError("no metrics to compute")
    return list(measures.values())


def trec_order(docs: dict[str, float]) -> list[str]:
    """The docids of one query's run in trec_eval's order: score descending, then docid descending."""
    return sorted(docs, key=lambda doc: (docs[doc], doc), reverse=True)


def per_query(qrels: Qrels, run: Run, metrics: Iterable) -> dict[str, dict[str, float]]:
    """metric name -> qid -> value, for every query of ``qrels`` (0 where the run has none of it).
    ``metrics``: names or parsed measures."""
    import ir_measures

    measures = parse_metrics(metrics)
    # trec_eval's order as distinct scores, the best highest: every provider ranks the same
    ranked = {}
    for qid, docs in run.items():
        if qid in qrels and docs:
            order = trec_order(docs)
            ranked[qid] = {doc: float(len(order) - i) for i, doc in enumerate(order)}
    values = {str(m): dict.fromkeys(qrels, 0.0) for m in measures}
    if ranked:
        for metric in ir_measures.iter_calc(measures, qrels, ranked):
            if metric.query_id in qrels:
                values[str(metric.measure)][metric.query_id] = float(metric.value)
    return values


def evaluate_run(qrels: Qrels, run: Run, metrics: Iterable) -> dict[str, float]:
    """Each metric's mean over every query of ``qrels``, keyed by its ir-measures name."""
    if not qrels:
        raise UserError("no relevance judgements to evaluate against")
    return {name: math.fsum(by_query.values()) / len(qrels) for name, by_query in per_query(qrels, run, metrics).items()}


def evaluate_qrels_file(results_path: str, qrels_path: str, metrics: Sequence[str] = DEFAULT_METRICS,
                        json_out: str | None = None) -> dict[str, Any]:
    """Evaluate a run file (TREC or DPR-format JSON) against a qrels file; with ``json_out``
    write ``{metric: value}`` there. Returns the values and the query counts."""
    measures = parse_metrics(metrics)  # a bad name fails before any file is read
    qrels = read_qrels(qrels_path)
    run = read_run(results_path)
    values = evaluate_run(qrels, run, measures)
    if json_out:
        storage.write_text(json_out, json.dumps(values, indent=1) + "\n")
    return {"queries": len(qrels), "unretrieved": sum(1 for q in qrels if not run.get(q)), "metrics": values}


def format_values(values: dict[str, float]) -> str:
    """Metrics as a table: a header, a rule, one row each (values as fractions, 4 places)."""
    rows = [("metric", "value")] + [(name, f"{value:.4f}") for name, value in values.items()]
    left, right = (max(len(r[i]) for r in rows) for i in (0, 1))
    lines = [f"{a:<{left}} | {b:>{right}}" for a, b in rows]
    lines.insert(1, f"{'-' * left}-+-{'-' * right}")
    return "\n".join(lines)


# ---------------------------------------------------------------- qrels

def read_qrels(path: str) -> Qrels:
    """A TREC qrels file or BEIR's qrels TSV; a bad line is one UserError naming file and line."""
    local = local_file(path)
    qrels: Qrels = {}
    beir = None
    for number, line in text_lines(local):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if beir is None:  # the first line says which: BEIR's has a header
            beir = line.split() == BEIR_HEADER
            if beir:
                continue
        if beir:
            fields = [f.strip() for f in line.split("\t")]
            if len(fields) != 3:
                raise UserError(f"{where}: expected 3 tab-separated fields (query-id, corpus-id, score) as in the "
                                f"header, found {len(fields)}")
            qid, docid, relevance = fields
        else:
            fields = line.split()
            if len(fields) != 4:
                raise UserError(f"{where}: expected 4 whitespace-separated fields (query id, iteration, document "
                                f"id, relevance), found {len(fields)}")
            qid, _, docid, relevance = fields
        if not qid or not docid:
            raise UserError(f"{where}: empty query or document id")
        if not _INTEGER.fullmatch(relevance):
            raise UserError(f"{where}: relevance {relevance!r} is not an integer")
        docs = qrels.setdefault(qid, {})
        if docid in docs:
            raise UserError(f"{where}: query {qid} judges document {docid} a second time")
        docs[docid] = int(relevance)
    if not qrels:
        raise UserError(f"{path}: no relevance judgements (expected TREC qrels lines 'qid 0 docid relevance' "
                        f"or BEIR's TSV with the header {' '.join(BEIR_HEADER)})")
    return qrels


# ---------------------------------------------------------------- runs

def read_run(path: str) -> Run:
    """A TREC run, or DPR-format results JSON (a file starting with ``[``)."""
    local = local_file(path)
    first = next((line.lstrip()[0] for _, line in text_lines(local) if line.strip()), "")
    return _read_dpr_run(path) if first == "[" else _read_trec_run(path, local)


def _read_trec_run(path: str, local: str) -> Run:
    run: Run = {}
    for number, line in text_lines(local):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = line.split()
        if len(fields) != 6:
            raise UserError(f"{where}: expected 6 whitespace-separated fields (qid Q0 docid rank score tag), "
                            f"found {len(fields)}")
        qid, _, docid, rank, score, _ = fields
        if not _INTEGER.fullmatch(rank):
            raise UserError(f"{where}: rank {rank!r} is not an integer")
        if not _NUMBER.fullmatch(score):
            raise UserError(f"{where}: score {score!r} is not a finite number")
        docs = run.setdefault(qid, {})
        if docid in docs:
            raise UserError(f"{where}: query {qid} ranks document {docid} a second time")
        docs[docid] = float(score)
    if not run:
        raise UserError(f"{path}: no results (expected TREC run lines 'qid Q0 docid rank score tag' or "
                        "DPR-format results JSON)")
    return run


def _read_dpr_run(path: str) -> Run:
    items = read_json(path)
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected a non-empty JSON list of DPR-format results")
    run: Run = {}
    for i, item in enumerate(items):
        where = f"{path}: result {i}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object")
        if "qid" not in item:
            raise UserError(f"{where}: no 'qid' to match the qrels by (art-jax search writes one per question)")
        qid = _name(item["qid"], f"{where}: 'qid'")
        if qid in run:
            raise UserError(f"{where}: qid {qid!r} a second time")
        ctxs = item.get("ctxs")
        if not isinstance(ctxs, list):
            raise UserError(f"{where}: 'ctxs' must be a list")
        docs = run[qid] = {}
        for j, ctx in enumerate(ctxs):
            if not isinstance(ctx, dict):
                raise UserError(f"{where}, ctx {j}: expected a JSON object")
            docid = _name(ctx.get("id"), f"{where}, ctx {j}: 'id'")
            score = ctx.get("score")
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise UserError(f"{where}, ctx {j}: 'score' must be a finite number, got {score!r}")
            if docid in docs:
                raise UserError(f"{where}, ctx {j}: id {docid!r} a second time")
            docs[docid] = float(score)
    return run


def _name(value: Any, where: str) -> str:
    """A query or document id: a non-empty string, or an integer as its decimal string."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise UserError(f"{where} must be a non-empty string or an integer, got {value!r}")
    return str(value)


def format_trec_run(run: Run, tag: str = RUN_TAG) -> str:
    """``qid Q0 docid rank score tag`` lines, each query's ranks in trec_eval's order; scores as
    Python writes floats (shortest round trip, so equal scores stay equal)."""
    lines = []
    for qid, docs in run.items():
        _check_field(qid, "query id")
        for rank, doc in enumerate(trec_order(docs), 1):
            _check_field(doc, "document id")
            lines.append(f"{qid} Q0 {doc} {rank} {float(docs[doc])!r} {tag}\n")
    return "".join(lines)


def _check_field(value: str, what: str) -> None:
    if not value or any(c.isspace() for c in value):
        raise UserError(f"{what} {value!r} cannot be written in a TREC run (fields are whitespace-separated)")
