"""`art-jax mine`: BM25 against a numpy Lucene BM25 over independently analysed tokens (and against
bm25s's own index builder), the distant-supervision rules on hand-made rankings, DPR training JSON
end to end, --bm25-index save / reuse / refusal, dense mining against numpy brute force over the
index's own embeddings, and bad input as exit 2."""

import json
import math
import os
import re

import numpy as np
import pytest
import Stemmer

from art_jax import cli
from art_jax.core.errors import UserError
from art_jax.data.corpus import TokenizerSpec, prepare_corpus
from art_jax.data.questions import Question
from art_jax.jobs.mine import distant_supervision
from art_jax.models.hf import load_tokenizer
from art_jax.retrieval import bm25
from tests.test_evaluation import _oracle_has_answer

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET (lucene/analysis/common, EnglishAnalyzer.java)
LUCENE_STOPWORDS = {"a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
                    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they",
                    "this", "to", "was", "will", "with"}
_PORTER = Stemmer.Stemmer("porter")


def _analyze(text: str) -> list[str]:
    """The analysis as specified: lower-case, word runs with inner apostrophes, a trailing 's
    dropped, Lucene's stopwords out, Porter stems (PyStemmer)."""
    words = re.findall(r"\w+(?:['’]\w+)*", text.lower())
    words = [w[:-2] if w.endswith(("'s", "’s")) else w for w in words]
    return _PORTER.stemWords([w for w in words if w not in LUCENE_STOPWORDS])


def _reference_scores(docs: list[list[str]], query: list[str], k1=0.9, b=0.4) -> np.ndarray:
    """Lucene's classic BM25 in float64: sum over query terms (each occurrence) of
    ln(1 + (N - df + 0.5) / (df + 0.5)) * tf (k1 + 1) / (tf + k1 (1 - b + b dl / avgdl))."""
    n = len(docs)
    dl = np.array([len(d) for d in docs], np.float64)
    avgdl = dl.mean()
    scores = np.zeros(n)
    for term in query:
        tf = np.array([d.count(term) for d in docs], np.float64)
        df = int((tf > 0).sum())
        if df:
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            scores += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))
    return scores


def _reference_ranking(scores: np.ndarray, k: int) -> list[int]:
    """Rows that match a query term, best first, equal scores in row order."""
    rows = [r for r in range(len(scores)) if scores[r] > 0]
    return sorted(rows, key=lambda r: (-round(float(scores[r]), 6), r))[:k]


# (id, title, text); rows 10 and 11 are the same passage (a tie broken by row)
PASSAGES = [
    (1, "Marie Curie", "Marie Curie won the Nobel Prize in Physics in 1903."),
    (2, "Marie Curie", "Curie's second Nobel Prize, in Chemistry, came in 1911."),
    (3, "Nobel Prize", "The Nobel Prize is awarded in Stockholm every December; prizes are prized."),
    (4, "Pierre Curie", "Pierre Curie shared the physics prize with his wife Marie."),
    (5, "Ada Lovelace", "Ada Lovelace wrote the first published algorithm for the Analytical Engine."),
    (6, "Analytical Engine", "Charles Babbage designed the Analytical Engine in 1837."),
    (7, "Charles Babbage", "Babbage's Difference Engine was never completed in his lifetime."),
    (8, "Thames", "The river Thames flows through London to the North Sea."),
    (9, "London", "London bridges cross the Thames; Tower Bridge opened in 1894, TOWER BRIDGE."),
    (10, "Tower Bridge", "Tower Bridge is a bascule bridge in London."),
    (11, "Kyoto", "Kyoto was the imperial capital of Japan for more than a thousand years."),
    (12, "Kyoto", "Kyoto was the imperial capital of Japan for more than a thousand years."),
    (13, "Weather", "Weather is the state of the atmosphere, the weather's state."),
    (14, "", "It is what it is, and that is that."),
    (15, "O'Neil", "O'Neil's rock'n'roll band's records: O’Neil’s hits."),
]

QUESTIONS = [
    Question("when did Marie Curie win the Nobel Prize in physics", ("1903",)),
    Question("in which year did Curie win the chemistry Nobel Prize", ("1911",)),
    Question("who designed the Analytical Engine", ("Charles Babbage",)),  # row 6's text; row 6's title too
    Question("when did Tower Bridge open", ("1894",)),
    Question("what was the imperial capital of Japan", ("Tokyo",)),  # in no passage: left out
    Question("when was the analytical engine designed", ("18[0-9]{2}",)),  # a pattern: regex mode only
]


