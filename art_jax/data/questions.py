"""Question files: DPR/ART TSV (``question<TAB>['a1', 'a2']``), DPR JSON lists and JSONL
(BEIR's ``queries.jsonl`` too). Each question has a qid, the id qrels and TREC runs name it by:
its ``qid`` field (BEIR: ``_id``), else its 1-based line number (a JSON list: position)."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from typing import Any

from art_jax.core.errors import UserError
from art_jax.core.fileio import local_file, numbered_jsonl, read_json, text_lines


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...] = ()
    # the id qrels and runs use; not part of a question's identity (None: made in code, not read)
    qid: str | None = field(default=None, compare=False)


def read_questions(path: str) -> list[Question]:
    """All questions of ``path``: .tsv/.csv is the DPR question-answers table; .json/.jsonl
    is a JSON list if the file starts with ``[``, else one object per line (gs:// too).
    A file without questions is an error."""
    path = local_file(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tsv", ".csv"):
        questions = _read_tsv(path)
    elif ext in (".json", ".jsonl"):
        questions = _read_json_list(path) if _first_char(path) == "[" else _read_jsonl(path)
    else:
        raise UserError(f"{path}: unknown question file type {ext or '(none)'}; "
                        "expected .tsv, .csv, .json or .jsonl")
    if not questions:
        raise UserError(f"{path}: no questions")
    return questions


def _first_char(path: str) -> str:
    for _, line in text_lines(path):
        if line.strip():
            return line.lstrip()[0]
    return ""


def _read_tsv(path: str) -> list[Question]:
    questions = []
    for number, line in text_lines(path):
        if not line.strip():
            continue
        # Split on the tab, not with csv: csv quoting mangles questions that contain '"'.
        fields = line.split("\t")
        if len(fields) != 2:
            raise UserError(f"{path}:{number}: expected 2 tab-separated columns "
                            f"(question, answers), found {len(fields)}")
        question, column = fields
        if not question.strip():
            raise UserError(f"{path}:{number}: empty question")
        try:
            # DPR eval()s this column; a literal parse reads the same lists and runs no code.
            answers = ast.literal_eval(column.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise UserError(f"{path}:{number}: answers column is not a list literal: "
                            f"{column[:80]!r}") from None
        questions.append(Question(question, _answers(answers, f"{path}:{number}"), str(number)))
    return questions


def _read_json_list(path: str) -> list[Question]:
    items = read_json(path)
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list of questions")
    return [_from_object(item, f"{path}: item {i}", str(i + 1)) for i, item in enumerate(items)]


def _read_jsonl(path: str) -> list[Question]:
    questions = []
    for number, row in numbered_jsonl(path):
        where = f"{path}:{number}"
        if "question" not in row and "_id" in row:  # BEIR's queries.jsonl: {"_id", "text"}, no answers
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{where}: missing or empty 'text' (a BEIR query: _id and text)")
            questions.append(Question(text, (), _qid(row["_id"], where, "_id")))
            continue
        if not isinstance(row.get("question"), str):
            raise UserError(f"{where}: missing or non-string field(s) question")
        if not row["question"].strip():
            raise UserError(f"{where}: empty question")
        questions.append(_from_object(row, where, str(number)))
    return questions


def _from_object(item: Any, where: str, default_qid: str) -> Question:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object")
    question = item.get("question")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: missing or empty 'question'")
    qid = _qid(item["qid"], where, "qid") if "qid" in item else default_qid
    # Training questions may come without answers.
    return Question(question, _answers(item.get("answers", []), where), qid)


def _qid(value: Any, where: str, name: str) -> str:
    """A qid field: a non-empty string, or an integer taken as its decimal string."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise UserError(f"{where}: '{name}' must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _answers(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise UserError(f"{where}: answers must be a list of strings")
    return tuple(value)
