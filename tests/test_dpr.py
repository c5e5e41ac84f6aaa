"""Supervised DPR and ICT as methods of the loop: training files (DPR JSON, Tevatron JSONL),
a step's examples (positive first, hard negatives drawn per epoch, random fill, static
shapes, every example once per epoch), ICT's pseudo-queries, and both trained through the CLI."""

import json
import os

import numpy as np
import pytest

from art_jax.cli import main
from art_jax.config import apply_override, default_config
from art_jax.core.errors import UserError
from art_jax.core.sharding import make_mesh
from art_jax.data.examples import read_training_examples
from art_jax.data.shuffle import permute
from art_jax.data.tokenization import tokenize_passages, tokenize_questions
from art_jax.methods.dpr import Dpr
from art_jax.methods.ict import Ict, ict_example
from art_jax.models.hf import load_tokenizer
from art_jax.retrieval.encoder import load_retriever
from tests.hf_fixtures import CORPUS


def _ctx(i):
    return {"title": f"ex{i}", "text": CORPUS[i], "passage_id": str(i + 1)}


def _dpr_examples(n=24, hard=(0, 1, 2, 3)):
    """Example e: positive passage e, (e % 4) hard negatives (the passages after it)."""
    return [{"question": f"what did {CORPUS[e].split()[0]} do {e}?", "answers": [str(e)],
             "positive_ctxs": [_ctx(e), _ctx(e + 30)], "negative_ctxs": [_ctx(59)],
             "hard_negative_ctxs": [_ctx(e + 1 + k) for k in range(hard[e % len(hard)])]} for e in range(n)]


@pytest.fixture(scope="module")
def dpr_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpr") / "train.json"
    examples = _dpr_examples()
    examples.append({"question": "no positive", "answers": [], "positive_ctxs": [], "hard_negative_ctxs": []})
    path.write_text(json.dumps(examples))
    return str(path)


def test_reads_dpr_json_dpr_jsonl_and_tevatron(dpr_file, tmp_path):
    training = read_training_examples(dpr_file)
    assert len(training.examples) == 24 and training.without_positive == 1
    first = training.examples[1]
    assert first.positives[0].text == CORPUS[1] and first.positives[0].passage_id == "2"
    assert [p.text for p in first.hard_negatives] == [CORPUS[2]]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(e) + "\n" for e in _dpr_examples()))
    assert read_training_examples(str(jsonl)).examples == training.examples
    tevatron = tmp_path / "tevatron.jsonl"
    tevatron.write_text("".join(json.dumps({
        "query_id": str(i), "query": e["question"],
        "positive_passages": [{"docid": c["passage_id"], "title": c["title"], "text": c["text"]}
                              for c in e["positive_ctxs"]],
        "negative_passages": [{"docid": c["passage_id"], "title": c["title"], "text": c["text"]}
                              for c in e["hard_negative_ctxs"]]}) + "\n" for i, e in enumerate(_dpr_examples())))
    read = read_training_examples(str(tevatron)).examples
    assert [(e.question, e.positives, e.hard_negatives) for e in read] == [
        (e.question, e.positives, e.hard_negatives) for e in training.examples]


@pytest.mark.parametrize("content,message", [
    ('[{"question": "q", "positive_ctxs": [{"title": "t"}]}]', "item 0: positive_ctxs[0] needs a string 'text'"),
    ('{"question": "q", "positive_ctxs": []}\n{"question": ""}\n', "train.jsonl:2: missing or empty 'question'"),
    ('{"query": "q", "positive_passages": {"text": "x"}}\n', "'positive_passages' must be a list"),
    ('[{"question": "q", "positive_ctxs": []}]', "no training example with a positive passage"),
])
def test_bad_training_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_training_examples(str(path))


def test_the_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    for count in (1, 5, 24, 1000):
        order = permute(np.arange(count), count, seed=3, epoch=1)
        assert sorted(order) == list(range(count))
    a, b = permute(np.arange(50), 50, seed=3, epoch=1), permute(np.arange(50), 50, seed=3, epoch=2)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(permute([7, 3], 50, seed=3, epoch=1), a[[7, 3]])


def _cfg(bert_dir, **settings):
    cfg = default_config()
    settings = {"method": "dpr", "retriever.checkpoint": bert_dir, "retriever.question_max_length": 16,
                "retriever.passage_max_length": 32, "retriever.train_passage_max_length": 32,
                "train.batch_size": 8, "train.steps": 4, "train.best_metric": "", "index.progress": False,
                **settings}
    for key, value in settings.items():
        apply_override(cfg, f"config.{key}={value}")
    return cfg


