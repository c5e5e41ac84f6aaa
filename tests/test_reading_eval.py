"""Reading evaluation (EM, F1 of generated answers) against SQuAD v1.1's official rules, written
out here as the reference, and `art-jax evaluate --answers` end to end."""

from __future__ import annotations

import collections
import json
import os
import re
import string
import subprocess
import sys
import unicodedata

import pytest

from art_jax import cli
from art_jax.evaluation.reading import (
    evaluate_answers,
    evaluate_answers_file,
    exact_match,
    f1,
    format_reading,
    normalize_answer,
    read_answers,
)
from tests.test_cli import REPO, _fails, _write_jsonl

# ---------------------------------------------------------------------------------------
# the reference: SQuAD v1.1's evaluate script (DPR and EMDR2 copy it; EMDR2 adds NFD first)


def ref_normalize(s, nfd=False):
    if nfd:
        s = unicodedata.normalize("NFD", s)
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def ref_f1(prediction, truth, nfd=False):
    guess, gold = ref_normalize(prediction, nfd).split(), ref_normalize(truth, nfd).split()
    same = sum((collections.Counter(guess) & collections.Counter(gold)).values())
    if same == 0:
        return 0
    precision, recall = same / len(guess), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def ref_em(prediction, truth, nfd=False):
    return ref_normalize(prediction, nfd) == ref_normalize(truth, nfd)


def ref_max(metric, prediction, truths, nfd=False):
    return max(metric(prediction, truth, nfd) for truth in truths)


CAFE, CAFE_NFD = "caf\u00e9", "cafe\u0301"  # é composed, and e + combining acute

# (prediction, gold answers)
CASES = [
    ("Paris", ["paris"]),
    ("The Theatre", ["theatre"]),  # "theatre" keeps its "the"
    ("another one", ["one"]),  # "another" keeps its "an"
    ("an apple", ["Apple"]),
    ("the", ["The"]),  # both normalise to nothing: SQuAD counts EM 1, F1 0
    ("", ["Paris"]),
    ("", ["the"]),
    ("1,000", ["1000"]),
    ("1,000 people", ["one thousand", "1000"]),
    ("U.S.A.", ["USA", "United States"]),
    ("rock-n-roll!", ["rock n roll", "rocknroll"]),
    ("\u201cquoted\u201d", ["quoted"]),  # curly quotes are not string.punctuation
    ("  New \t York\n", ["new york"]),
    ("Ça va", ["ça va", "ca va"]),
    ("naïve", ["naive", "Naïve"]),
    ("Αθήνα", ["αθήνα"]),
    ("Москва река", ["москва"]),
    ("北京", ["北京市", "北京"]),
    ("東京 タワー", ["東京"]),
    ("the cat sat", ["a cat sat on the mat", "dog"]),
    ("cat cat cat", ["the cat"]),
    ("Barack Obama, president", ["Obama", "President Barack Obama"]),
    ("l\u2019a", ["l"]),  # U+2019 is no punctuation and no word character: "a" goes as an article
    (CAFE, [CAFE_NFD]),
    ("the caf\u00e9 \u00e0 Paris", ["cafe\u0301 a\u0300 paris"]),
    ("a\u0300", ["a"]),  # decomposed, "a" is a whole word before the mark
    ("Thé", ["The"]),
]


@pytest.mark.parametrize("nfd", [False, True])
@pytest.mark.parametrize("prediction, answers", CASES)
def test_matches_squad_reference(prediction, answers, nfd):
    assert normalize_answer(prediction, nfd) == ref_normalize(prediction, nfd)
    for answer in answers:
        assert normalize_answer(answer, nfd) == ref_normalize(answer, nfd)
    assert exact_match(prediction, answers, nfd) == float(ref_max(ref_em, prediction, answers, nfd))
    assert f1(prediction, answers, nfd) == pytest.approx(ref_max(ref_f1, prediction, answers, nfd), abs=1e-12)


def test_normalisation_by_hand():
    assert normalize_answer("The Theatre, another!") == "theatre another"
    assert normalize_answer("  A  man,\ta plan:  the canal ") == "man plan canal"
    assert normalize_answer("1,000") == "1000" and normalize_answer("U.S.A.") == "usa"
    assert normalize_answer("Ça, naïve?") == "ça naïve"
    assert normalize_answer("Αθήνα") == "αθήνα"
    assert normalize_answer(CAFE) != normalize_answer(CAFE_NFD)
    assert normalize_answer(CAFE, nfd=True) == normalize_answer(CAFE_NFD, nfd=True) == CAFE_NFD


def test_scores_by_hand():
    assert exact_match("The Eiffel Tower.", ["Louvre", "eiffel tower"]) == 1.0
    assert exact_match("", ["Paris"]) == 0.0 and f1("", ["Paris"]) == 0.0
    assert f1("the cat sat", ["cat sat on mat"]) == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert f1("cat cat", ["cat"]) == pytest.approx(2 / 3)  # overlap counts each gold token once
    assert f1("cat sat", ["dog", "cat", "cat sat"]) == 1.0  # the best gold answer
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_nfd_changes_the_outcome():
    assert exact_match(CAFE, [CAFE_NFD]) == 0.0 and f1(CAFE, [CAFE_NFD]) == 0.0
    assert exact_match(CAFE, [CAFE_NFD], nfd=True) == 1.0 and f1(CAFE, [CAFE_NFD], nfd=True) == 1.0
    assert f1(f"{CAFE} au lait", [f"{CAFE_NFD} noir"], nfd=True) == pytest.approx(0.4)  # 1 of 3 and 1 of 2