def _write_corpus(path, passages=PASSAGES) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        f.writelines(f"{pid}\t{text}\t{title}\n" for pid, title, text in passages)
    return str(path)


def _write_questions(path, questions=QUESTIONS) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question": q.question, "answers": list(q.answers)}) + "\n" for q in questions)
    return str(path)


def _build(folder, passages=PASSAGES, **options) -> bm25.BM25Index:
    return bm25.build_index(((title, text) for _, title, text in passages), str(folder), count=len(passages),
                            fingerprint="test", progress=False, **options)


def test_stopwords_are_lucenes_english_set():
    assert set(bm25.stopwords()) == LUCENE_STOPWORDS and len(bm25.stopwords()) == 33
    assert (bm25.K1, bm25.B, bm25.METHOD) == (0.9, 0.4, "lucene")


QUERIES = ["Nobel prize prizes", "the bridge in London", "Curie's prize", "Japan capital Kyoto", "weather weather",
           "TOWER bridges", "it is what it is", "zebra", "the of and", "Babbage engine 1837",
           "o'neil rock'n'roll band record", "It's"]


def test_bm25_equals_numpy_lucene_bm25(tmp_path):
    # small chunks and blocks: several of each, as a large corpus is built
    index = _build(tmp_path / "index", chunk_passages=4, block_entries=7)
    docs = [_analyze(f"{title} {text}") for _, title, text in PASSAGES]
    vocab = index.model.vocab_dict
    for query, ids in zip(QUERIES, index.query_ids(QUERIES)):
        analysed = _analyze(query)
        assert ids == [vocab[t] for t in analysed if t in vocab], query
        expected = _reference_scores(docs, analysed)
        # bm25s's "lucene" (as Lucene >= 8) leaves out the constant (k1 + 1) of the classic form
        np.testing.assert_allclose(index.scores(ids) * (bm25.K1 + 1), expected, rtol=2e-6, atol=1e-7)
        rows, scores = index.top(ids, 5)
        assert rows.tolist() == _reference_ranking(expected, 5), query
        np.testing.assert_allclose(scores * (bm25.K1 + 1), expected[rows], rtol=2e-6)
    # ties: the duplicate passages 10 and 11 score the same, the lower row first
    rows, scores = index.top(index.query_ids(["Kyoto"])[0], 3)
    assert rows.tolist() == [10, 11] and scores[0] == scores[1]
    assert index.top([], 3)[0].size == 0  # an all-stopword query matches nothing
    # threads change nothing
    one, three = index.search(QUERIES, 4, threads=1, progress=False), index.search(QUERIES, 4, threads=3, progress=False)
    for (r1, s1), (r3, s3) in zip(one, three):
        assert r1.tolist() == r3.tolist() and s1.tolist() == s3.tolist()


def test_passages_without_terms(tmp_path):
    # a whole chunk of passages that analyse to nothing (stopwords only) is indexed as empty rows
    passages = [(1, "", "The of and"), (2, "A", "it is"), (3, "Fox", "The fox ran."), (4, "", "to be")]
    index = _build(tmp_path / "index", passages, chunk_passages=2)
    assert index.count == 4 and index.meta["vocabulary"] == 2  # fox, ran
    rows, scores = index.top(index.query_ids(["fox"])[0], 4)
    assert rows.tolist() == [2]
    docs = [_analyze(f"{title} {text}") for _, title, text in passages]
    np.testing.assert_allclose(scores * (bm25.K1 + 1), _reference_scores(docs, ["fox"])[rows], rtol=2e-6)


def test_chunked_build_equals_bm25s_own_index(tmp_path):
    import bm25s

    ours = _build(tmp_path / "index", chunk_passages=3, block_entries=5)
    docs = [_analyze(f"{title} {text}") for _, title, text in PASSAGES]
    theirs = bm25s.BM25(method="lucene", k1=0.9, b=0.4)
    theirs.index(docs, show_progress=False)

    def dense(model):
        s = model.scores
        out = {}
        for term, t in model.vocab_dict.items():
            if t + 1 < len(s["indptr"]):
                column = np.zeros(len(PASSAGES), np.float32)
                column[np.asarray(s["indices"][s["indptr"][t]:s["indptr"][t + 1]])] = \
                    s["data"][s["indptr"][t]:s["indptr"][t + 1]]
                out[term] = column
        return out

    mine, reference = dense(ours.model), dense(theirs)
    assert set(mine) == set(reference)
    for term in reference:
        np.testing.assert_array_equal(mine[term], reference[term], err_msg=term)
    # and bm25s loads the saved folder as its own (memory-mapped)
    loaded = bm25s.BM25.load(str(tmp_path / "index"), mmap=True)
    assert isinstance(loaded.scores["data"], np.memmap) and loaded.scores["num_docs"] == len(PASSAGES)


