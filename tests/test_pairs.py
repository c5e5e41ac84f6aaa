"""Pair pre-training (DPR-PAQ): `art-jax prepare-pairs` into a pair store (the tokenizer's own
tokens, inline passages and corpus ids, bad lines, a killed build resumed), and the `pairs`
method reading it (a step's tokens, draws, fill, refusals), trained through the CLI."""

import json
import os
import subprocess

import numpy as np
import pytest

from art_jax import cli
from art_jax.config import apply_override, default_config
from art_jax.core.errors import UserError
from art_jax.core.sharding import make_mesh
from art_jax.data import build as build_module
from art_jax.data import pairs as pairs_module
from art_jax.data.corpus import CorpusStore, TokenizerSpec, prepare_corpus
from art_jax.data.pairs import prepare_pairs
from art_jax.methods.pairs import Pairs
from art_jax.models.hf import load_tokenizer
from tests.hf_fixtures import CORPUS, make_bert_checkpoint

VERBS = ("visited", "described", "crossed", "painted")
LONG = "who painted the old castle near Kyoto in 1920 and who described the laboratory near Lagos in 1977"


def _passage(i):
    return {"title": f"P{i}", "text": CORPUS[i]}


def _rows(n=12):
    """Pair e: an inline positive, e % 4 hard negatives mixing inline passages and corpus ids
    (int, decimal string); every third question long enough to be cut."""
    rows = []
    for e in range(n):
        negatives = [_passage(e + 20 + k) if k % 2 else [e + 2, str(e + 3)][k // 2 % 2] for k in range(e % 4)]
        question = LONG if e % 3 == 0 else f"who {VERBS[e % 4]} the {('bridge', 'harbour')[e % 2]}?"
        rows.append({"question": question, "positive": _passage(e), "hard_negatives": negatives})
    return rows


def _write(path, rows, blank_after=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
            if i == blank_after:
                f.write("\n")
    return str(path)


@pytest.fixture(scope="module")
def tok(bert_dir):
    return load_tokenizer(bert_dir)


@pytest.fixture(scope="module")
def stores(files, tok, tmp_path_factory):
    """(integer-id corpus store: ids 1..61, string-id corpus store: ids "doc-0".., 48 passages)."""
    folder = tmp_path_factory.mktemp("pair_corpora")
    ints = prepare_corpus(files[0], str(folder / "ints"), tok, TokenizerSpec("bert", 48), progress=False)
    strings = folder / "strings.jsonl"
    _write(strings, [{"_id": f"doc-{i}", "title": f"S{i}", "text": CORPUS[i]} for i in range(48)])
    return ints, prepare_corpus(str(strings), str(folder / "strings"), tok, TokenizerSpec("bert", 48),
                                progress=False)


def _prepare(tmp_path, tok, rows, *, name="store", **options):
    """``rows`` (or the file ``rows`` names) prepared into ``tmp_path / name``."""
    path = rows if isinstance(rows, str) else _write(tmp_path / f"{name}.jsonl", rows)
    options = {"question_max_length": 12, "passage_max_length": 24, "batch_size": 5, "progress": False, **options}
    return prepare_pairs([path], str(tmp_path / name), tok, "bert", **options)


def _question(tok, text, length, side="right"):
    tok.truncation_side = side
    try:
        return tok(text, truncation=True, max_length=length)["input_ids"]
    finally:
        tok.truncation_side = "right"


def _passage_ids(tok, title, text, length):
    return tok(title, text, truncation="only_second", max_length=length)["input_ids"]


def _leftovers(folder):
    return [n for n in os.listdir(folder) if ".building-" in n or ".old-" in n or n.endswith(".parts")]


# ---------------------------------------------------------------- prepare-pairs

@pytest.mark.parametrize("side", ["right", "left"])
def test_inline_and_corpus_id_pairs_hold_the_tokenizers_tokens(tmp_path, tok, stores, side):
    rows = _rows()
    store = _prepare(tmp_path, tok, rows, corpus=stores[0].path, question_truncation=side)
    assert len(store) == 12 and store.meta["question"]["truncation"] == side
    inline, corpus_refs = 0, 0
    for e, row in enumerate(rows):
        assert store.questions.row(e).tolist() == _question(tok, row["question"], 12, side)
        refs = [int(store.positive([e])[0]), *store.hard_negatives(e).tolist()]
        assert len(refs) == 1 + len(row["hard_negatives"])
        for ref, passage in zip(refs, [row["positive"], *row["hard_negatives"]]):
            if isinstance(passage, dict):  # inline: numbered in input order
                assert ref == -1 - inline
                inline += 1
                assert store.passages.row(-1 - ref).tolist() == _passage_ids(tok, passage["title"], passage["text"], 24)
            else:  # an id of the corpus: its row
                assert ref >= 0 and stores[0].passage_id(ref) == int(passage)
                corpus_refs += 1
    assert len(tok(LONG)["input_ids"]) > 12, "the long questions must be cut"
    assert store.meta["question"]["at_max_length"] == 4
    assert store.meta["inline_passages"] == inline and store.meta["corpus_references"] == corpus_refs > 0
    assert store.meta["corpus"]["count"] == len(stores[0]) and not _leftovers(tmp_path)


def test_string_ids_and_pairs_without_negatives(tmp_path, tok, stores):
    rows = [{"question": "who visited?", "positive": "doc-5", "hard_negatives": ["doc-7", {"text": "bare"}]},
            {"question": "who crossed?", "positive": {"text": "untitled", "title": None}},
            {"question": "what then?", "positive": "doc-0", "hard_negatives": []}]
    store = _prepare(tmp_path, tok, rows, corpus=stores[1].path)
    assert [stores[1].passage_id(int(r)) for r in store.positive([0, 2])] == ["doc-5", "doc-0"]
    assert stores[1].passage_id(int(store.hard_negatives(0)[0])) == "doc-7"
    assert store.hard_negatives(0)[1] == -1 and store.positive([1])[0] == -2
    assert store.passages.row(0).tolist() == _passage_ids(tok, "", "bare", 24)
    assert store.passages.row(1).tolist() == _passage_ids(tok, "", "untitled", 24)
    assert store.negatives.lengths().tolist() == [2, 0, 0]


BAD = {
    "invalid JSON": ('{"question": "q", ', "invalid JSON"),
    "not an object": ('["q"]', "expected an object"),
    "no question": ('{"positive": 3}', 'missing or empty "question"'),
    "empty question": ('{"question": " ", "positive": 3}', 'missing or empty "question"'),
    "no positive": ('{"question": "q"}', 'missing "positive"'),
    "no text": ('{"question": "q", "positive": {"title": "t"}}', '"positive" needs a non-empty string "text"'),
    "bool id": ('{"question": "q", "positive": true}', '"positive" is neither'),
    "negatives not a list": ('{"question": "q", "positive": 3, "hard_negatives": 4}', '"hard_negatives" is not a list'),
    "unknown id": ('{"question": "q", "positive": 3, "hard_negatives": [9999]}', "no passage with id 9999"),
    "unknown str id": ('{"question": "q", "positive": "abc"}', "no passage with id 'abc'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_line_names_file_and_line(tmp_path, tok, stores, case):
    line, reason = BAD[case]
    good = json.dumps({"question": "fine", "positive": 1})
    path = _write(tmp_path / "bad.jsonl", [good] * 6 + [line, good], blank_after=2)  # line 8
    with pytest.raises(UserError) as err:
        prepare_pairs([path], str(tmp_path / "store"), tok, "bert", corpus=stores[0].path, batch_size=2,
                      progress=False)
    assert str(err.value).startswith(f"{path}:8: ") and reason in str(err.value), str(err.value)
    assert not os.path.exists(tmp_path / "store") and not _leftovers(tmp_path)


def test_cli_errors_are_one_line(tmp_path, bert_dir, stores, capsys):
    path = _write(tmp_path / "pairs.jsonl", [{"question": "q", "positive": {"text": "t"}}, {"question": "q",
                                                                                           "positive": 12}])
    argv = ["prepare-pairs", "--pairs", path, "--retriever", bert_dir, "--out", str(tmp_path / "store")]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    lines = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]
    assert [line for line in lines if line.strip()] == [
        f'art-jax prepare-pairs: error: {path}:2: "positive" is the passage id 12; passage ids need --corpus, the '
        + 'corpus store they point into']
    bad_utf8 = tmp_path / "utf8.jsonl"
    bad_utf8.write_bytes(b'{"question": "q", "positive": {"text": "t"}}\n{"question": "\xff"}\n')
    with pytest.raises(SystemExit):
        cli.main(["prepare-pairs", "--pairs", str(bad_utf8), "--retriever", bert_dir, "--out", str(tmp_path / "s")])
    assert f"{bad_utf8}:2: invalid UTF-8" in capsys.readouterr().err
    cli.main([*argv, "--corpus", stores[0].path, "--question-max-length", "16"])
    assert f"wrote {tmp_path / 'store'}: 2 pairs, 1 inline passage(s), 1 corpus reference(s)" in capsys.readouterr().out


class Killed(Exception):
    """What a kill would be: no UserError, so the build keeps its staging for the rerun."""


def test_a_killed_build_publishes_nothing_and_the_rerun_resumes_it(tmp_path, tok, stores, monkeypatch):
    monkeypatch.setattr(build_module, "CHECKPOINT_SECONDS", 0)  # a checkpoint after every chunk
    rows = _rows(23)  # 5 chunks of 5
    clean = _prepare(tmp_path, tok, rows, name="clean", corpus=stores[0].path)
    path = _write(tmp_path / "pairs.jsonl", rows)  # the same file (size, time) for both runs
    calls, original, kill = [], pairs_module.question_rows, [True]

    def question_rows(*args):
        calls.append(args[1][0])
        if len(calls) == 3 and kill[0]:
            raise Killed
        return original(*args)

    monkeypatch.setattr(pairs_module, "question_rows", question_rows)
    with pytest.raises(Killed):
        _prepare(tmp_path, tok, path, corpus=stores[0].path)
    assert not os.path.exists(tmp_path / "store")
    (staging,) = _leftovers(tmp_path)
    state = json.loads((tmp_path / staging / build_module.STATE_FILE).read_text())
    assert state["done"] == 2 and [c[0] for c in state["chunks"]] == [0, 1]
    # as if its process had been killed: a pid that is gone; beside it a dead build of other pairs
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.rename(tmp_path / staging, tmp_path / f".store.building-{build_module.HOST}-{dead.pid}-kill")
    other = tmp_path / f".store.building-{build_module.HOST}-{dead.pid}-other"
    other.mkdir()
    (other / build_module.KEY_FILE).write_text(json.dumps({"store": "pairs", "inputs": []}))
    calls.clear()
    kill[0] = False
    store = _prepare(tmp_path, tok, path, corpus=stores[0].path)
    assert calls == [rows[i]["question"] for i in (10, 15, 20)]  # only the chunks not done
    assert not _leftovers(tmp_path)
    assert sorted(os.listdir(store.path)) == sorted(os.listdir(clean.path))
    for name in os.listdir(clean.path):
        if name != "meta.json":
            assert (tmp_path / "store" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert {**store.meta, "created": None} == {**clean.meta, "created": None, "sources": store.meta["sources"]}


def test_prepare_corpus_resumes_through_the_same_build(tmp_path, tok, monkeypatch):
    """The build prepare-pairs uses is prepare-corpus's: a killed string-id corpus build (process 0's
    own id column beside the tokenized ones) taken up by the rerun equals a clean build."""
    from art_jax.data import corpus as corpus_module

    monkeypatch.setattr(build_module, "CHECKPOINT_SECONDS", 0)
    path = _write(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "title": f"S{i}", "text": CORPUS[i]} for i in range(23)])
    clean = prepare_corpus(path, str(tmp_path / "clean"), tok, TokenizerSpec("bert", 32), batch_size=5, progress=False)
    calls, original, kill = [], corpus_module.passage_rows, [True]

    def passage_rows(*args):
        calls.append(args[1][0])
        if len(calls) == 2 and kill[0]:
            raise Killed
        return original(*args)

    monkeypatch.setattr(corpus_module, "passage_rows", passage_rows)
    with pytest.raises(Killed):
        prepare_corpus(path, str(tmp_path / "store"), tok, TokenizerSpec("bert", 32), batch_size=5, progress=False)
    (staging,) = _leftovers(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.rename(tmp_path / staging, tmp_path / f".store.building-{build_module.HOST}-{dead.pid}-kill")
    calls.clear()
    kill[0] = False
    store = prepare_corpus(path, str(tmp_path / "store"), tok, TokenizerSpec("bert", 32), batch_size=5,
                           progress=False)
    assert calls == ["S5", "S10", "S15", "S20"] and not _leftovers(tmp_path)
    assert sorted(os.listdir(store.path)) == sorted(os.listdir(tmp_path / "clean"))
    for name in os.listdir(tmp_path / "clean"):
        if name != "meta.json":
            assert (tmp_path / "store" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert store.row_of("d17") == clean.row_of("d17") == 17


# ---------------------------------------------------------------- the method

def _cfg(bert_dir, pairs, **settings):
    cfg = default_config()
    settings = {"method": "pairs", "retriever.checkpoint": bert_dir, "retriever.question_max_length": 10,
                "retriever.passage_max_length": 20, "retriever.train_passage_max_length": 20,
                "train.batch_size": 8, "train.steps": 4, "train.best_metric": "", "index.progress": False,
                "train.hard_negatives": 2, "data.pairs": pairs, **settings}
    for key, value in settings.items():
        apply_override(cfg, f"config.{key}={value}")
    return cfg


def _padded(rows, length, pad):
    ids = np.full((len(rows), length), pad, np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return ids


def test_a_step_is_the_tokenized_pairs_positive_first(tmp_path, tok, bert_dir, stores):
    rows = _rows(16)
    store = _prepare(tmp_path, tok, rows, corpus=stores[0].path, question_truncation="left")
    cfg = _cfg(bert_dir, store.path, **{"data.corpus_store": stores[0].path, "retriever.question_truncation": "left"})
    Pairs.check_config(cfg)
    method = Pairs(cfg, str(tmp_path / "run"), make_mesh())
    assert method.num_examples == 16 and method.steps_per_epoch == 2
    corpus = stores[0]

    def text(passage):
        if isinstance(passage, dict):
            return passage["title"], passage["text"]
        row = corpus.row_of(passage)
        return corpus.title(row), corpus.text(row)

    every_corpus_row = {tuple(_passage_ids(tok, corpus.title(r), corpus.text(r), 20)) for r in range(len(corpus))}
    seen = []
    for step in range(2):
        epoch, indices = method.step_examples(step)
        q, p = method.tokens(indices, epoch)
        assert q.ids.shape == (8, 10) and p.ids.shape == (24, 20) and q.ids.dtype == p.ids.dtype == np.int32
        expected = [_question(tok, rows[e]["question"], 10, "left") for e in indices]
        np.testing.assert_array_equal(q.ids, _padded(expected, 10, tok.pad_token_id))
        np.testing.assert_array_equal(q.mask, _padded([[1] * len(r) for r in expected], 10, 0))
        np.testing.assert_array_equal(p.mask.sum(1), (p.ids != tok.pad_token_id).sum(1))
        for i, e in enumerate(indices):
            own = [tuple(int(t) for t in r if t != tok.pad_token_id) for r in p.ids[3 * i:3 * i + 3]]
            assert own[0] == tuple(_passage_ids(tok, *text(rows[e]["positive"]), 20))
            hard = [tuple(_passage_ids(tok, *text(n), 20)) for n in rows[e]["hard_negatives"]]
            drawn = own[1:1 + min(2, len(hard))]
            assert set(drawn) <= set(hard) and len(set(drawn)) == len(drawn)
            assert all(r in every_corpus_row for r in own[1 + len(drawn):]), "the fill comes from the corpus"
        seen += indices
    assert sorted(seen) == list(range(16))  # every pair once in the epoch
    epoch, indices = method.step_examples(1)
    again = method.tokens(indices, epoch)[1].ids
    np.testing.assert_array_equal(again, method.tokens(indices, epoch)[1].ids)  # fixed by (seed, epoch)
    three = next(e for e in range(16) if e % 4 == 3)  # 3 hard negatives, 2 drawn: the draws vary by epoch
    draws = {tuple(method.references(np.array([three]), epoch)[0, 1:]) for epoch in range(8)}
    assert len(draws) > 1


def test_without_a_corpus_the_fill_is_other_pairs_positives(tmp_path, tok, bert_dir):
    rows = [{"question": f"question {i}?", "positive": _passage(i)} for i in range(8)]
    rows[3]["hard_negatives"] = [_passage(40)]
    store = _prepare(tmp_path, tok, rows)
    method = Pairs(_cfg(bert_dir, store.path, **{"train.hard_negatives": 1}), str(tmp_path / "run"), make_mesh())
    refs = method.references(np.arange(8), 0)
    assert refs[:, 0].tolist() == list(store.positive(np.arange(8))) and refs[3, 1] == store.hard_negatives(3)[0]
    assert set(refs[[i for i in range(8) if i != 3], 1].tolist()) <= set(refs[:, 0].tolist())
    p = method.tokens(list(range(8)), 0)[1]
    assert p.ids.shape == (16, 20)
    np.testing.assert_array_equal(p.ids[7], _padded([_passage_ids(tok, "P40", CORPUS[40], 20)], 20, tok.pad_token_id)[0])


def _refusal(bert_dir, store, **settings):
    """load_examples of a method whose towers are not built: the checks alone."""
    cfg = _cfg(bert_dir, store.path, **settings)
    method = Pairs.__new__(Pairs)
    method.cfg, method.tokenizer = cfg, load_tokenizer(cfg.retriever.checkpoint)
    method.store = CorpusStore(cfg.data.corpus_store) if cfg.data.corpus_store else None
    with pytest.raises(UserError) as err:
        method.load_examples(cfg)
    return str(err.value)


def test_a_pair_store_of_another_corpus_tokenizer_or_length_is_refused(tmp_path, tok, bert_dir, stores):
    store = _prepare(tmp_path, tok, _rows(), corpus=stores[0].path)
    assert "set data.corpus_store to it" in _refusal(bert_dir, store)
    assert "prepared against the corpus store" in _refusal(bert_dir, store, **{"data.corpus_store": stores[1].path})
    ok = {"data.corpus_store": stores[0].path}
    assert "--question-max-length" in _refusal(bert_dir, store, **ok, **{"retriever.question_max_length": 13})
    assert "--passage-max-length" in _refusal(bert_dir, store, **ok, **{"retriever.train_passage_max_length": 25})
    assert "cut its questions on the 'right'" in _refusal(bert_dir, store, **ok,
                                                             **{"retriever.question_truncation": "left"})
    other = make_bert_checkpoint(str(tmp_path / "other_bert"), tokenizer_vocab=80)
    assert "differ from retriever.checkpoint's" in _refusal(other, store, **ok)
    with pytest.raises(UserError, match="not a pair store"):
        Pairs.check_config(_cfg(bert_dir, str(tmp_path)))
    with pytest.raises(UserError, match="needs data.pairs"):
        Pairs.check_config(_cfg(bert_dir, ""))


def test_pairs_train_through_the_cli(tmp_path, tok, bert_dir, stores, capsys):
    store = _prepare(tmp_path, tok, _rows(16), corpus=stores[0].path, question_max_length=16, passage_max_length=32)
    cli.main(["train", "--config=configs/dpr_nq.py", f"--workdir={tmp_path / 'run'}", "--config.method=pairs",
              f"--config.data.pairs={store.path}", f"--config.data.corpus_store={stores[0].path}",
              "--config.data.train_examples=", "--config.data.dev_questions=", "--config.train.best_metric=",
              f"--config.retriever.checkpoint={bert_dir}", "--config.train.batch_size=8", "--config.train.steps=3",
              "--config.retriever.passage_max_length=32", "--config.retriever.train_passage_max_length=32",
              "--config.retriever.question_max_length=16", "--config.index.progress=false",
              "--config.train.log_every=1", "--config.retriever.shared_towers=true"])  # (one tower compiles faster)
    out = capsys.readouterr().out
    assert "step 3/3" in out and "global batch 8 x (1 positive + 1 hard negative(s)), 2 steps per epoch" in out
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 3 and all(np.isfinite(losses))
