"""Metrics against relevance judgements (qrels), TREC runs and qids, checked against an
independent numpy implementation of trec_eval's definitions (``trec_eval -c``: every judged
query counts, one without results as 0; ranking by score descending, ties by docid descending),
and the CLI end to end: a string-id corpus searched into a TREC run and evaluated."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from art_jax import cli
from art_jax.core.errors import UserError
from art_jax.data.corpus import CorpusStore
from art_jax.data.questions import read_questions
from art_jax.evaluation.qrels import (
    evaluate_run,
    format_trec_run,
    parse_metrics,
    per_query,
    read_qrels,
    read_run,
)

METRICS = ["nDCG@10", "RR@10", "R@100", "P@5"]


# ---------------------------------------------------------------- the reference


def _reference_order(docs: dict[str, float], docids_descending: bool = True) -> list[str]:
    """trec_eval's order by numpy: lexsort on (docid rank descending) within (score descending)."""
    ids = np.array(list(docs), dtype=object)
    scores = np.array([docs[d] for d in ids], np.float64)
    id_rank = np.argsort(np.argsort(np.array(list(docs), dtype=str)))  # code-point order = strcmp on UTF-8
    return list(ids[np.lexsort((-id_rank if docids_descending else id_rank, -scores))])


def _reference(qrels, run, docids_descending: bool = True) -> dict[str, dict[str, float]]:
    """metric -> qid -> value, trec_eval's definitions (relevant: rel >= 1; nDCG gain = rel,
    discount log2(rank + 1)), for every judged query."""
    out = {m: {} for m in METRICS}
    for qid, judged in qrels.items():
        ranked = _reference_order(run.get(qid, {}), docids_descending)
        gains = np.array([judged.get(d, 0) for d in ranked], np.float64)
        relevant = gains >= 1
        total = sum(1 for r in judged.values() if r >= 1)
        first = np.flatnonzero(relevant[:10])
        out["RR@10"][qid] = 1.0 / (first[0] + 1) if first.size else 0.0
        out["P@5"][qid] = relevant[:5].sum() / 5
        out["R@100"][qid] = relevant[:100].sum() / total if total else 0.0
        discount = 1 / np.log2(np.arange(2, 12))
        ideal = np.sort(np.array([r for r in judged.values() if r > 0], np.float64))[::-1][:10]
        idcg = (ideal * discount[:len(ideal)]).sum()
        dcg = (gains[:10] * discount[:len(gains[:10])]).sum()
        out["nDCG@10"][qid] = dcg / idcg if idcg else 0.0
    return out


def _random_judgements(seed: int):
    """Graded qrels (0..3) over docids whose string order differs from their numeric order,
    runs with many score ties and >100 docs for some queries, two judged queries not run,
    one run query not judged and one judged query with nothing relevant."""
    rng = np.random.default_rng(seed)
    pool = [str(i) for i in range(1, 60)] + [f"d{i}" for i in range(140)] + ["MED-10", "MED-9", "é1", "z"]
    qrels, run = {}, {}
    for q in range(24):
        qid = f"q{q}"
        judged = rng.choice(pool, int(rng.integers(1, 16)), replace=False)
        qrels[qid] = {d: int(rng.integers(0, 4)) for d in judged}
        if q == 5:
            qrels[qid] = dict.fromkeys(judged, 0)
        if q in (7, 13):
            continue  # judged, never retrieved: counts 0
        depth = int(rng.integers(3, 160))
        docs = list(judged[: int(rng.integers(0, len(judged) + 1))])
        docs += [d for d in rng.permutation(pool) if d not in docs][: depth - len(docs)]
        scores = rng.integers(0, 6, len(docs)) / 4  # few distinct values: ties everywhere
        run[qid] = {d: float(s) for d, s in zip(docs, scores)}
    run["unjudged"] = {"d1": 1.0, "d2": 0.5}
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_the_reference(seed):
    qrels, run = _random_judgements(seed)
    want = _reference(qrels, run)
    got = per_query(qrels, run, METRICS)
    for metric in METRICS:
        assert set(got[metric]) == set(qrels)
        np.testing.assert_allclose([got[metric][q] for q in qrels], [want[metric][q] for q in qrels],
                                   rtol=0, atol=1e-12, err_msg=metric)
        assert got[metric]["q7"] == got[metric]["q13"] == got[metric]["q5"] == 0.0
    means = evaluate_run(qrels, run, METRICS)
    assert list(means) == METRICS
    for metric in METRICS:
        assert means[metric] == pytest.approx(math.fsum(want[metric].values()) / len(qrels), abs=1e-12)
    # the ties decide values here: the other tie-break (ir-measures' RR@k by itself) differs
    other = _reference(qrels, run, docids_descending=False)
    for metric in METRICS:
        assert any(other[metric][q] != want[metric][q] for q in qrels), metric