class _Corpus:
    def __init__(self, passages):
        self.passages = passages

    def passage(self, row):
        pid, title, text = self.passages[row]
        return str(pid), title, text


def test_distant_supervision_rules():
    # rows: 0-2 hold "1977" in their text, 3-7 do not; row 7's title holds it (titles never count)
    passages = [(f"p{i}", "T", f"It ran in 1977, passage {i}.") for i in range(3)] + \
               [(f"n{i}", "T", f"Nothing here, passage {i}.") for i in range(4)] + [("t", "In 1977", "Nothing.")]
    corpus = _Corpus(passages)
    q = [Question(f"q{i}", ("1977",)) for i in range(5)] + [Question("q5", ("19[0-9]{2}",))]
    rankings = [([3, 4, 1, 5, 0, 6], None),  # negatives ranked above the positive come first
                ([0, 3, 2, 4, 5], None),  # a later answer passage is neither positive nor negative
                ([3, 7, 4, 5], None),  # no positive: left out (the title's 1977 does not count)
                ([2, 6], None),  # fewer negatives than asked
                ([], None),  # nothing retrieved
                ([5, 1], None)]
    rankings = [(rows, [10.0 - i for i in range(len(rows))]) for rows, _ in rankings]
    items, stats = distant_supervision(q, rankings, corpus, hard_negatives=2, depth=6, progress=False)
    assert [item["question"] for item in items] == ["q0", "q1", "q3"]
    assert [[c["passage_id"] for c in item["positive_ctxs"]] for item in items] == [["p1"], ["p0"], ["p2"]]
    assert [[c["passage_id"] for c in item["hard_negative_ctxs"]] for item in items] == \
        [["n0", "n1"], ["n0", "n1"], ["n3"]]
    assert items[0]["positive_ctxs"][0]["score"] == 8.0 and items[0]["hard_negative_ctxs"][1]["score"] == 9.0
    assert (stats.questions, stats.mined, stats.without_positive, stats.hard_negatives) == (6, 3, 3, 5)
    assert stats.mean_hard_negatives == pytest.approx(5 / 3)
    # string vs regex: the pattern matches only as a regex; no hard negatives asked for
    items, stats = distant_supervision(q[5:], rankings[5:], corpus, match="regex", hard_negatives=0, progress=False)
    assert [c["passage_id"] for c in items[0]["positive_ctxs"]] == ["p1"] and items[0]["hard_negative_ctxs"] == []
    assert distant_supervision(q[5:], rankings[5:], corpus, progress=False)[1].mined == 0
    # a string answer is a run of whole tokens: "197" is not in "1977"
    assert distant_supervision([Question("q", ("197",))], rankings[:1], corpus, progress=False)[1].mined == 0


def _expected_items(questions, depth: int, negatives: int, match: str) -> list[tuple[str, list[str]]]:
    """(positive id, hard negative ids) per mined question: reference BM25 ranking, DPR's has_answer oracle."""
    docs = [_analyze(f"{title} {text}") for _, title, text in PASSAGES]
    out = []
    for q in questions:
        ranking = _reference_ranking(_reference_scores(docs, _analyze(q.question)), depth)
        hits = [_oracle_has_answer(list(q.answers), PASSAGES[r][2], match) for r in ranking]
        if any(hits):
            out.append((str(PASSAGES[ranking[hits.index(True)]][0]),
                        [str(PASSAGES[r][0]) for r, h in zip(ranking, hits) if not h][:negatives]))
    return out


