"""Any positive k, through `evaluate`, `search` and `dpr_results`, checked against DPR's
has_answer (the oracle of tests/test_evaluation.py) and first-hit positions written by hand;
the metric-name scheme and its table."""

import json

import numpy as np
import pytest

from art_jax import cli
from art_jax.core.errors import UserError
from art_jax.data.corpus import TokenizerSpec, prepare_corpus
from art_jax.data.questions import Question
from art_jax.evaluation.answers import format_metrics, metric_name, parse_metric, report_ks
from art_jax.models.hf import load_tokenizer
from art_jax.retrieval.results import dpr_results
from tests.test_evaluation import _oracle_has_answer

# (title, text): rows 0-4 hold one answer each; row 5's title says "harbour" (titles never
# count) and its "harbours" is not the token "harbour"; rows 6-11 hold none.
PASSAGES = [
    ("Bridges", "The bridge stands in Paris."),
    ("Castles", "The castle stands in Kyoto."),
    ("Foxes", "The fox ran in 1977."),
    ("Ports", "The port of Lagos is busy."),
    ("Art", "The old harbour was painted."),
    ("harbour", "Many harbours were painted."),
] + [("Weather", f"Filler passage {word} about the weather.") for word in ("one", "two", "three", "four", "five", "six")]

# question, answers, the row holding the answer, where that row is placed among 12 (written by
# hand: 0 | 2 | 3 tell top-1, top-3 and top-5 apart, 9 | 10 tell top-10 from top-12)
QUESTIONS = [
    (Question("where is the bridge", ("Paris",)), 0, 0),
    (Question("where is the castle", ("Kyoto",)), 1, 2),
    (Question("when did the fox run", ("1977",)), 2, 3),
    (Question("which port is busy", ("Lagos",)), 3, 9),
    (Question("what was painted", ("harbour",)), 4, 10),
    (Question("who wrote notes", ("Ada Lovelace",)), None, None),
]
FIRST_HITS = [0, 2, 3, 9, 10, None]  # what the placement must give under DPR's matching


def _rows(depth: int) -> np.ndarray:
    """[Q, depth] store rows: each question's answer row at its hand-written place."""
    rows = []
    for _, answer_row, place in QUESTIONS:
        order = [r for r in range(len(PASSAGES)) if r != answer_row]
        if answer_row is not None:
            order.insert(place, answer_row)
        rows.append(order[:depth])
    return np.array(rows)


def _expected(depth: int, ks) -> dict[int, float]:
    """Top-k from DPR's has_answer on the strings, by numpy (a k past the depth: all of it)."""
    hits = np.array([[_oracle_has_answer(list(q.answers), PASSAGES[r][1], "string") for r in row]
                     for (q, _, _), row in zip(QUESTIONS, _rows(depth))])
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def test_hand_placement_is_what_dpr_sees():
    hits = [[_oracle_has_answer(list(q.answers), PASSAGES[r][1], "string") for r in row]
            for (q, _, _), row in zip(QUESTIONS, _rows(12))]
    assert [row.index(True) if any(row) else None for row in hits] == FIRST_HITS
    # by hand from FIRST_HITS: top-3 holds 2 of 6 questions, top-10 4, top-12 5
    assert _expected(12, (1, 3, 5, 10, 12)) == {1: 1 / 6, 3: 2 / 6, 5: 3 / 6, 10: 4 / 6, 12: 5 / 6}


def test_report_ks():
    assert report_ks(10) == (1, 5, 10)
    assert report_ks(3) == (1, 3)
    assert report_ks(1) == (1,)
    assert report_ks(20) == (1, 5, 20)
    assert report_ks(150) == (1, 5, 20, 50, 100, 150)


def _results_file(tmp_path, depth: int = 12) -> str:
    results = [{"question": q.question, "answers": list(q.answers),
                "ctxs": [{"id": str(r), "title": PASSAGES[r][0], "text": PASSAGES[r][1], "score": float(-i)}
                         for i, r in enumerate(row)]}
               for (q, _, _), row in zip(QUESTIONS, _rows(depth))]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    return str(path)


def _evaluate(path: str, capsys, *topk: str) -> tuple[list[str], dict]:
    capsys.readouterr()
    cli.main(["evaluate", "--results", path, *(["--topk", *topk] if topk else [])])
    lines = capsys.readouterr().out.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


def test_evaluate_reports_exactly_the_ks_asked(tmp_path, capsys):
    path = _results_file(tmp_path)
    table, report = _evaluate(path, capsys, "3", "10")
    assert table == ["top-k | accuracy (%)", "------+-------------", "    3 |        33.33", "   10 |        66.67"]
    assert report["top_k"] == pytest.approx({str(k): v for k, v in _expected(12, (3, 10)).items()})
    assert list(report["top_k"]) == ["3", "10"]

    # default: the standard ks below the depth, then the depth
    _, report = _evaluate(path, capsys)
    assert report["top_k"] == pytest.approx({str(k): v for k, v in _expected(12, (1, 5, 12)).items()})
    assert list(report["top_k"]) == ["1", "5", "12"]


