"""`art-jax` commands, run in-process through ``art_jax.cli.main`` (one subprocess test
proves ``python -m art_jax`` works)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from art_jax import cli
from art_jax.teachers.t5 import T5Scorer
from tests.multiprocess import child_env
from tests.test_scorer import PAIRS, oracle_scores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


def _pair_rows(pairs):
    return [{"title": t, "text": x, "question": q} for t, x, q in pairs]


def _fails(argv, capsys) -> str:
    """Run a command that must fail as a user error: exit 2, one line on stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"art-jax {argv[0]}: error: "), err
    return err[0]


# ---------------------------------------------------------------------------------------
# score --pairs


def test_score_pairs(t5_v11_dir, tmp_path, capsys):
    pairs = PAIRS[:7]
    pairs_path = _write_jsonl(tmp_path / "pairs.jsonl", _pair_rows(pairs))
    out = tmp_path / "sub" / "out.jsonl"  # the parent folder is created
    cli.main(["score", "--scorer", t5_v11_dir, "--pairs", pairs_path, "--out", str(out), "--dtype", "float32"])
    assert f"wrote {out}" in capsys.readouterr().out
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(pairs)
    rows = [json.loads(line) for line in lines]
    assert all(set(r) == {"score"} for r in rows)
    got = np.array([r["score"] for r in rows])

    scorer = T5Scorer.from_pretrained(t5_v11_dir, dtype="float32")
    titles, texts, questions = (list(x) for x in zip(*pairs))
    np.testing.assert_allclose(got, scorer.score(titles, texts, questions), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, oracle_scores(t5_v11_dir, pairs), rtol=0, atol=1e-4)
    assert not [p for p in os.listdir(out.parent) if p != "out.jsonl"], "temporary files left behind"


# ---------------------------------------------------------------------------------------
# score --rerank


def _results():
    passages = [
        ("Ada Lovelace", "Ada Lovelace visited the bridge near Paris in 1851."),
        ("Harbour", "The committee painted the harbour near Kyoto in 1920."),
        ("Marie Curie", "Marie Curie described the laboratory near Lagos in 1977."),
        ("", "a small brown fox crossed the old castle."),
        ("The Thames", "the river Thames crossed the harbour near Paris in 1851."),
        ("Castle", "The committee visited the old castle near Kyoto in 1920."),
    ]
    questions = ["Who visited the bridge near Paris?", "When was the harbour painted?"]
    results = []
    for qi, question in enumerate(questions):
        ctxs = []
        for rank, ci in enumerate(range(qi, qi + 5)):
            title, text = passages[ci]
            ctxs.append({"id": f"doc{ci}", "title": title, "text": text, "score": 10.0 - rank,
                         "has_answer": ci % 2 == 0})
        results.append({"question": question, "answers": [f"answer {qi}"], "ctxs": ctxs})
    return results


def test_rerank(t5_v10_dir, tmp_path, capsys):
    results = _results()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    out = tmp_path / "reranked.json"
    cli.main(["score", "--scorer", t5_v10_dir, "--rerank", str(path), "--out", str(out), "--dtype", "float32",
              "--batch-size", "3"])
    reranked = json.loads(out.read_text(encoding="utf-8"))

    assert len(reranked) == len(results)
    moved = False
    for before, after in zip(results, reranked):
        assert after["question"] == before["question"] and after["answers"] == before["answers"]
        ctxs = before["ctxs"]
        expected = oracle_scores(t5_v10_dir, [(c["title"], c["text"], before["question"]) for c in ctxs])
        order = np.argsort(-expected, kind="stable")
        assert [c["id"] for c in after["ctxs"]] == [ctxs[i]["id"] for i in order]
        moved |= list(order) != list(range(len(ctxs)))
        for i, ctx in zip(order, after["ctxs"]):
            assert set(ctx) == set(ctxs[i]) | {"teacher_score"}
            assert {k: ctx[k] for k in ctxs[i]} == ctxs[i]  # id, title, text, retriever score, has_answer
            assert ctx["teacher_score"] == pytest.approx(expected[i], abs=1e-4)
        scores = [c["teacher_score"] for c in after["ctxs"]]
        assert scores == sorted(scores, reverse=True)
    assert moved, "the teacher kept the retriever's order everywhere: the test proves nothing"


# ---------------------------------------------------------------------------------------
# user errors: exit 2, one line naming the file and line


GOOD = {"title": "Ada", "text": "Ada visited the bridge.", "question": "Who visited?"}


