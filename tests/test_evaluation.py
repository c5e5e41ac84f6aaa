"""Answer matching against an independent DPR oracle, top-k accuracy, result and question files."""

import json
import random
import unicodedata

import numpy as np
import pytest
import regex

from art_jax.core.errors import UserError
from art_jax.data.questions import Question, read_questions
from art_jax.evaluation.answers import (
    evaluate_file,
    evaluate_results,
    format_table,
    has_answer,
    simple_tokenize,
    top_k_accuracy,
)

# --- Oracle: DPR's SimpleTokenizer + has_answer, step by step as dpr/data/qa_validation.py does
# them (a slice compare at every start position; answer patterns through the `regex` module).

_ORACLE_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
                              flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE)


def _oracle_words(text):
    return [m.group().lower() for m in _ORACLE_TOKEN.finditer(text)]


def _oracle_has_answer(answers, text, match_type):
    text = unicodedata.normalize("NFD", text)
    if match_type == "string":
        words = _oracle_words(text)
        for answer in answers:
            needle = _oracle_words(unicodedata.normalize("NFD", answer))
            for i in range(0, len(words) - len(needle) + 1):
                if needle == words[i: i + len(needle)]:
                    return True
    elif match_type == "regex":
        for answer in answers:
            try:
                pattern = regex.compile(unicodedata.normalize("NFD", answer),
                                        flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE)
            except BaseException:
                continue
            if pattern.search(text) is not None:
                return True
    return False


COMPOSED, DECOMPOSED = "Beyonc\u00e9", "Beyonce\u0301"

# (answers, text, match, expected): expected is written by hand, so a bug the oracle shares fails.
CASES = [
    ([COMPOSED], f"{DECOMPOSED} sang", "string", True),
    ([DECOMPOSED], f"{COMPOSED} sang", "string", True),
    (["Beyonce"], f"{COMPOSED} sang", "string", False),  # accents are kept, not stripped
    (["U.S."], "the U.S. army", "string", True),
    (["US"], "the U.S. army", "string", False),
    (["U.S"], "the U.S. army", "string", True),  # u . s is a sub-list of u . s .
    (["3.14"], "pi is 3.14159", "string", False),
    (["3"], "pi is 3.14159", "string", True),
    (["don"], "I don't know", "string", True),  # don ' t
    (["PARIS"], "capital: paris.", "string", True),
    (["straße"], "STRASSE", "string", False),  # lower(), not casefold()
    (["ΟΔΥΣΣΕΥΣ"], "ΟΔΥΣΣΕΥΣ'Α", "string", True),  # each token is lowered alone: final ς
    (["cat"], "a category", "string", False),
    (["cat"], "cat-egory", "string", True),
    (["New York"], "new   york\ncity", "string", True),
    (["York New"], "new york city", "string", False),
    (["nope", "York city"], "new york city", "string", True),
    (["東京"], "東京タワー", "string", False),  # CJK without spaces is one token
    (["東京"], "東京 タワー", "string", True),
    (["🎉"], "party🎉time", "string", True),  # symbols are one-character tokens
    (["❤️"], "I ❤ you", "string", False),  # the variation selector is a token of its own
    ([""], "anything", "string", True),  # no tokens: DPR's loop compares [] == [] at i=0
    ([""], "", "string", True),
    (["  \t"], "anything", "string", True),
    (["x"], "", "string", False),
    ([], "anything", "string", False),
    (["^foo"], "bar\nfoo", "regex", True),  # MULTILINE
    (["^foo"], "bar foo", "regex", False),
    (["FOO"], "a foo", "regex", True),
    (["cat"], "a category", "regex", True),  # regex mode is a plain search
    (["("], "(", "regex", False),  # does not compile: no match
    (["(", "b.r"], "bar", "regex", True),
    (["\\p{N}+"], "abc 123", "regex", True),  # `regex` syntax; Python's `re` would reject it
    ([f"{COMPOSED}$"], DECOMPOSED, "regex", True),
]


@pytest.mark.parametrize("answers,text,match,expected", CASES)
def test_has_answer_matches_dpr(answers, text, match, expected):
    assert _oracle_has_answer(answers, text, match) is expected
    assert has_answer(answers, text, match) is expected