def test_a_hand_worked_query():
    # scores 1, 1, 1, 0.5: trec_eval ranks the ties by docid descending: d3, d2, d10 (strcmp), then d1
    qrels = {"q": {"d10": 2, "d1": 1, "d9": 3}, "missing": {"x": 1}}
    run = {"q": {"d10": 1.0, "d2": 1.0, "d3": 1.0, "d1": 0.5}}
    got = evaluate_run(qrels, run, ["RR@10", "P@5", "R@100", "nDCG@10"])
    dcg = 2 / math.log2(4) + 1 / math.log2(5)
    idcg = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert got == pytest.approx({"RR@10": (1 / 3) / 2, "P@5": (2 / 5) / 2, "R@100": (2 / 3) / 2,
                                 "nDCG@10": dcg / idcg / 2}, abs=1e-12)


def test_bad_metric_names():
    assert [str(m) for m in parse_metrics(["nDCG@10", "RR@10", "nDCG@10", "AP"])] == ["nDCG@10", "RR@10", "AP"]
    for bad, message in (("nope", "unknown metric 'nope'"), ("P@x", "unknown metric 'P@x'"),
                         ("RR@0", "cutoff"), ("alpha_nDCG@10", "no installed ir-measures provider")):
        with pytest.raises(UserError, match=re.escape(message)):
            parse_metrics([bad])


# ---------------------------------------------------------------- files


