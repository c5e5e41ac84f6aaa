"""Embedding a corpus store into versioned indexes: parity, resume after a kill, atomic
publication, and the prepare-corpus -> embed -> search -> evaluate command chain."""

import json
import os

import jax
import numpy as np
import pytest

from art_jax import cli
from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.data.corpus import CorpusStore, TokenizerSpec, prepare_corpus
from art_jax.evaluation.answers import has_answer
from art_jax.models.hf import load_tokenizer
from art_jax.retrieval import embed
from art_jax.retrieval.embed import embed_corpus, load_passage_tower
from art_jax.retrieval.encoder import DualEncoder
from art_jax.retrieval.index import IndexBuilder, IndexVersion, published_versions
from tests.hf_fixtures import CORPUS
from tests.multiprocess import run_two_processes

TITLES = ["Paris notes", "", "Kyoto", "A very long title about bridges and castles"]


def _write_corpus(path, n=len(CORPUS)):
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for i in range(n):
            text = " ".join([CORPUS[i]] * (1 + i % 5))  # some passages cut at max length
            f.write(f"{1000 + i}\t{text}\t{TITLES[i % len(TITLES)]}\n")
    return str(path)


@pytest.fixture(scope="module")
def store(bert_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    corpus = _write_corpus(folder / "corpus.tsv")
    return prepare_corpus(corpus, str(folder / "store"), load_tokenizer(bert_dir), TokenizerSpec(bert_dir, 128),
                          progress=False)


@pytest.fixture(scope="module")
def tower(bert_dir):
    return load_passage_tower(bert_dir)[0]


def _embed(tower, store, index_dir, **kwargs):
    defaults = dict(checkpoint="bert", chunk_rows=48, batch_size=16, max_length=40, progress=False)
    return embed_corpus(tower, store, str(index_dir), **{**defaults, **kwargs})


@pytest.mark.parametrize("devices", ["all", "one"])
def test_embeddings_equal_the_encoder_on_the_raw_strings(tower, store, bert_dir, tmp_path, monkeypatch, devices):
    """On one CPU device each batch runs in slices of rows (here of one or two: 64 tokens a slice
    at most, batches of 16 rows of 32 or 40 tokens)."""
    sliced = []
    real_embed_as = embed._embed_as
    monkeypatch.setattr(embed, "_embed_as", lambda *args: sliced.append(args[-1]) or real_embed_as(*args))
    monkeypatch.setattr(embed, "CPU_SLICE_TOKENS", 64)
    if devices == "one":
        every = jax.local_devices()
        monkeypatch.setattr(jax, "local_devices", lambda: every[:1])
    version = IndexVersion.open(_embed(tower, store, tmp_path / "index", dtype="float16"))
    assert sliced and (min(sliced) > 1 if devices == "one" else set(sliced) == {1})
    rows = np.arange(len(store))
    encoder = DualEncoder.from_pretrained(bert_dir)
    encoder.passage_max_length = 40
    want = np.asarray(encoder.embed_passages([store.title(r) for r in rows], [store.text(r) for r in rows]))
    got = version.read(0, version.count).astype(np.float32)
    np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float32), atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(version.ids, store.ids)
    assert version.meta["count"] == len(store) and version.meta["dim"] == want.shape[1]
    assert version.meta["dtype"] == "float16" and version.meta["checkpoint"] == "bert"
    assert version.meta["corpus"] == store.path


def test_cpu_slices_hold_the_most_rows_that_fit_and_divide_the_batch():
    assert [embed.slice_rows(128, length) for length in (32, 96, 160, 192, 256, 512, 1024, 2048)] == \
        [32, 8, 4, 4, 4, 2, 1, 1]
    assert embed.slice_rows(96, 192) == 4 and embed.slice_rows(100, 256) == 4 and embed.slice_rows(7, 256) == 1


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, chunks: int) -> list[int]:
    """Makes the build die after writing ``chunks`` chunks; returns the list of written ones."""
    written = []
    real_write = IndexBuilder.write_chunk

    def write(self, chunk, embeddings):
        if len(written) == chunks:
            raise _Killed
        real_write(self, chunk, embeddings)
        written.append(chunk)

    monkeypatch.setattr(IndexBuilder, "write_chunk", write)
    return written