def _texts(method, array, tokenizer):
    return [tokenizer.decode([t for t in row if t != tokenizer.pad_token_id], skip_special_tokens=True)
            for row in np.asarray(array).reshape(-1, array.shape[-1])]


def test_a_step_takes_the_positive_and_drawn_hard_negatives(bert_dir, dpr_file, files, tmp_path):
    cfg = _cfg(bert_dir, **{"data.train_examples": dpr_file, "data.corpus": files[0], "train.hard_negatives": 2})
    Dpr.check_config(cfg)
    method = Dpr(cfg, str(tmp_path), make_mesh())
    assert method.steps_per_epoch == 3 and method.total_steps == 4
    tokenizer = load_tokenizer(bert_dir)
    normalise = lambda s: tokenizer.decode(tokenizer(s)["input_ids"], skip_special_tokens=True)  # noqa: E731
    store = {normalise(f"{method.store.title(r)} {method.store.text(r)}") for r in range(len(method.store))}
    seen = []
    for step in range(3):  # one epoch
        _, indices = method.step_examples(step)
        batch, _ = method.batch(None, step, None)
        assert batch["question_ids"].shape == (1, 8, 16) and batch["passage_ids"].shape == (1, 24, 32)
        passages = _texts(method, batch["passage_ids"], tokenizer)
        for i, e in enumerate(indices):
            own = passages[3 * i:3 * i + 3]
            assert own[0] == normalise(f"ex{e} {CORPUS[e]}")  # the first positive, title first
            available = [normalise(f"ex{e + 1 + k} {CORPUS[e + 1 + k]}") for k in range(e % 4)]
            drawn = [p for p in own[1:] if p in available]
            assert len(drawn) == min(2, e % 4) and len(set(drawn)) == len(drawn)
            # the rest is filled from the corpus store (whose titles differ from the examples')
            assert all(p in store for p in own[1 + len(drawn):]), own
        seen += indices
    assert sorted(seen) == list(range(24))  # every example once in the epoch
    # the same step draws the same; the next epoch draws other hard negatives for example 3
    again, _ = method.batch(None, 1, None)
    np.testing.assert_array_equal(np.asarray(again["passage_ids"]),
                                  np.asarray(method.batch(None, 1, None)[0]["passage_ids"]))
    draws = {tuple(p for _, p in [method._example(3, epoch)][0][1][1:]) for epoch in range(8)}
    assert len(draws) > 1


def test_question_truncation_from_the_left_keeps_the_end(bert_dir):
    tokenizer = load_tokenizer(bert_dir)
    question = "Ada Lovelace visited the bridge near Paris in 1851 and Marie Curie crossed the harbour"
    right = tokenize_questions(tokenizer, [question], 8)
    left = tokenize_questions(tokenizer, [question], 8, truncation_side="left")
    full = tokenizer(question)["input_ids"]
    assert right.ids[0].tolist() == full[:7] + [tokenizer.sep_token_id]
    assert left.ids[0].tolist() == [tokenizer.cls_token_id] + full[-7:]
    assert tokenizer.truncation_side == "right"  # left as it was


def test_ict_pseudo_query_is_a_sentence_removed_from_its_context_nine_times_in_ten():
    sentences = ["One a.", "Two b.", "Three c.", "Four d."]
    rng = np.random.default_rng(0)
    kept = 0
    for _ in range(2000):
        query, (title, context) = ict_example(sentences, "Title", rng)
        assert query in sentences and title == "Title"
        kept += query in context
        assert context.count(".") >= 3
    assert 0.08 < kept / 2000 < 0.12
    assert ict_example(["Alone."], "T", rng)[1] == ("T", "Alone.")


