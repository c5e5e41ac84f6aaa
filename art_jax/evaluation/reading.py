"""Reading accuracy of generated answers: exact match (EM) and token F1 against the gold answers.

The normalisation is SQuAD v1.1's official evaluate script's, which DPR's ``exact_match_score``
copies: lower-case, drop ``string.punctuation``, drop the articles a/an/the as whole words, collapse
whitespace. ``nfd`` first decomposes the text (NFD), as EMDR2's evaluation does. Each question
scores its best gold answer; the file's scores are means over questions, in percent.
"""

from __future__ import annotations

import json
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.fileio import numbered_jsonl

_PUNCTUATION = str.maketrans("", "", string.punctuation)
# SQuAD's pattern: \b is Unicode-aware, so "theatre" and "another" keep their letters
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str, nfd: bool = False) -> str:
    """SQuAD v1.1's normalisation (EMDR2's with ``nfd``)."""
    if nfd:
        text = unicodedata.normalize("NFD", text)
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _best(score, prediction: str, answers: Sequence[str], nfd: bool) -> float:
    if not answers:
        raise ValueError("no gold answers to score against")
    guess = normalize_answer(prediction, nfd)
    return max(score(guess, normalize_answer(answer, nfd)) for answer in answers)


def _same(guess: str, gold: str) -> float:
    return float(guess == gold)


def _token_f1(guess: str, gold: str) -> float:
    guess_tokens, gold_tokens = guess.split(), gold.split()
    common = sum((Counter(guess_tokens) & Counter(gold_tokens)).values())
    if common == 0:  # also when either side normalises to nothing
        return 0.0
    precision, recall = common / len(guess_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answers: Sequence[str], nfd: bool = False) -> float:
    """1.0 when the normalised prediction equals some normalised gold answer, else 0.0."""
    return _best(_same, prediction, answers, nfd)


def f1(prediction: str, answers: Sequence[str], nfd: bool = False) -> float:
    """SQuAD's token F1 (bag-of-tokens overlap) against the best gold answer."""
    return _best(_token_f1, prediction, answers, nfd)


def read_answers(path: str) -> list[dict[str, Any]]:
    """``{"question", "answers", "prediction"}`` rows of a JSONL file (as ``art-jax answer`` writes);
    a bad line is one UserError naming file and line."""
    rows = []
    for number, row in numbered_jsonl(path):
        where = f"{path}:{number}"
        for key in ("question", "prediction"):
            if not isinstance(row.get(key), str):
                raise UserError(f"{where}: missing or non-string '{key}'")
        answers = row.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise UserError(f"{where}: 'answers' must be a list of strings")
        if not answers:  # EM and F1 are a max over the gold answers: none gives no score
            raise UserError(f"{where}: 'answers' is empty; no gold answer to score against")
        rows.append({key: row[key] for key in ("question", "answers", "prediction")})
    if not rows:
        raise UserError(f"{path}: no answers to evaluate (expected JSONL lines "
                        '{"question": ..., "answers": [...], "prediction": ...})')
    return rows


def evaluate_answers(rows: Sequence[dict[str, Any]], nfd: bool = False) -> dict[str, Any]:
    """Mean EM and F1 over ``rows``, in percent, and the number of questions."""
    if not rows:
        raise ValueError("no answers to evaluate")
    em = [exact_match(row["prediction"], row["answers"], nfd) for row in rows]
    f1s = [f1(row["prediction"], row["answers"], nfd) for row in rows]
    return {"EM": 100 * math.fsum(em) / len(rows), "F1": 100 * math.fsum(f1s) / len(rows), "questions": len(rows)}


def format_reading(report: dict[str, Any]) -> str:
    return f"EM {report['EM']:.2f}  F1 {report['F1']:.2f}"


def evaluate_answers_file(path: str, nfd: bool = False, json_out: str | None = None) -> dict[str, Any]:
    """Evaluate an answers JSONL file; with ``json_out`` write the report there (atomically)."""
    report = evaluate_answers(read_answers(path), nfd)
    if json_out:
        storage.write_text(json_out, json.dumps(report, indent=1) + "\n")
    return report