def _write(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _trec_qrels(tmp_path, qrels, name="qrels.txt") -> str:
    return _write(tmp_path / name, [f"{q} 0 {d} {r}" for q, docs in qrels.items() for d, r in docs.items()])


def _beir_qrels(tmp_path, qrels, name="test.tsv") -> str:
    return _write(tmp_path / name, ["query-id\tcorpus-id\tscore"] +
                  [f"{q}\t{d}\t{r}" for q, docs in qrels.items() for d, r in docs.items()])


def _dpr_run(tmp_path, run, name="results.json") -> str:
    results = [{"qid": q, "question": f"question {q}", "answers": [],
                "ctxs": [{"id": d, "title": "", "text": "", "score": s} for d, s in docs.items()]}
               for q, docs in run.items()]
    (tmp_path / name).write_text(json.dumps(results), encoding="utf-8")
    return str(tmp_path / name)


def test_trec_run_ranks_are_trec_eval_order_and_every_format_reads_the_same(tmp_path):
    qrels, run = _random_judgements(3)
    text = format_trec_run(run)
    (tmp_path / "run.trec").write_text(text, encoding="utf-8")
    lines = [line.split() for line in text.splitlines()]
    assert all(len(f) == 6 and f[1] == "Q0" and f[5] == "art_jax" for f in lines)
    for qid, docs in run.items():
        mine = [f for f in lines if f[0] == qid]
        assert [int(f[3]) for f in mine] == list(range(1, len(docs) + 1))
        assert [f[2] for f in mine] == _reference_order(docs)
    assert read_run(str(tmp_path / "run.trec")) == run  # the scores round-trip exactly
    assert read_run(_dpr_run(tmp_path, run)) == run
    assert read_qrels(_trec_qrels(tmp_path, qrels)) == read_qrels(_beir_qrels(tmp_path, qrels)) == qrels
    # a run written from a DPR results file is the same run, and evaluates the same
    assert format_trec_run(read_run(_dpr_run(tmp_path, run))) == text
    values = {path: evaluate_run(qrels, read_run(path), METRICS)
              for path in (str(tmp_path / "run.trec"), _dpr_run(tmp_path, run))}
    assert len({json.dumps(v) for v in values.values()}) == 1


def test_run_and_qrels_without_trailing_spaces_or_with_extra_blank_lines(tmp_path):
    path = _write(tmp_path / "qrels.txt", ["", "q1\t0\tD1\t1  ", "", "q1 0 D2 0"])
    assert read_qrels(path) == {"q1": {"D1": 1, "D2": 0}}
    path = _write(tmp_path / "run.txt", ["q1 Q0 D1 1 1.5e0 x", "q1\tQ0\tD2\t2\t-3\tx", ""])
    assert read_run(path) == {"q1": {"D1": 1.5, "D2": -3.0}}


BAD_QRELS = {
    "three fields": ("q1 0 D1", "expected 4 whitespace-separated fields"),
    "five fields": ("q1 0 D1 1 x", "expected 4 whitespace-separated fields"),
    "relevance": ("q1 0 D1 high", "relevance 'high' is not an integer"),
    "float relevance": ("q1 0 D1 1.0", "relevance '1.0' is not an integer"),
    "duplicate": ("q0 0 D0 2", "query q0 judges document D0 a second time"),
}
BAD_BEIR = {
    "two fields": ("q1\tD1", "expected 3 tab-separated fields"),
    "relevance": ("q1\tD1\tx", "relevance 'x' is not an integer"),
    "empty id": ("q1\t\t1", "empty query or document id"),
}
BAD_RUN = {
    "five fields": ("q1 Q0 D1 1 0.5", "expected 6 whitespace-separated fields"),
    "score": ("q1 Q0 D1 1 high x", "score 'high' is not a finite number"),
    "nan score": ("q1 Q0 D1 1 nan x", "score 'nan' is not a finite number"),
    "rank": ("q1 Q0 D1 first 0.5 x", "rank 'first' is not an integer"),
    "duplicate": ("q0 Q0 D0 2 0.1 x", "query q0 ranks document D0 a second time"),
}


@pytest.mark.parametrize("kind,case", [("trec", c) for c in BAD_QRELS] + [("beir", c) for c in BAD_BEIR])
def test_bad_qrels_line_names_file_and_line(tmp_path, kind, case):
    line, message = (BAD_QRELS if kind == "trec" else BAD_BEIR)[case]
    good = ["q0 0 D0 1", "q0 0 D9 0"] if kind == "trec" else ["query-id\tcorpus-id\tscore", "q0\tD0\t1"]
    path = _write(tmp_path / "qrels", good + ["", line])
    with pytest.raises(UserError, match=f"^{re.escape(path)}:4: {re.escape(message)}"):
        read_qrels(path)


@pytest.mark.parametrize("case", BAD_RUN)
def test_bad_run_line_names_file_and_line(tmp_path, case):
    line, message = BAD_RUN[case]
    path = _write(tmp_path / "run", ["q0 Q0 D0 1 0.5 x", "q0 Q0 D1 2 0.25 x", line])
    with pytest.raises(UserError, match=f"^{re.escape(path)}:3: {re.escape(message)}"):
        read_run(path)


@pytest.mark.parametrize("results,message", [
    ([{"question": "q", "ctxs": []}], "result 0: no 'qid'"),
    ([{"qid": "1", "ctxs": []}, {"qid": 1, "ctxs": []}], "result 1: qid '1' a second time"),
    ([{"qid": "1", "ctxs": [{"id": "D1"}]}], "result 0, ctx 0: 'score' must be a finite number"),
    ([{"qid": "1", "ctxs": [{"score": 1.0}]}], "result 0, ctx 0: 'id' must be a non-empty string"),
    ([{"qid": "1", "ctxs": [{"id": "D1", "score": 1}, {"id": "D1", "score": 0}]}], "ctx 1: id 'D1' a second time"),
    ([{"qid": True, "ctxs": []}], "result 0: 'qid' must be a non-empty string or an integer"),
    ([], "expected a non-empty JSON list"),
])
def test_bad_dpr_run(tmp_path, results, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}"):
        read_run(str(path))


def test_trec_run_refuses_ids_with_whitespace():
    assert format_trec_run({"q1": {"D1": 0.5}}) == "q1 Q0 D1 1 0.5 art_jax\n"
    for run, what in (({"q 1": {"D1": 0.5}}, "query id 'q 1'"), ({"q1": {"D\t1": 0.5}}, "document id 'D\\t1'")):
        with pytest.raises(UserError, match=re.escape(f"{what} cannot be written in a TREC run")):
            format_trec_run(run)


def test_empty_files(tmp_path):
    empty = _write(tmp_path / "empty", ["", " "])
    with pytest.raises(UserError, match="no relevance judgements"):
        read_qrels(empty)
    with pytest.raises(UserError, match="no results"):
        read_run(empty)


# ---------------------------------------------------------------- question ids


def test_question_ids(tmp_path):
    tsv = _write(tmp_path / "q.tsv", ["first\t['a']", "", "second\t[]"])
    assert [q.qid for q in read_questions(tsv)] == ["1", "3"]
    jsonl = _write(tmp_path / "q.jsonl", ['{"question": "a"}', "", '{"question": "b", "qid": "Q-7"}',
                                          '{"question": "c", "qid": 12}'])
    assert [q.qid for q in read_questions(jsonl)] == ["1", "Q-7", "12"]
    listed = tmp_path / "q.json"
    listed.write_text(json.dumps([{"question": "a"}, {"question": "b", "qid": "x"}, {"question": "c"}]))
    assert [q.qid for q in read_questions(str(listed))] == ["1", "x", "3"]
    beir = _write(tmp_path / "queries.jsonl", ['{"_id": "PLAIN-1", "text": "what is a bridge?", "metadata": {}}',
                                               '{"_id": "PLAIN-2", "text": "where is Kyoto?"}'])
    questions = read_questions(beir)
    assert [(q.qid, q.question, q.answers) for q in questions] == [
        ("PLAIN-1", "what is a bridge?", ()), ("PLAIN-2", "where is Kyoto?", ())]
    for row, message in (('{"_id": "x", "text": " "}', ":1: missing or empty 'text'"),
                         ('{"question": "q", "qid": ""}', ":1: 'qid' must be a non-empty string"),
                         ('{"question": "q", "qid": [1]}', ":1: 'qid' must be a non-empty string")):
        with pytest.raises(UserError, match=re.escape(message)):
            read_questions(_write(tmp_path / "bad.jsonl", [row]))


# ---------------------------------------------------------------- end to end


def _run_cli(argv, capsys) -> list[str]:
    cli.main(argv)
    return capsys.readouterr().out.strip().splitlines()


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"art-jax {argv[0]}: error: "), err
    return err[0]


