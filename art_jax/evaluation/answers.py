"""Top-k retrieval accuracy with DPR's exact answer matching (dpr/data/qa_validation.py),
and the metric names used across the project: ``top{k}``, ``mrr``, ``em``, ``f1``."""

from __future__ import annotations

import copy
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import regex

from art_jax.core.errors import UserError
from art_jax.core.fileio import read_json
from art_jax.core.storage import write_text

# The k values DPR and ART report; any positive k can be asked for.
STANDARD_KS = (1, 5, 20, 50, 100)

# DPR's SimpleTokenizer: runs of letters/digits/marks, or any single other visible character.
_TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]",
                       flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)
# DPR compiles answer patterns with the `regex` module (imported there as `re`), these flags.
_ANSWER_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE


def simple_tokenize(text: str) -> list[str]:
    """DPR's SimpleTokenizer words, lower-cased (``uncased=True``); no normalisation."""
    # Lower each token, not the text: str.lower() picks Greek final sigma from what follows.
    return list(map(str.lower, _TOKEN.findall(text)))


def _token_string(text: str) -> str:
    # Tokens never hold a space (\p{Z} is excluded), so a contiguous run of answer tokens in
    # the text is exactly a substring match of the space-joined forms, both space-padded.
    return " " + " ".join(simple_tokenize(unicodedata.normalize("NFD", text))) + " "


def _string_matcher(answers: Sequence[str]) -> Callable[[str], bool]:
    needles = [_token_string(a) for a in answers]
    # An answer with no tokens matches any text in DPR (its loop compares [] == [] at i=0).
    if "  " in needles:
        return lambda text: True

    def match(text: str) -> bool:
        haystack = _token_string(text)
        return any(n in haystack for n in needles)
    return match


def _regex_matcher(answers: Sequence[str]) -> Callable[[str], bool]:
    patterns = []
    for answer in answers:
        try:
            patterns.append(regex.compile(unicodedata.normalize("NFD", answer), flags=_ANSWER_FLAGS))
        except Exception:  # DPR counts a pattern that does not compile as no match
            continue

    def match(text: str) -> bool:
        text = unicodedata.normalize("NFD", text)
        return any(p.search(text) is not None for p in patterns)
    return match


_MATCHERS = {"string": _string_matcher, "regex": _regex_matcher}


def _matcher_maker(match: str) -> Callable[[Sequence[str]], Callable[[str], bool]]:
    """Builds ``has_answer`` for fixed answers: they are tokenized or compiled once, not per text."""
    if match not in _MATCHERS:
        raise UserError(f"unknown match mode {match!r}; expected one of {', '.join(_MATCHERS)}")
    return _MATCHERS[match]


def has_answer(answers: Sequence[str], text: str, match: str = "string") -> bool:
    """DPR's has_answer: "string" looks for an answer's tokens as a contiguous run of the text's
    tokens (NFD, lower-cased); "regex" searches the NFD text with each answer as a pattern."""
    return _matcher_maker(match)(answers)(text)


def report_ks(depth: int) -> tuple[int, ...]:
    """The k values reported by default for results ``depth`` ctxs deep: the standard ones
    below ``depth``, then ``depth`` itself (so ``--topk 10`` reports top-1, 5 and 10)."""
    return tuple(k for k in STANDARD_KS if k < depth) + (depth,)


def _checked_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"top-k values must be positive integers, got {k!r}")
    return tuple(int(k) for k in ks)


