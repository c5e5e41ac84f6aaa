"""File-level jobs around the teacher: score a JSONL of pairs, re-rank DPR results (UPR)."""

from __future__ import annotations

import json

import numpy as np

from art_jax.core.errors import UserError
from art_jax.core.fileio import read_json, read_jsonl
from art_jax.core.storage import write_text
from art_jax.teachers.t5 import T5Scorer


def score_pairs_file(scorer: T5Scorer, pairs_path: str, out_path: str, *, batch_size: int = 32,
                     progress: bool = True) -> np.ndarray:
    """``{"title","text","question"}`` per line -> ``{"score": s}`` per line, input order."""
    rows = list(read_jsonl(pairs_path, required=("title", "text", "question"), nonblank=("question",)))
    if not rows:
        raise UserError(f'{pairs_path}: no pairs (expected one {{"title", "text", "question"}} per line)')
    scores = scorer.score([r["title"] for r in rows], [r["text"] for r in rows], [r["question"] for r in rows],
                          batch_size=batch_size, progress=progress)
    write_text(out_path, "".join(json.dumps({"score": float(s)}) + "\n" for s in scores))
    return scores


def rerank_results_file(scorer: T5Scorer, results_path: str, out_path: str, *, batch_size: int = 32,
                        progress: bool = True) -> list[dict]:
    """DPR-format results with each question's ctxs re-ordered by teacher score (added to
    each ctx as ``teacher_score``; the retriever's ``score`` is kept)."""
    results = read_json(results_path)
    if not isinstance(results, list):
        raise UserError(f"{results_path}: expected a JSON list of DPR results")
    titles, texts, questions, where = [], [], [], []
    for qi, item in enumerate(results):
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not item["question"].strip():
            raise UserError(f"{results_path}: result {qi}: missing or empty 'question'")
        for ci, ctx in enumerate(item.get("ctxs", [])):
            if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
                raise UserError(f"{results_path}: result {qi}, ctx {ci}: missing 'text'")
            titles.append(ctx.get("title") or "")
            texts.append(ctx["text"])
            questions.append(item["question"])
            where.append((qi, ci))
    if not where:
        raise UserError(f"{results_path}: no ctxs to re-rank")
    scores = scorer.score(titles, texts, questions, batch_size=batch_size, progress=progress)
    for (qi, ci), s in zip(where, scores):
        results[qi]["ctxs"][ci]["teacher_score"] = float(s)
    for item in results:
        item["ctxs"] = sorted(item.get("ctxs", []), key=lambda c: -c["teacher_score"])
    write_text(out_path, json.dumps(results, indent=1, ensure_ascii=False))
    return results