def test_evaluate_refuses_a_k_past_the_depth(tmp_path, capsys):
    path = _results_file(tmp_path, depth=10)
    with pytest.raises(SystemExit) as exit_info:
        _evaluate(path, capsys, "3", "11")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "top-11 asked for, but no question has more than 10 ctxs" in err and "ask for k <= 10" in err


@pytest.fixture(scope="module")
def store(bert_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("topk")
    with open(folder / "corpus.tsv", "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        f.writelines(f"{100 + i}\t{text}\t{title}\n" for i, (title, text) in enumerate(PASSAGES))
    return prepare_corpus(str(folder / "corpus.tsv"), str(folder / "store"), load_tokenizer(bert_dir),
                          TokenizerSpec(bert_dir, 64), progress=False)


def _dpr_results(store, depth: int, **kwargs):
    rows = _rows(depth)
    scores = np.tile(np.linspace(1.0, 0.0, depth, dtype=np.float32), (len(rows), 1))
    return dpr_results([q for q, _, _ in QUESTIONS], scores, rows, store, store.ids, **kwargs)


def test_dpr_results_any_ks_in_the_given_order(store):
    accuracy, results = _dpr_results(store, 10, ks=(1, 10, 3))
    assert list(accuracy) == [1, 10, 3]
    assert accuracy == pytest.approx(_expected(10, (1, 10, 3)))
    assert accuracy == pytest.approx({1: 1 / 6, 10: 4 / 6, 3: 2 / 6})
    assert [c["id"] for c in results[0]["ctxs"]] == [str(100 + r) for r in _rows(10)[0]]

    accuracy, _ = _dpr_results(store, 10)  # the default, as `search --topk 10` reports
    assert list(accuracy) == [1, 5, 10]
    assert accuracy == pytest.approx(_expected(10, (1, 5, 10)))


def test_dpr_results_past_the_depth(store):
    with pytest.raises(UserError, match="top-20 asked for, but no question has more than 10 ctxs"):
        _dpr_results(store, 10, ks=(1, 20))
    # the whole store retrieved: top-20 of a 12-passage corpus is top-12
    accuracy, _ = _dpr_results(store, len(PASSAGES), ks=(1, 20))
    assert accuracy == pytest.approx({1: 1 / 6, 20: 5 / 6})


def test_search_reports_the_depth(store, bert_dir, tmp_path, capsys):
    index, results = str(tmp_path / "index"), tmp_path / "results.json"
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q.question, "answers": list(q.answers)}) + "\n"
                                 for q, _, _ in QUESTIONS), encoding="utf-8")
    cli.main(["embed", "--retriever", bert_dir, "--corpus", store.path, "--out", index, "--max-length", "32"])
    capsys.readouterr()
    cli.main(["search", "--retriever", bert_dir, "--index", index, "--questions", str(questions),
              "--topk", "10", "--out", str(results)])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(report["top_k"]) == ["1", "5", "10"]
    hits = np.array([[c["has_answer"] for c in item["ctxs"]] for item in json.loads(results.read_text("utf-8"))])
    assert report["top_k"] == pytest.approx({str(k): float(hits[:, :k].any(1).mean()) for k in (1, 5, 10)})


def test_metric_names():
    assert [metric_name(k) for k in (1, 10, 3)] == ["top1", "top10", "top3"]
    assert [parse_metric(metric_name(k)) for k in (1, 10, 1000)] == [("top", 1), ("top", 10), ("top", 1000)]
    assert [parse_metric(name) for name in ("mrr", "em", "f1")] == [("mrr", None), ("em", None), ("f1", None)]
    for bad in ("top0", "top05", "top", "top-5", "Top5", "top 5", "mrr@10", "acc", ""):
        with pytest.raises(UserError, match="unknown metric"):
            parse_metric(bad)
    with pytest.raises(UserError, match="positive"):
        metric_name(0)


def test_format_metrics():
    table = format_metrics({"f1": 0.5, "top10": 0.75, "mrr": 0.123456, "top3": 1 / 3, "em": 0.25})
    assert table.splitlines() == [
        "metric |  value",
        "-------+-------",
        "  top3 | 33.33%",
        " top10 | 75.00%",
        "   mrr | 0.1235",
        "    em | 25.00%",
        "    f1 | 50.00%",
    ]
    with pytest.raises(UserError, match="unknown metric 'top-1'"):
        format_metrics({"top-1": 0.5})