def test_has_answer_agrees_with_oracle_on_random_text():
    alphabet = ["a", "A", "é", "e\u0301", "İ", "ß", "Σ", " ", "\n", ".", "'", "-", "1", "東", "🎉", "\ufe0f"]
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 12)))
        answers = ["".join(rng.choices(alphabet, k=rng.randint(0, 3))) for _ in range(rng.randint(0, 2))]
        assert has_answer(answers, text) == _oracle_has_answer(answers, text, "string"), (answers, text)


def test_simple_tokenize():
    assert simple_tokenize("U.S. don't 3.14 Café!") == ["u", ".", "s", ".", "don", "'", "t", "3", ".", "14",
                                                        "café", "!"]
    assert simple_tokenize(" \t\n") == []


def test_unknown_match_mode():
    with pytest.raises(UserError, match="unknown match mode"):
        has_answer(["a"], "a", "exact")
    with pytest.raises(UserError, match="unknown match mode"):
        evaluate_results([], match="exact")


def test_top_k_accuracy():
    hits = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=bool)
    assert top_k_accuracy(hits, (1, 2, 3, 20)) == {1: 0.25, 2: 0.5, 3: 0.75, 20: 0.75}
    assert top_k_accuracy(np.zeros((2, 0), bool), (1,)) == {1: 0.0}
    with pytest.raises(UserError, match="positive"):
        top_k_accuracy(hits, (0,))


def _results():
    return [
        {"question": "capital of france?", "answers": ["Paris"],
         "ctxs": [{"title": "Paris", "text": "France is in Europe.", "has_answer": True},
                  {"title": "France", "text": "The capital is PARIS.", "has_answer": False}]},
        {"question": "who sang halo?", "answers": ["nobody", COMPOSED],
         "ctxs": [{"title": "Halo", "text": f"Sung by {DECOMPOSED}."}]},
        {"question": "unanswerable", "answers": ["zzz"], "ctxs": [{"title": "zzz", "text": "nothing"}] * 3},
    ]


def test_evaluate_results_recomputes_has_answer():
    results = _results()
    accuracy, annotated = evaluate_results(results, ks=(1, 2))
    # The title holding the answer never counts; stored has_answer values are overwritten.
    assert [[c["has_answer"] for c in r["ctxs"]] for r in annotated] == [[False, True], [True], [False] * 3]
    assert accuracy == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    assert results == _results()  # the input is left alone
    # past the depth (3 ctxs): refused, unless the ctxs are the whole corpus
    with pytest.raises(UserError, match="top-100 asked for, but no question has more than 3 ctxs"):
        evaluate_results(results, ks=(1, 100))
    assert evaluate_results(results, ks=(100,), exhaustive=True)[0] == {100: pytest.approx(2 / 3)}
    assert list(evaluate_results(results)[0]) == [1, 3]  # by default: the standard ks, then the depth
    with pytest.raises(UserError, match="no question has any ctxs"):
        evaluate_results([{"question": "q", "answers": ["a"], "ctxs": []}])


@pytest.mark.parametrize("bad,message", [
    ({}, "non-empty JSON list"),
    ([], "non-empty JSON list"),
    ([{"answers": [], "ctxs": []}], "results: result 0: missing or non-string 'question'"),
    ([{"question": "q", "answers": "a", "ctxs": []}], "result 0: 'answers' must be a list of strings"),
    ([{"question": "q", "answers": [1], "ctxs": []}], "result 0: 'answers' must be a list of strings"),
    ([{"question": "q", "answers": [], "ctxs": {}}], "result 0: 'ctxs' must be a list"),
    ([{"question": "q", "answers": [], "ctxs": []},
      {"question": "q", "answers": [], "ctxs": [{"text": "t"}, {"title": "t"}]}], "result 1, ctx 1: "),
])
def test_evaluate_results_rejects_bad_structure(bad, message):
    with pytest.raises(UserError, match=regex.escape(message)):
        evaluate_results(bad)