@pytest.mark.parametrize("lines, where, what", [
    ([GOOD, '{"title": "a", "text": "b", "question": '], ":2:", "invalid JSON"),
    ([GOOD, GOOD, {"title": "a", "text": "b"}], ":3:", "question"),
    ([GOOD, {"title": "a", "text": "b", "question": 7}], ":2:", "question"),
    ([GOOD, '["not", "an", "object"]'], ":2:", "object"),
    ([GOOD, {"title": "a", "text": "b", "question": ""}], ":2:", "empty question"),
    # a blank line is skipped, but the error still names the line of the file
    ([GOOD, "", GOOD, {"title": "a", "text": "b", "question": "  "}], ":4:", "empty question"),
], ids=["invalid-json", "missing-question", "non-string-question", "not-an-object", "empty-question",
        "empty-question-after-blank-line"])
def test_bad_pairs_file(lines, where, what, t5_v10_dir, tmp_path, capsys):
    pairs_path = _write_jsonl(tmp_path / "pairs.jsonl", lines)
    out = tmp_path / "out.jsonl"
    err = _fails(["score", "--scorer", t5_v10_dir, "--pairs", pairs_path, "--out", str(out)], capsys)
    assert f"{pairs_path}{where}" in err and what in err, err
    assert not out.exists()


def test_missing_files(t5_v10_dir, tmp_path, capsys):
    pairs_path = _write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    missing = str(tmp_path / "no-such-t5")
    err = _fails(["score", "--scorer", missing, "--pairs", pairs_path, "--out", str(tmp_path / "o")], capsys)
    assert "checkpoint folder not found" in err and missing in err, err

    missing_pairs = str(tmp_path / "nothing.jsonl")
    err = _fails(["score", "--scorer", t5_v10_dir, "--pairs", missing_pairs, "--out", str(tmp_path / "o")],
                 capsys)
    assert missing_pairs in err, err

    # a T5 folder is not a BERT retriever
    err = _fails(["export", "--retriever", t5_v10_dir, "--out", str(tmp_path / "e")], capsys)
    assert "config.json" in err and "model_type='t5'" in err, err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("content, what", [
    ({"question": "q", "ctxs": []}, "expected a JSON list"),
    ('[{"question": "q", "ctxs": []},\n oops]', ":2: invalid JSON"),
    ([{"question": "", "ctxs": []}], "result 0"),
    ([{"question": "q", "ctxs": [{"title": "t"}]}], "result 0, ctx 0"),
], ids=["not-a-list", "invalid-json", "empty-question", "ctx-without-text"])
def test_bad_results_file(content, what, t5_v10_dir, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    err = _fails(["score", "--scorer", t5_v10_dir, "--rerank", str(path), "--out", str(tmp_path / "o.json")],
                 capsys)
    assert str(path) in err and what in err, err


def test_usage_errors(capsys):
    for argv in ([], ["score", "--scorer", "x", "--out", "o"], ["export", "--out", "o"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize("config", sorted(name[:-3] for name in os.listdir(os.path.join(REPO, "configs"))
                                    if name.endswith(".py")))
def test_an_unknown_config_argument_is_one_line(config, tmp_path, capsys):
    """Every shipped config names itself and its choices for an argument it does not know (fid.py,
    which takes none, through load_config)."""
    err = _fails(["train", f"--config={REPO}/configs/{config}.py:bogus", f"--workdir={tmp_path}"], capsys)
    assert f"configs/{config}.py: unknown " in err and "'bogus'; " in err, err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# export


def test_export_bert_loads_in_transformers(bert_dir, tmp_path, capsys):
    from transformers import AutoModel, AutoTokenizer, BertModel

    out = tmp_path / "exported"
    cli.main(["export", "--retriever", bert_dir, "--out", str(out)])
    (out / "stale.txt").write_text("from an earlier export")  # an export's folder is replaced by the next
    cli.main(["export", "--retriever", bert_dir, "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    assert not (out / "stale.txt").exists(), "the output folder is replaced, not merged"

    original = BertModel.from_pretrained(bert_dir)
    reference = AutoTokenizer.from_pretrained(bert_dir)
    for side in ("question", "passage"):
        folder = str(out / f"{side}_encoder")
        model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
        assert isinstance(model, BertModel)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        want, got = original.state_dict(), model.state_dict()
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=f"{side}: {key}")

        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = ["Who visited the bridge near Paris?", "the old castle"]
        assert tokenizer.get_vocab() == reference.get_vocab()
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
        batch = reference(text, padding=True, return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(**batch).last_hidden_state,
                                       original.eval()(**batch).last_hidden_state)


# ---------------------------------------------------------------------------------------
# selfcheck, through the console entry


def test_selfcheck_subprocess():
    env = child_env(8, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "art_jax", "selfcheck"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "selfcheck passed" in proc.stdout, proc.stdout
    assert "8 cpu device(s)" in proc.stdout