# a BEIR-style corpus: string ids, the first not an integer, some that look like integers
BEIR_IDS = ["MED-10", "MED-9", "007", "7", "doc-b", "Ünï-3"] + [f"P{i:03d}" for i in range(30)]


@pytest.fixture(scope="module")
def beir(bert_dir, tmp_path_factory):
    """A BEIR-style folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) prepared and embedded."""
    from tests.hf_fixtures import CORPUS

    folder = tmp_path_factory.mktemp("beir")
    texts = CORPUS[: len(BEIR_IDS)]
    _write(folder / "corpus.jsonl", [json.dumps({"_id": i, "title": f"T{n % 4}", "text": t, "metadata": {}},
                                                ensure_ascii=False) for n, (i, t) in enumerate(zip(BEIR_IDS, texts))])
    _write(folder / "queries.jsonl", [json.dumps({"_id": f"Q{n}", "text": f"who {t.split()[1]} the harbour?"})
                                      for n, t in enumerate(texts[:8])])
    rng = np.random.default_rng(0)
    qrels = {f"Q{n}": {i: int(rng.integers(0, 3)) for i in rng.choice(BEIR_IDS, 4, replace=False)} for n in range(9)}
    (folder / "qrels").mkdir()
    _beir_qrels(folder / "qrels", qrels)  # Q8 is judged but not asked: it counts 0
    store, index = str(folder / "store"), str(folder / "index")
    cli.main(["prepare-corpus", "--corpus", str(folder / "corpus.jsonl"), "--retriever", bert_dir, "--out", store,
              "--retriever-max-length", "32"])
    cli.main(["embed", "--retriever", bert_dir, "--corpus", store, "--out", index, "--max-length", "32"])
    return folder, qrels