@pytest.fixture(scope="module")
def ict_corpus(tmp_path_factory):
    """Passages of three sentences each."""
    path = tmp_path_factory.mktemp("ict") / "corpus.tsv"
    rows = [" ".join(CORPUS[3 * i:3 * i + 3]) for i in range(len(CORPUS) // 3)]
    path.write_text("id\ttext\ttitle\n" + "".join(f"{i + 1}\t{text}\tP{i}\n" for i, text in enumerate(rows)))
    return str(path)


def test_ict_step_is_fixed_by_seed_and_step(bert_dir, ict_corpus, tmp_path):
    cfg = _cfg(bert_dir, **{"method": "ict", "data.corpus": ict_corpus, "train.hard_negatives": 0,
                            "retriever.train_passage_max_length": 96})  # whole contexts
    Ict.check_config(cfg)
    method = Ict(cfg, str(tmp_path), make_mesh())
    tokenizer = load_tokenizer(bert_dir)
    batch, _ = method.batch(None, 2, None)
    np.testing.assert_array_equal(np.asarray(batch["question_ids"]),
                                  np.asarray(method.batch(None, 2, None)[0]["question_ids"]))
    _, rows = method.step_examples(2)
    questions = _texts(method, batch["question_ids"], tokenizer)
    contexts = _texts(method, batch["passage_ids"], tokenizer)
    normalise = lambda s: tokenizer.decode(tokenizer(s)["input_ids"], skip_special_tokens=True)  # noqa: E731
    kept = 0
    for row, question, context in zip(rows, questions, contexts):
        sentences = CORPUS[3 * row:3 * row + 3]
        [chosen] = [i for i, s in enumerate(sentences) if normalise(s) == question]
        without = " ".join(sentences[:chosen] + sentences[chosen + 1:])
        # the row's own title and text, without its pseudo-query (or, now and then, with it)
        assert context in (normalise(f"P{row} {without}"), normalise(f"P{row} {' '.join(sentences)}"))
        kept += context == normalise(f"P{row} {' '.join(sentences)}")
    assert kept < len(rows) / 2
    with pytest.raises(UserError, match="in-batch negatives only"):
        Ict.check_config(_cfg(bert_dir, **{"method": "ict", "data.corpus": ict_corpus}))


def test_dpr_trains_through_the_cli(bert_dir, dpr_file, files, tmp_path, capsys):
    common = [f"--config.retriever.checkpoint={bert_dir}", "--config.train.batch_size=8", "--config.train.steps=3",
              "--config.retriever.passage_max_length=32", "--config.retriever.train_passage_max_length=32",
              "--config.retriever.question_max_length=16", "--config.index.progress=false",
              "--config.train.eval_topk=(1,5)", "--config.train.best_metric=top5", "--config.train.log_every=1"]
    main(["train", "--config=configs/dpr_nq.py", f"--workdir={tmp_path / 'dpr'}", *common,
          f"--config.data.train_examples={dpr_file}", f"--config.data.corpus={files[0]}", "--config.data.corpus_store=",
          f"--config.data.dev_questions={files[1]}", f"--config.data.dev_examples={dpr_file}",
          "--config.train.best_metric=mrr", "--config.train.accumulation=2", "--config.train.batch_size=16",
          "--config.train.eval_every=3", "--config.retriever.question_truncation=left"])
    out = capsys.readouterr().out
    assert "dev accuracy: top-1" in out and "MRR " in out
    assert "global batch 16 x (1 positive + 1 hard negative(s))" in out
    with open(tmp_path / "dpr" / "metrics.jsonl") as f:
        assert 0 < [json.loads(line) for line in f][-1]["mrr"] <= 1
    # the side questions are cut from travels with the run and its export to search time
    main(["export", "--run", str(tmp_path / "dpr"), "--out", str(tmp_path / "export")])
    for spec in ("dpr", "export"):
        assert load_retriever(str(tmp_path / spec)).question_truncation == "left"
    # an index kept for evaluations only: the newest version alone stays
    assert os.listdir(tmp_path / "dpr" / "index") == ["v000001"]
    assert os.path.isdir(tmp_path / "dpr" / "best")
    # (ICT trains through the CLI in tests/test_mss.py, the first stage of ICT -> MSS -> ART)


def test_proxy_corpus_mrr_equals_numpy_brute_force(bert_dir):
    """DPR-PAQ's in-memory validation: the proxy corpus is every dev example's positives and
    hard negatives once; each question's rank of its best positive, against numpy."""
    from art_jax.data.examples import TrainingExample, TrainingPassage
    from art_jax.retrieval.proxy import ProxyCorpus

    def passage(i):
        return TrainingPassage(f"ex{i}", CORPUS[i], str(i))

    examples = [TrainingExample(f"who {CORPUS[e].split()[1]} the {CORPUS[e].split()[3]}?", (),
                                (passage(e), passage(e + 20)) if e % 3 == 0 else (passage(e),),
                                tuple(passage(e + 1 + k) for k in range(e % 5))) for e in range(0, 40, 2)]
    tokenizer = load_tokenizer(bert_dir)
    proxy = ProxyCorpus.build(examples, tokenizer, question_max_length=16, passage_max_length=32, negatives=3)
    ids = sorted({p.passage_id for e in examples for p in (*e.positives, *e.hard_negatives[:3])})
    assert proxy.count == len(ids)
    tower_q, tower_p = _informative_tower(0), _informative_tower(1)
    ranks = proxy.ranks(tower_q, tower_p, make_mesh(), batch_size=8)
    # the reference: every distinct passage id embedded on its own, ranks by id
    by_id = {p.passage_id: p for e in examples for p in (*e.positives, *e.hard_negatives[:3])}
    tokens = tokenize_passages(tokenizer, [by_id[i].title for i in ids], [by_id[i].text for i in ids], 32, pad_to=32)
    p = np.asarray(tower_p.embed_cls(tokens.ids, tokens.mask), np.float64)
    questions = tokenize_questions(tokenizer, [e.question for e in examples], 16, pad_to=16)
    q = np.asarray(tower_q.embed_cls(questions.ids, questions.mask), np.float64)
    assert np.unique(np.round(q @ p.T, 4)).size > q.shape[0]  # informative: scores differ
    expected = []
    for i, example in enumerate(examples):
        scores = q[i] @ p.T
        own = np.isin(ids, [p.passage_id for p in example.positives])
        expected.append(1 + np.sum(scores[~own] >= scores[own].max()))
    np.testing.assert_array_equal(ranks, expected)
    assert len(set(expected)) > 1
    np.testing.assert_allclose(proxy.mrr(tower_q, tower_p, make_mesh()), np.mean(1 / np.asarray(expected)), rtol=1e-6)


def _informative_tower(seed):
    from art_jax.models.bert import Bert, BertConfig
    from art_jax.models.hf import init_module

    cfg = BertConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                     max_position_embeddings=64, initializer_range=0.4)
    return init_module(Bert, cfg, seed=seed)


def test_paper_configs_load_and_pass_their_checks():
    """The DPR / ICT / DPR-PAQ paper configs: every variant loads, and the loop's and the
    method's checks (before any file is read) accept it."""
    from art_jax.config import load_config
    from art_jax.methods import METHODS
    from art_jax.training.loop import check_loop_config

    for spec in ("configs/dpr_nq.py", "configs/dpr_nq.py:trivia", "configs/dpr_nq.py:nq-dpr", "configs/ict.py",
                 "configs/paq.py", "configs/paq.py:roberta-base"):
        cfg = load_config(spec)
        method = METHODS[cfg.method]
        check_loop_config(cfg, method.eval_metrics(cfg))
        assert cfg.train.batch_size % 8 == 0
    assert load_config("configs/paq.py:roberta-large").retriever.projection
    with pytest.raises(UserError, match="unknown variant 'squad'"):
        load_config("configs/dpr_nq.py:squad")


def test_a_projection_head_is_added_to_towers_without_one(bert_dir):
    from art_jax.methods.common import initial_towers

    question, passage = initial_towers(bert_dir, shared=False, projection=True)
    assert question.config.projection and passage.config.projection and question is not passage
    plain, _ = initial_towers(bert_dir, shared=True)
    assert not plain.config.projection


def test_the_fill_redraws_the_example_s_own_passages():
    from art_jax.methods.contrastive import random_fill

    rng = np.random.default_rng(0)
    draws = random_fill(rng, 3, 2000, lambda d: d == 0)
    assert set(draws.tolist()) == {1, 2}
    assert random_fill(rng, 1, 3, lambda d: d == 0).tolist() == [0, 0, 0]  # nothing else to draw: gives up


def test_older_index_versions_are_removed_unpublished_first(tmp_path):
    from art_jax.retrieval.index import published_versions, remove_versions_before

    for version, published in ((0, True), (1, False), (2, True), (3, True)):
        folder = tmp_path / f"v{version:06d}"
        folder.mkdir()
        (folder / "chunk").write_text("x")
        if published:
            (folder / "meta.json").write_text("{}")
    remove_versions_before(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["v000002", "v000003"] and published_versions(str(tmp_path)) == [2, 3]