def test_evaluate_answers_means_in_percent():
    rows = [{"question": "q1", "answers": ["Paris"], "prediction": "paris"},
            {"question": "q2", "answers": ["cat sat on mat"], "prediction": "the cat sat"},
            {"question": "q3", "answers": [CAFE_NFD], "prediction": CAFE},
            {"question": "q4", "answers": ["1000"], "prediction": "nine"}]
    report = evaluate_answers(rows)
    assert report == {"EM": 25.0, "F1": pytest.approx(100 * (1 + 2 / 3) / 4), "questions": 4}
    assert format_reading(report) == "EM 25.00  F1 41.67"
    assert evaluate_answers(rows, nfd=True) == {"EM": 50.0, "F1": pytest.approx(100 * (2 + 2 / 3) / 4),
                                                "questions": 4}


# ---------------------------------------------------------------------------------------
# the file and the CLI

ROWS = [{"question": "where is the louvre?", "answers": ["Paris", "Paris, France"], "prediction": "Paris."},
        {"question": "what drink?", "answers": [CAFE_NFD], "prediction": f"a {CAFE}"},
        {"question": "how many?", "answers": ["1000"], "prediction": "about 1,000"}]


def test_read_answers_keeps_the_three_fields(tmp_path):
    path = _write_jsonl(tmp_path / "answers.jsonl", [{**ROWS[0], "extra": 1}, "", ROWS[1]])
    assert read_answers(path) == ROWS[:2]  # blank lines skipped


def test_cli_prints_and_writes_json(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "answers.jsonl", ROWS)
    for nfd, em, f1s in ((False, 100 / 3, 100 * (1 + 2 / 3) / 3), (True, 200 / 3, 100 * (2 + 2 / 3) / 3)):
        out = tmp_path / f"reading-{nfd}.json"
        cli.main(["evaluate", "--answers", path, "--json-out", str(out)] + ["--nfd"] * nfd)
        lines = capsys.readouterr().out.splitlines()
        assert lines == [f"EM {em:.2f}  F1 {f1s:.2f}", f"wrote {out}"]
        written = json.loads(out.read_text())
        assert written == {"EM": pytest.approx(em), "F1": pytest.approx(f1s), "questions": 3}
    assert evaluate_answers_file(path) == evaluate_answers(ROWS)


def test_cli_subprocess(tmp_path):
    path = _write_jsonl(tmp_path / "answers.jsonl", ROWS)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "art_jax", "evaluate", "--answers", path, "--nfd"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["EM 66.67  F1 88.89"]


@pytest.mark.parametrize("lines, what", [
    ([ROWS[0], '{"question": "q", oops}'], ":2: invalid JSON"),
    ([ROWS[0], "[1, 2]"], ":2: expected a JSON object"),
    ([{"question": "q", "answers": ["a"]}], ":1: missing or non-string 'prediction'"),
    ([{"answers": ["a"], "prediction": "a"}], ":1: missing or non-string 'question'"),
    ([{"question": "q", "prediction": "a"}], ":1: 'answers' must be a list of strings"),
    ([ROWS[0], {"question": "q", "answers": "Paris", "prediction": "a"}], ":2: 'answers' must be a list of strings"),
    ([{"question": "q", "answers": ["a", 1], "prediction": "a"}], ":1: 'answers' must be a list of strings"),
    ([{"question": "q", "answers": [], "prediction": "a"}], ":1: 'answers' is empty"),
    ([{"question": "q", "answers": ["a"], "prediction": None}], ":1: missing or non-string 'prediction'"),
    ([], ": no answers to evaluate"),
    (["", "  "], ": no answers to evaluate"),
], ids=["bad-json", "not-an-object", "no-prediction", "no-question", "no-answers", "answers-a-string",
        "answers-not-strings", "answers-empty", "prediction-null", "empty-file", "blank-file"])
def test_bad_answers_file(lines, what, tmp_path, capsys):
    path = _write_jsonl(tmp_path / "answers.jsonl", lines)
    out = tmp_path / "reading.json"
    err = _fails(["evaluate", "--answers", path, "--json-out", str(out)], capsys)
    assert f"{path}{what}" in err, err
    assert not out.exists()


def test_missing_answers_file(tmp_path, capsys):
    missing = str(tmp_path / "nothing.jsonl")
    assert f"file not found: {missing}" in _fails(["evaluate", "--answers", missing], capsys)


def test_conflicting_flags(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "answers.jsonl", ROWS)
    results = _write_jsonl(tmp_path / "results.json", [])
    for extra in (["--results", results], ["--qrels", results], ["--metrics", "P@5"], ["--topk", "5"],
                  ["--match", "regex"], ["--annotated-out", str(tmp_path / "a.json")]):
        err = _fails(["evaluate", "--answers", path, *extra], capsys)
        assert f"{extra[0]} is for retrieval results" in err, err
    assert "--nfd goes with --answers" in _fails(["evaluate", "--results", results, "--nfd"], capsys)
    assert "give --results" in _fails(["evaluate"], capsys)
    assert "--json-out goes with --qrels or --answers" in _fails(
        ["evaluate", "--results", results, "--json-out", str(tmp_path / "m.json")], capsys)
    assert "is a folder" in _fails(["evaluate", "--answers", path, "--json-out", str(tmp_path)], capsys)
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "m.json").exists()