def test_string_id_store_search_trec_and_evaluate(beir, bert_dir, tmp_path, capsys):
    folder, qrels = beir
    store = CorpusStore(str(folder / "store"))
    assert store.id_kind == "str" and store.passage_ids(range(len(store))) == BEIR_IDS
    assert [store.row_of(i) for i in BEIR_IDS] == list(range(len(BEIR_IDS)))
    search = ["search", "--retriever", bert_dir, "--index", str(folder / "index"), "--questions",
              str(folder / "queries.jsonl"), "--topk", "12"]
    capsys.readouterr()
    out = _run_cli(search + ["--out", str(tmp_path / "run.trec"), "--format", "trec"], capsys)
    assert len(out) == 1 and out[0].startswith(f"wrote {tmp_path / 'run.trec'}: 8 questions"), out  # no answers
    out = _run_cli(search + ["--out", str(tmp_path / "results.json")], capsys)
    assert "accuracy" in out[1]  # the DPR format prints its table as before

    results = json.loads((tmp_path / "results.json").read_text("utf-8"))
    assert [r["qid"] for r in results] == [f"Q{n}" for n in range(8)]
    for item in results:  # ids are the corpus's strings, pointing at the passages shown
        assert all(store.text(store.row_of(c["id"])) == c["text"] for c in item["ctxs"])
    text = (tmp_path / "run.trec").read_text("utf-8")
    assert format_trec_run(read_run(str(tmp_path / "results.json"))) == text
    lines = [line.split() for line in text.splitlines()]
    assert len(lines) == 8 * 12 and {f[2] for f in lines} <= set(BEIR_IDS)
    for item in results:
        docs = {c["id"]: c["score"] for c in item["ctxs"]}
        assert [f[2] for f in lines if f[0] == item["qid"]] == _reference_order(docs)

    want = {m: math.fsum(v.values()) / len(qrels) for m, v in _reference(qrels, read_run(str(tmp_path / "run.trec")))
            .items()}
    reports = []
    for run in ("run.trec", "results.json"):
        json_out = tmp_path / f"{run}.metrics.json"
        out = _run_cli(["evaluate", "--results", str(tmp_path / run), "--qrels", str(folder / "qrels" / "test.tsv"),
                        "--metrics", *METRICS, "--json-out", str(json_out)], capsys)
        assert out[0].startswith("9 judged queries") and "1 of them without results" in out[0], out
        assert [line.split()[0] for line in out[3:3 + len(METRICS)]] == METRICS  # the table
        written = json.loads(json_out.read_text())
        assert list(written) == METRICS and written == json.loads(out[-2]) == pytest.approx(want, abs=1e-12)
        reports.append(written)
    assert reports[0] == reports[1]


def test_trec_run_of_questions_with_answers_prints_accuracy(beir, bert_dir, files, tmp_path, capsys):
    folder, _ = beir
    capsys.readouterr()
    out = _run_cli(["search", "--retriever", bert_dir, "--index", str(folder / "index"), "--questions", files[1],
                    "--topk", "12", "--format", "trec", "--out", str(tmp_path / "run.trec")], capsys)
    assert "accuracy" in out[1] and json.loads(out[-1])["top_k"]
    qids = [line.split()[0] for line in (tmp_path / "run.trec").read_text().splitlines()]
    assert qids == [str(n) for n in range(1, 41) for _ in range(12)]  # JSONL line numbers


def test_cli_bad_input_is_one_line(beir, bert_dir, tmp_path, capsys):
    folder, _ = beir
    qrels_path = str(folder / "qrels" / "test.tsv")
    run = _write(tmp_path / "run.trec", ["Q0 Q0 MED-10 1 0.5 x", "Q0 Q0 MED-9 2 0.25"])
    assert f"{run}:2: expected 6 whitespace-separated fields" in _fails(
        ["evaluate", "--results", run, "--qrels", qrels_path], capsys)
    good_run = _write(tmp_path / "good.trec", ["Q0 Q0 MED-10 1 0.5 x"])
    bad_qrels = _write(tmp_path / "qrels.txt", ["Q0 0 MED-10 1", "Q0 0 MED-9 yes"])
    assert f"{bad_qrels}:2: relevance 'yes' is not an integer" in _fails(
        ["evaluate", "--results", good_run, "--qrels", bad_qrels], capsys)
    assert "unknown metric 'nDCG@ten'" in _fails(
        ["evaluate", "--results", good_run, "--qrels", qrels_path, "--metrics", "nDCG@ten"], capsys)
    assert "--metrics goes with --qrels" in _fails(["evaluate", "--results", good_run, "--metrics", "P@5"], capsys)
    assert "--json-out goes with --qrels" in _fails(
        ["evaluate", "--results", good_run, "--json-out", str(tmp_path / "m.json")], capsys)
    for extra in (["--topk", "5"], ["--annotated-out", str(tmp_path / "a.json")], ["--match", "regex"]):
        err = _fails(["evaluate", "--results", good_run, "--qrels", qrels_path, *extra], capsys)
        assert f"{extra[0]} is for answer accuracy" in err
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "a.json").exists()
    # a qid a TREC run cannot hold
    questions = _write(tmp_path / "q.jsonl", ['{"question": "who?", "qid": "a b"}'])
    err = _fails(["search", "--retriever", bert_dir, "--index", str(folder / "index"), "--questions", questions,
                  "--topk", "3", "--format", "trec", "--out", str(tmp_path / "r.trec")], capsys)
    assert "qid 'a b' cannot be written in a TREC run" in err
    # the defaults: nDCG@10 RR@10 R@100
    out = _run_cli(["evaluate", "--results", good_run, "--qrels", qrels_path], capsys)
    assert list(json.loads(out[-1])) == ["nDCG@10", "RR@10", "R@100"]