def _error(capsys) -> str:
    """The one error line of a refused command (progress bars may precede it on stderr)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("art-jax mine: error: "), lines
    return lines[0]


def _mine(capsys, *args) -> tuple[list[dict], str]:
    capsys.readouterr()
    out = args[args.index("--out") + 1]
    cli.main(["mine", *args])
    with open(out, encoding="utf-8") as f:
        return json.load(f), capsys.readouterr().out.strip()


@pytest.mark.parametrize("match", ["string", "regex"])
def test_mine_bm25_cli_writes_dpr_training_json(match, tmp_path, capsys):
    corpus, questions = _write_corpus(tmp_path / "corpus.tsv"), _write_questions(tmp_path / "q.jsonl")
    out = str(tmp_path / "train.json")
    items, printed = _mine(capsys, "--corpus", corpus, "--questions", questions, "--out", out, "--depth", "6",
                           "--hard-negatives", "2", "--match", match)
    expected = _expected_items(QUESTIONS, 6, 2, match)
    assert [(i["positive_ctxs"][0]["passage_id"], [c["passage_id"] for c in i["hard_negative_ctxs"]])
            for i in items] == expected
    # by hand: the Tokyo question has no positive; the pattern answers only as a regex
    mined = [i["question"] for i in items]
    assert QUESTIONS[4].question not in mined
    assert (QUESTIONS[5].question in mined) == (match == "regex")
    assert items[0]["positive_ctxs"][0]["passage_id"] == "1"
    # DPR's training format, field for field
    for item in items:
        assert list(item) == ["question", "answers", "positive_ctxs", "negative_ctxs", "hard_negative_ctxs"]
        assert item["negative_ctxs"] == [] and len(item["positive_ctxs"]) == 1
        for ctx in item["positive_ctxs"] + item["hard_negative_ctxs"]:
            assert list(ctx) == ["title", "text", "score", "passage_id"] and isinstance(ctx["passage_id"], str)
            assert (ctx["title"], ctx["text"]) == next((t, x) for p, t, x in PASSAGES if str(p) == ctx["passage_id"])
    total = sum(len(i["hard_negative_ctxs"]) for i in items)
    assert len(printed.splitlines()) == 1
    assert f"mined {len(items)} of {len(QUESTIONS)} questions" in printed
    assert f"{total / len(items):.2f} hard negatives per mined question" in printed
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no half file left


def test_bm25_index_saved_reused_and_refused(bert_dir, tmp_path, capsys):
    corpus, questions = _write_corpus(tmp_path / "corpus.tsv"), _write_questions(tmp_path / "q.jsonl")
    folder = str(tmp_path / "bm25")
    base = ["--questions", questions, "--bm25-index", folder, "--depth", "5"]
    first, _ = _mine(capsys, "--corpus", corpus, *base, "--out", str(tmp_path / "a.json"))
    assert os.path.isfile(os.path.join(folder, bm25.META))
    stamp = os.path.getmtime(os.path.join(folder, bm25.DATA))
    again, _ = _mine(capsys, "--corpus", corpus, *base, "--out", str(tmp_path / "b.json"))
    assert again == first and os.path.getmtime(os.path.join(folder, bm25.DATA)) == stamp  # reused, not rebuilt
    # the corpus store prepared from the same file has the same passages: reused too
    store = prepare_corpus(corpus, str(tmp_path / "store"), load_tokenizer(bert_dir), TokenizerSpec(bert_dir, 64),
                           progress=False)
    from_store, _ = _mine(capsys, "--corpus", store.path, *base, "--out", str(tmp_path / "c.json"))
    assert from_store == first and os.path.getmtime(os.path.join(folder, bm25.DATA)) == stamp
    # another corpus: fewer passages, or as many with another text, is refused
    other = list(PASSAGES)
    other[3] = (4, "Pierre Curie", "Pierre Curie was a physicist.")
    for name, passages in (("fewer.tsv", PASSAGES[:-1]), ("changed.tsv", other)):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["mine", "--corpus", _write_corpus(tmp_path / name, passages), *base,
                      "--out", str(tmp_path / "d.json")])
        assert exit_info.value.code == 2
        assert "built for another corpus" in _error(capsys)
    assert not os.path.exists(tmp_path / "d.json")
    # an index built with other settings (here k1) is refused too
    meta_path = os.path.join(folder, bm25.META)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    meta["settings"]["k1"] = 1.2
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    with pytest.raises(UserError, match="other BM25 settings .*k1: 1.2 there, 0.9 here"):
        bm25.open_or_build(folder, list, count=len(PASSAGES), fingerprint=lambda: "", corpus=corpus)
    # a folder that is not such an index is never replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not a BM25 index"):
        bm25.open_or_build(str(tmp_path / "notes"), list, count=1, fingerprint=lambda: "", corpus="x")


def test_mine_dense_equals_numpy_brute_force(tmp_path, capsys):
    from art_jax.retrieval.encoder import load_retriever
    from art_jax.retrieval.index import IndexVersion
    from tests.hf_fixtures import CORPUS, make_bert_checkpoint

    # a wide initialisation: the tiny random BERT's [CLS] vectors then differ from passage to passage
    bert = make_bert_checkpoint(str(tmp_path / "bert"), initializer_range=0.4)
    passages = [(100 + i, f"T{i % 7}", sentence) for i, sentence in enumerate(CORPUS[:48])]
    corpus = _write_corpus(tmp_path / "corpus.tsv", passages)
    questions = [Question("when " + " ".join(s.rstrip(".").split()[:-2]) + "?", (s.rstrip(".").split()[-1],))
                 for s in CORPUS[:48:5]] + [Question("who visited the harbour?", ("Atlantis",))]
    qfile = _write_questions(tmp_path / "q.jsonl", questions)
    store = prepare_corpus(corpus, str(tmp_path / "store"), load_tokenizer(bert), TokenizerSpec(bert, 64),
                           progress=False)
    index = str(tmp_path / "index")
    cli.main(["embed", "--retriever", bert, "--corpus", store.path, "--out", index, "--max-length", "32"])
    depth = 6
    items, printed = _mine(capsys, "--method", "dense", "--retriever", bert, "--index", index, "--corpus", store.path,
                           "--questions", qfile, "--out", str(tmp_path / "train.json"), "--depth", str(depth),
                           "--hard-negatives", "3")
    # numpy brute force over the index's own float16 rows (queries meet them in float16, as the search does)
    embeddings = IndexVersion.open(index).read(0, len(passages)).astype(np.float32)
    q = np.asarray(load_retriever(bert).embed_questions([x.question for x in questions]))
    scores = q.astype(np.float16).astype(np.float32) @ embeddings.T
    expected = []
    for x, s in zip(questions, scores):
        order = np.argsort(-s, kind="stable")
        # no near ties (float32 sums of 32 products of ~25 differ by ~1e-5 between orders): one ranking
        assert np.all(-np.diff(s[order[:depth + 1]]) > 2e-4)
        hits = [_oracle_has_answer(list(x.answers), passages[r][2], "string") for r in order[:depth]]
        if any(hits):
            expected.append((x.question, passages[order[hits.index(True)]][0],
                             [passages[r][0] for r, h in zip(order[:depth], hits) if not h][:3],
                             float(s[order[hits.index(True)]])))
    assert [(i["question"], int(i["positive_ctxs"][0]["passage_id"]),
             [int(c["passage_id"]) for c in i["hard_negative_ctxs"]]) for i in items] == [e[:3] for e in expected]
    np.testing.assert_allclose([i["positive_ctxs"][0]["score"] for i in items], [e[3] for e in expected],
                               rtol=1e-3, atol=1e-3)
    assert 0 < len(items) < len(questions)  # the Atlantis question is left out
    assert f"mined {len(items)} of {len(questions)} questions" in printed
    # an evidence file is refused for dense mining: the index was built from a store
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["mine", "--method", "dense", "--retriever", bert, "--index", index, "--corpus", corpus,
                  "--questions", qfile, "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and "needs a corpus store" in _error(capsys)


@pytest.mark.parametrize("extra, message", [
    (["--corpus", "{tmp}/missing.tsv"], "file not found"),
    (["--corpus", "{corpus}", "--method", "dense"], "--method dense needs --retriever and --index"),
    (["--corpus", "{corpus}", "--method", "dense", "--index", "{tmp}"], "--method dense needs --retriever"),
    (["--corpus", "{corpus}", "--depth", "0"], "--depth must be at least 1"),
    (["--corpus", "{corpus}", "--hard-negatives", "-1"], "--hard-negatives must be 0 or more"),
    (["--corpus", "{corpus}", "--retriever", "x"], "for --method dense only"),
    (["--corpus", "{corpus}", "--out", "{tmp}"], "is a folder, expected a file"),
])
def test_bad_input_exits_2(extra, message, tmp_path, capsys):
    corpus, questions = _write_corpus(tmp_path / "corpus.tsv"), _write_questions(tmp_path / "q.jsonl")
    args = ["--questions", questions, "--out", str(tmp_path / "out.json")] + extra
    args = [a.format(tmp=tmp_path, corpus=corpus) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["mine", *args])
    assert exit_info.value.code == 2
    assert message in _error(capsys)
    assert not os.path.exists(tmp_path / "out.json")
