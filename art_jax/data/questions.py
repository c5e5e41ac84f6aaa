"""Question files: DPR/ART TSV (``question<TAB>['a1', 'a2']``), DPR JSON lists and JSONL."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from typing import Any

from art_jax.core.errors import UserError
from art_jax.core.fileio import local_file, read_json, read_jsonl, text_lines


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...] = ()


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
        questions.append(Question(question, _answers(answers, f"{path}:{number}")))
    return questions


def _read_json_list(path: str) -> list[Question]:
    items = read_json(path)
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list of questions")
    return [_from_object(item, f"{path}: item {i}") for i, item in enumerate(items)]


def _read_jsonl(path: str) -> list[Question]:
    # read_jsonl skips blank lines, so the n-th row comes from the n-th non-blank line.
    numbers = [number for number, line in text_lines(path) if line.strip()]
    rows = read_jsonl(path, required=("question",), nonblank=("question",))
    return [_from_object(row, f"{path}:{number}") for number, row in zip(numbers, rows)]


def _from_object(item: Any, where: str) -> Question:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object")
    question = item.get("question")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: missing or empty 'question'")
    # Training questions may come without answers.
    return Question(question, _answers(item.get("answers", []), where))


def _answers(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise UserError(f"{where}: answers must be a list of strings")
    return tuple(value)
