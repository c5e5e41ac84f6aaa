"""Inputs in object storage, read through a cached local copy. TensorFlow's in-memory
filesystem (ram://) stands in for gs://: both go through tf.io.gfile."""

import json
import os

import jax
import numpy as np
import pytest

from art_jax.core.errors import UserError
from art_jax.core.remote import local_copy
from art_jax.core.storage import tensorflow
from art_jax.data.corpus import CorpusStore, TokenizerSpec, prepare_corpus
from art_jax.data.questions import read_questions
from art_jax.models.hf import load_bert, load_tokenizer
from tests.hf_fixtures import CORPUS

gfile = tensorflow().io.gfile


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ART_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _upload(local, url):
    """A local file or flat folder copied to ``url``."""
    if os.path.isdir(local):
        gfile.makedirs(url)
        for name in os.listdir(local):
            gfile.copy(os.path.join(local, name), f"{url}/{name}", overwrite=True)
    else:
        gfile.copy(local, url, overwrite=True)


def _questions(path, count):
    path.write_text("".join(json.dumps({"question": f"who wrote book {i}?", "answers": [str(i)]}) + "\n"
                            for i in range(count)))
    return str(path)


def test_a_remote_file_is_copied_once_and_again_when_it_changes(tmp_path, cache, monkeypatch):
    _upload(_questions(tmp_path / "q.jsonl", 3), "ram://bucket/nq/q.jsonl")
    copies = []
    real_copy = gfile.copy
    monkeypatch.setattr(gfile, "copy", lambda *a, **k: (copies.append(a[0]), real_copy(*a, **k)))

    path = local_copy("ram://bucket/nq/q.jsonl")
    assert path == str(cache / "ram" / "bucket" / "nq" / "q.jsonl")  # names the object it copies
    assert [q.question for q in read_questions("ram://bucket/nq/q.jsonl")] == [f"who wrote book {i}?"
                                                                               for i in range(3)]
    assert copies == ["ram://bucket/nq/q.jsonl"]  # read_questions used the cached copy

    gfile.remove("ram://bucket/nq/q.jsonl")  # (overwriting appends in TensorFlow's ram:// filesystem)
    real_copy(_questions(tmp_path / "q5.jsonl", 5), "ram://bucket/nq/q.jsonl")
    assert len(read_questions("ram://bucket/nq/q.jsonl")) == 5  # the object changed: fetched again
    assert len(copies) == 2
    assert local_copy(str(tmp_path / "q.jsonl")) == str(tmp_path / "q.jsonl")  # local paths stay


def test_a_bad_line_names_the_copy_of_the_object_and_a_missing_object_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine?", "answers": ["a"]}\n{"question": \n')
    _upload(str(bad), "ram://bucket/bad.jsonl")
    with pytest.raises(UserError, match=r"bucket/bad\.jsonl:2: invalid JSON"):
        read_questions("ram://bucket/bad.jsonl")
    with pytest.raises(UserError, match="not found: ram://bucket/absent.jsonl"):
        read_questions("ram://bucket/absent.jsonl")


def test_a_remote_corpus_store_and_checkpoint_read_like_local_ones(tmp_path, bert_dir):
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("id\ttext\ttitle\n" + "".join(f"{i + 1}\t{s}\tT{i}\n" for i, s in enumerate(CORPUS[:30])))
    _upload(str(corpus), "ram://bucket/corpus.tsv")
    tokenizer = load_tokenizer(bert_dir)
    local = prepare_corpus(str(corpus), str(tmp_path / "store"), tokenizer, TokenizerSpec(bert_dir, 32),
                           progress=False)
    from_remote_tsv = prepare_corpus("ram://bucket/corpus.tsv", str(tmp_path / "store2"), tokenizer,
                                     TokenizerSpec(bert_dir, 32), progress=False)
    assert from_remote_tsv.meta["source"] == "ram://bucket/corpus.tsv"

    _upload(str(tmp_path / "store"), "ram://bucket/store")
    remote = CorpusStore("ram://bucket/store")  # memory-mapped from the local copy
    for store in (remote, from_remote_tsv):
        np.testing.assert_array_equal(store.ids, local.ids)
        rows = np.arange(len(local))
        np.testing.assert_array_equal(store.retriever_tokens(rows, 32).ids, local.retriever_tokens(rows, 32).ids)
        assert [store.text(r) for r in rows] == [local.text(r) for r in rows]

    _upload(bert_dir, "ram://bucket/bert")
    ids = np.asarray(tokenizer(["a remote tower"], return_tensors="np")["input_ids"], np.int32)
    mask = np.ones_like(ids)
    np.testing.assert_array_equal(jax.device_get(load_bert("ram://bucket/bert").embed_cls(ids, mask)),
                                  jax.device_get(load_bert(bert_dir).embed_cls(ids, mask)))


def test_sizing_a_remote_model_reads_its_config_alone(tmp_path, cache, bert_dir, t5_v10_dir):
    """--dry-run of a run starting from URL folders reads each config.json, never the weights: a
    checkpoint folder's, an export's question tower and reader/, a run's models/; a folder without
    one, or a reader that is no T5, is named.
    (Its own bucket: ram:// appends to an object written twice.)"""
    from art_jax.models.hf import read_config
    from art_jax.models.shapes import hf_config
    from art_jax.training.dry_run import reader_config, tower_config

    _upload(bert_dir, "ram://sizing/bert")
    _upload(t5_v10_dir, "ram://sizing/t5")
    for role, local in (("question_encoder", bert_dir), ("passage_encoder", bert_dir), ("reader", t5_v10_dir)):
        _upload(local, f"ram://sizing/export/{role}")
    assert tower_config("ram://sizing/bert") == tower_config("ram://sizing/export") == read_config(bert_dir)
    assert reader_config("ram://sizing/t5") == reader_config("ram://sizing/export/") == read_config(t5_v10_dir)
    assert hf_config("ram://sizing/t5/") == read_config(t5_v10_dir)
    # a run (or one of its checkpoints): the models/ROLE/ folders it starts from
    gfile.makedirs("ram://sizing/run/checkpoints/4")
    (tmp_path / "run_config.json").write_text("{}")
    _upload(str(tmp_path / "run_config.json"), "ram://sizing/run/config.json")
    _upload(bert_dir, "ram://sizing/run/models/question")
    _upload(t5_v10_dir, "ram://sizing/run/models/reader")
    for spec in ("ram://sizing/run", "ram://sizing/run/checkpoints/4"):
        assert tower_config(spec) == read_config(bert_dir) and reader_config(spec) == read_config(t5_v10_dir)
    assert not cache.exists() or not any(cache.iterdir())  # nothing copied
    gfile.makedirs("ram://sizing/empty")
    with pytest.raises(UserError, match="checkpoint folder ram://sizing/empty has no config.json"):
        reader_config("ram://sizing/empty")
    with pytest.raises(UserError, match="ram://sizing/bert: not a reader .* model_type='bert'"):
        reader_config("ram://sizing/bert")