def _url(path) -> str:
    """A file:// URL: the code that writes gs:// indexes (tf.io.gfile for the small files,
    tensorstore for the array, no folder renames), run on local disk."""
    return f"file://{path}"


@pytest.mark.parametrize("place", [str, _url])
def test_killed_embed_resumes_without_redoing_finished_chunks(tower, store, tmp_path, monkeypatch, place):
    reference = IndexVersion.open(_embed(tower, store, tmp_path / "reference", dtype="bfloat16"))
    index_dir = place(tmp_path / "index")
    first = _kill_after(monkeypatch, 2)
    with pytest.raises(_Killed):
        _embed(tower, store, index_dir, dtype="bfloat16")
    # nothing is published: readers see no index at all
    assert published_versions(index_dir) == []
    with pytest.raises(UserError, match="no published index version"):
        IndexVersion.open(index_dir)

    monkeypatch.undo()
    # a marker's temporary file, as an earlier writer could leave behind, is no finished chunk
    (tmp_path / "index" / "v000000" / "done" / ".00000005.tmp").write_text("")
    written = _kill_after(monkeypatch, 10 ** 6)
    resumed = IndexVersion.open(_embed(tower, store, index_dir, dtype="bfloat16"))
    assert resumed.path == f"{index_dir}/v000000"
    total = -(-len(store) // 48)
    assert sorted(first + written) == list(range(total)) and not set(first) & set(written)
    np.testing.assert_array_equal(resumed.read(0, resumed.count), reference.read(0, reference.count))


def test_a_changed_plan_starts_the_build_over(tower, store, tmp_path, monkeypatch):
    _kill_after(monkeypatch, 1)
    with pytest.raises(_Killed):
        _embed(tower, store, tmp_path / "index", dtype="float16")
    monkeypatch.undo()
    version = IndexVersion.open(_embed(tower, store, tmp_path / "index", dtype="bfloat16"))
    clean = IndexVersion.open(_embed(tower, store, tmp_path / "clean", dtype="bfloat16"))
    assert version.meta["dtype"] == "bfloat16" and version.array.dtype.name == "bfloat16"
    np.testing.assert_array_equal(version.read(0, version.count), clean.read(0, clean.count))


@pytest.mark.parametrize("place", [str, _url])
def test_readers_see_only_published_versions(tower, store, tmp_path, monkeypatch, place):
    index_dir = place(tmp_path / "index")
    first = _embed(tower, store, index_dir)
    _kill_after(monkeypatch, 0)
    with pytest.raises(_Killed):
        _embed(tower, store, index_dir)
    assert os.path.isdir(tmp_path / "index" / "v000001")  # built in place, unpublished
    assert IndexVersion.open(index_dir).path == first
    monkeypatch.undo()

    # killed in publishing: every chunk and ids.npy written, meta.json not yet
    real_write_text = storage.write_text

    def write_text(path, text):
        if path.endswith("v000001/meta.json"):
            raise _Killed
        real_write_text(path, text)

    monkeypatch.setattr(storage, "write_text", write_text)
    with pytest.raises(_Killed):
        _embed(tower, store, index_dir)
    assert os.path.isfile(tmp_path / "index" / "v000001" / "ids.npy")
    assert published_versions(index_dir) == [0] and IndexVersion.open(index_dir).path == first
    with pytest.raises(UserError, match="no published index version"):
        IndexVersion.open(f"{index_dir}/v000001")
    monkeypatch.undo()

    second = _embed(tower, store, index_dir)
    assert second.endswith("v000001") and IndexVersion.open(index_dir).path == second
    assert IndexVersion.open(first).meta["version"] == 0  # a version folder opens directly
    with pytest.raises(UserError, match="already published"):
        _embed(tower, store, index_dir, version=1)


def test_prepare_embed_search_evaluate_commands(bert_dir, tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "corpus.tsv")
    questions = tmp_path / "questions.tsv"
    questions.write_text("who visited the bridge near paris\t[\"Paris\"]\n"
                         "what did marie curie paint\t['castle', \"harbour\"]\n"
                         "which fox crossed the harbour in 1977\t[\"Lagos\", \"1977\"]\n", encoding="utf-8")
    store, index, results = (str(tmp_path / name) for name in ("store", "index", "results.json"))
    cli.main(["prepare-corpus", "--corpus", corpus, "--retriever", bert_dir, "--out", store])
    cli.main(["embed", "--retriever", bert_dir, "--corpus", store, "--out", index, "--chunk-rows", "50",
              "--batch-size", "8", "--max-length", "64"])
    cli.main(["search", "--retriever", bert_dir, "--index", index, "--questions", str(questions),
              "--topk", "20", "--out", results, "--rows-per-device", "8"])
    capsys.readouterr()
    cli.main(["evaluate", "--results", results, "--topk", "1", "5", "20"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    output = json.load(open(results, encoding="utf-8"))
    corpus_rows = {int(line.split("\t")[0]): line.rstrip("\n").split("\t") for line in open(corpus)
                   if not line.startswith("id\t")}
    version = IndexVersion.open(index)
    encoder = DualEncoder.from_pretrained(bert_dir)
    q = np.asarray(encoder.embed_questions([item["question"] for item in output]))
    scores = q.astype(np.float16).astype(np.float64) @ version.read(0, version.count).astype(np.float64).T
    hits = []
    for item, row_scores in zip(output, scores):
        assert len(item["ctxs"]) == 20
        want = np.sort(row_scores)[::-1][:20]
        np.testing.assert_allclose([c["score"] for c in item["ctxs"]], want, rtol=1e-5)
        for ctx in item["ctxs"]:
            _, text, title = corpus_rows[int(ctx["id"])]
            assert (ctx["text"], ctx["title"]) == (text, title)
            assert ctx["has_answer"] == has_answer(item["answers"], text)
        hits.append([c["has_answer"] for c in item["ctxs"]])
    hits = np.asarray(hits)
    assert report["top_k"] == {str(k): float(hits[:, :k].any(1).mean()) for k in (1, 5, 20)}


def test_search_against_a_different_corpus_is_refused(tower, store, tmp_path, bert_dir):
    from art_jax.retrieval.results import open_corpus_for

    version = IndexVersion.open(_embed(tower, store, tmp_path / "index"))
    other = prepare_corpus(_write_corpus(tmp_path / "small.tsv", n=30), str(tmp_path / "small"),
                           load_tokenizer(bert_dir), TokenizerSpec(bert_dir, 64), progress=False)
    with pytest.raises(UserError, match="does not match index"):
        open_corpus_for(version, other.path)
    assert len(open_corpus_for(version, None)) == len(store)
    assert isinstance(open_corpus_for(version, store.path), CorpusStore)


def test_two_processes_embed_their_own_chunks_into_one_version(tower, store, bert_dir, tmp_path):
    single = IndexVersion.open(_embed(tower, store, tmp_path / "single"))
    run_two_processes("embed", bert_dir, store.path, str(tmp_path / "index"))
    both = IndexVersion.open(str(tmp_path / "index"))
    assert both.meta["count"] == single.meta["count"] and published_versions(str(tmp_path / "index")) == [0]
    np.testing.assert_array_equal(both.ids, single.ids)
    np.testing.assert_allclose(both.read(0, both.count).astype(np.float32),
                               single.read(0, single.count).astype(np.float32), atol=2e-3, rtol=2e-3)