def test_evaluate_file_writes_annotated(tmp_path):
    path, out = tmp_path / "results.json", tmp_path / "sub" / "annotated.json"
    path.write_text(json.dumps(_results()), encoding="utf-8")
    summary = evaluate_file(str(path), ks=(1, 2), annotated_out=str(out))
    assert summary == {"questions": 3, "match": "string",
                       "top_k": {"1": pytest.approx(1 / 3), "2": pytest.approx(2 / 3)}}
    text = out.read_text(encoding="utf-8")
    assert DECOMPOSED in text  # ensure_ascii=False keeps the text readable
    assert json.loads(text)[0]["ctxs"][0]["has_answer"] is False
    with pytest.raises(UserError, match="file not found"):
        evaluate_file(str(tmp_path / "missing.json"))


def test_format_table():
    lines = format_table({5: 0.5, 1: 0.25, 100: 1.0}).splitlines()
    assert lines == ["top-k | accuracy (%)", "------+-------------",
                     "    1 |        25.00", "    5 |        50.00", "  100 |       100.00"]


# --- Question files

def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_tsv_questions(tmp_path):
    path = _write(tmp_path, "qa.csv", '"Halo" was sung by whom?\t["a", "b"]\n\n'
                  "who said \"hi\t['a', \"b's\"]\n"
                  "caf\u00e9?\t['\\u00e9', \"x\"]\n"
                  "no answers\t[]\n")
    assert read_questions(path) == [Question('"Halo" was sung by whom?', ("a", "b")),
                                    Question('who said "hi', ("a", "b's")),
                                    Question("caf\u00e9?", ("\u00e9", "x")),
                                    Question("no answers", ())]


@pytest.mark.parametrize("line,message", [
    ("q\t['a']\textra", "qa.tsv:2: expected 2 tab-separated columns"),
    ("only a question", "qa.tsv:2: expected 2 tab-separated columns"),
    ("q\t__import__('os').mkdir('PWNED')", "qa.tsv:2: answers column is not a list literal"),
    ("q\t['a'", "qa.tsv:2: answers column is not a list literal"),
    ("q\t[1, 2]", "qa.tsv:2: answers must be a list of strings"),
    ("q\t'a'", "qa.tsv:2: answers must be a list of strings"),
    (" \t['a']", "qa.tsv:2: empty question"),
])
def test_tsv_errors(tmp_path, monkeypatch, line, message):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, "qa.tsv", f"fine\t['a']\n{line}\n")
    with pytest.raises(UserError, match=regex.escape(message)):
        read_questions(path)
    assert not (tmp_path / "PWNED").exists()


def test_json_questions(tmp_path):
    items = [{"question": "q1", "answers": ["a"], "ctxs": [], "id": 3}, {"question": "q2"}]
    path = _write(tmp_path, "qa.json", json.dumps(items, indent=2))
    assert read_questions(path) == [Question("q1", ("a",)), Question("q2")]


@pytest.mark.parametrize("content,message", [
    ([{"question": "q"}, "q2"], "qa.json: item 1: expected a JSON object"),
    ([{"question": "q"}, {"question": " "}], "qa.json: item 1: missing or empty 'question'"),
    ([{"question": "q", "answers": "a"}], "qa.json: item 0: answers must be a list of strings"),
])
def test_json_errors(tmp_path, content, message):
    path = _write(tmp_path, "qa.json", json.dumps(content))
    with pytest.raises(UserError, match=regex.escape(message)):
        read_questions(path)


def test_jsonl_questions(tmp_path):
    path = _write(tmp_path, "qa.jsonl", '{"question": "q1", "answers": ["a", "b"]}\n\n{"question": "q2"}\n')
    assert read_questions(path) == [Question("q1", ("a", "b")), Question("q2")]


@pytest.mark.parametrize("line,message", [
    ('{"question": "q", "answers": "a"}', "qa.jsonl:4: answers must be a list of strings"),
    ('{"question": ""}', "qa.jsonl:4: empty question"),
    ('{"answers": []}', "qa.jsonl:4: missing or non-string field(s) question"),
    ("{not json", "qa.jsonl:4: invalid JSON"),
])
def test_jsonl_errors(tmp_path, line, message):
    path = _write(tmp_path, "qa.jsonl", f'{{"question": "q"}}\n\n{{"question": "q"}}\n{line}\n')
    with pytest.raises(UserError, match=regex.escape(message)):
        read_questions(path)


def test_question_file_not_found_or_unknown(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_questions(str(tmp_path / "missing.tsv"))
    with pytest.raises(UserError, match="unknown question file type"):
        read_questions(_write(tmp_path, "qa.txt", "q\t['a']\n"))