def top_k_accuracy(hits: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """Fraction of questions (rows) with a hit among their first k ctxs (columns), keyed by k
    in the order given. A k past the last column counts every column (callers that cannot
    vouch for that refuse such a k first: see ``evaluate_results``)."""
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 2 or hits.shape[0] == 0:
        raise ValueError(f"top_k_accuracy: expected a non-empty [questions, ctxs] array, got {hits.shape}")
    found = np.logical_or.accumulate(hits, axis=1)  # found[q, i]: a hit among ctxs 0..i
    width = hits.shape[1]
    return {k: float(found[:, min(k, width) - 1].mean()) if width else 0.0 for k in _checked_ks(ks)}


def evaluate_results(results: Any, match: str = "string", ks: Iterable[int] | None = None,
                     source: str = "results", *, exhaustive: bool = False) -> tuple[dict[int, float], list[dict]]:
    """Top-k accuracies of DPR-style results, keyed by k in the order of ``ks`` (default:
    ``report_ks`` of the depth, the most ctxs any question has), and a copy of the results
    whose every ctx has ``has_answer`` recomputed from its text (a stored value is never trusted).

    A k past the depth is refused: the results were cut there, so nothing says whether the
    answer was further down. ``exhaustive`` says the ctxs are the whole corpus; then a k past
    them is as good as all of them. A question with fewer ctxs than k counts the ones it has."""
    make_matcher = _matcher_maker(match)
    check_results(results, source)
    width = max(len(item["ctxs"]) for item in results)
    if width == 0:
        raise UserError(f"{source}: no question has any ctxs to evaluate")
    ks = report_ks(width) if ks is None else _checked_ks(ks)
    too_deep = [k for k in ks if k > width]
    if too_deep and not exhaustive:
        raise UserError(f"{source}: top-{too_deep[0]} asked for, but no question has more than {width} ctxs; "
                        f"a k past the retrieved depth cannot be measured (ask for k <= {width})")
    annotated = copy.deepcopy(results)
    hits = np.zeros((len(annotated), width), dtype=bool)
    for qi, item in enumerate(annotated):
        matcher = make_matcher(item["answers"])
        for ci, ctx in enumerate(item["ctxs"]):
            ctx["has_answer"] = hits[qi, ci] = matcher(ctx["text"])  # the text only, never the title
    return top_k_accuracy(hits, ks), annotated


def check_results(results: Any, source: str) -> None:
    if not isinstance(results, list) or not results:
        raise UserError(f"{source}: expected a non-empty JSON list of results")
    for qi, item in enumerate(results):
        where = f"{source}: result {qi}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object")
        if not isinstance(item.get("question"), str):
            raise UserError(f"{where}: missing or non-string 'question'")
        answers = item.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise UserError(f"{where}: 'answers' must be a list of strings")
        if not isinstance(item.get("ctxs"), list):
            raise UserError(f"{where}: 'ctxs' must be a list")
        for ci, ctx in enumerate(item["ctxs"]):
            if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
                raise UserError(f"{where}, ctx {ci}: expected an object with a string 'text'")


def metric_name(k: int) -> str:
    """The name of top-k accuracy in metrics, configs and checkpoint records: ``top{k}``."""
    return f"top{_checked_ks([k])[0]}"


_NAMED_METRICS = ("mrr", "em", "f1")


def parse_metric(name: str) -> tuple[str, int | None]:
    """``("top", k)`` for ``top{k}`` (k a positive integer as ``metric_name`` writes it),
    ``(name, None)`` for ``mrr``, ``em`` and ``f1``; any other name is a UserError."""
    if name in _NAMED_METRICS:
        return name, None
    top = re.fullmatch(r"top([1-9][0-9]*)", name)
    if top is None:
        raise UserError(f"unknown metric {name!r}; expected top{{k}} (k a positive integer), "
                        f"{', '.join(_NAMED_METRICS)}")
    return "top", int(top.group(1))


def _align(rows: list[tuple[str, str]]) -> str:
    """A header row, a rule, then the rows; left column right-aligned as numbers are."""
    left = max(len(r[0]) for r in rows)
    right = max(len(r[1]) for r in rows)
    lines = [f"{a:>{left}} | {b:>{right}}" for a, b in rows]
    lines.insert(1, f"{'-' * left}-+-{'-' * right}")
    return "\n".join(lines)


def format_table(accuracy: dict[int, float]) -> str:
    """Top-k accuracies keyed by int k, as percentages, k ascending."""
    return _align([("top-k", "accuracy (%)")] + [(str(k), f"{100 * a:.2f}") for k, a in sorted(accuracy.items())])


def format_metrics(values: dict[str, float]) -> str:
    """Named metrics (``parse_metric``'s names), top-k first by k, then mrr, em, f1.
    Top-k, em and f1 are fractions of questions, printed as percentages; mrr as it is."""
    def order(name: str) -> tuple[int, int]:
        kind, k = parse_metric(name)
        return (0, k) if kind == "top" else (1 + _NAMED_METRICS.index(kind), 0)

    rows = [(name, f"{values[name]:.4f}" if name == "mrr" else f"{100 * values[name]:.2f}%")
            for name in sorted(values, key=order)]
    return _align([("metric", "value")] + rows)


def evaluate_file(results_path: str, match: str = "string", ks: Iterable[int] | None = None,
                  annotated_out: str | None = None) -> dict[str, Any]:
    """Evaluate a DPR results JSON (``ks`` as in ``evaluate_results``); optionally write it
    back with recomputed has_answer."""
    accuracy, annotated = evaluate_results(read_json(results_path), match, ks, source=results_path)
    if annotated_out:
        write_text(annotated_out, json.dumps(annotated, indent=1, ensure_ascii=False) + "\n")
    return {"questions": len(annotated), "match": match,
            "top_k": {str(k): a for k, a in accuracy.items()}}
