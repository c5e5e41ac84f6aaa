"""Reader inputs against Hugging Face's tokenizer called as FiD's collator calls it (padding to
max_length, truncation keeping the closing special token), EMDR2's [CLS] q [SEP] t [SEP] text [SEP]
built piece by piece, article continuation from a corpus store, answer targets, bad templates."""

import json

import numpy as np
import pytest

from art_jax.core.errors import UserError
from art_jax.data.corpus import TokenizerSpec, prepare_corpus
from art_jax.data.reader_inputs import (
    FORMATS,
    article_continuation,
    encode_answers,
    encode_reader_batch,
    encode_reader_inputs,
    fill_from_article,
    resolve_format,
    sample_answer,
)
from art_jax.data.tokenizers import train_unigram, train_wordpiece
from tests.hf_fixtures import CORPUS

# the fid preset's words in the vocabulary, so that no test input holds <unk>
VOCABULARY = CORPUS + ["question: title: context:"] * 20
QUESTIONS = ["Who visited the bridge?", "When was the castle painted?"]
PASSAGES = [[("Paris", CORPUS[0] + " " + CORPUS[7]), ("Kyoto", CORPUS[13]), ("Lagos", CORPUS[30] + " " + CORPUS[2])],
            [("Kyoto", CORPUS[41]), ("Paris", CORPUS[5] + " " + CORPUS[60]), ("Paris", CORPUS[99])]]


@pytest.fixture(scope="module")
def t5():
    return train_unigram(VOCABULARY, 200)


@pytest.fixture(scope="module")
def bert():
    return train_wordpiece(VOCABULARY, 300)


def _fid_collator(tokenizer, texts, max_length):
    """FiD's src/data.py encode_passages: batch_encode_plus(passages, max_length, padding to it, truncation)."""
    out = tokenizer(texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="np")
    return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("max_length", [9, 16, 64])
@pytest.mark.parametrize("name", ["t5", "bert"])
def test_fid_format_is_fids_tokenizer_call(name, max_length, request):
    tokenizer = request.getfixturevalue(name)
    template = resolve_format("fid", "--reader-format")
    ids, mask = encode_reader_inputs(tokenizer, QUESTIONS[0], PASSAGES[0], template, max_length)
    # FiD's Dataset: "question:" + " " + question, then "title: {} context: {}" per passage, joined by a space
    texts = ["question: " + QUESTIONS[0] + " " + "title: {} context: {}".format(*p) for p in PASSAGES[0]]
    expected_ids, expected_mask = _fid_collator(tokenizer, texts, max_length)
    assert ids.dtype == np.int32 and ids.shape == (3, max_length)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)
    assert tokenizer.unk_token_id not in ids
    closing = tokenizer.eos_token_id if name == "t5" else tokenizer.sep_token_id
    lengths = mask.sum(-1)
    assert np.all(ids[np.arange(3), lengths - 1] == closing)  # the last real token, cut or not
    assert (max_length < 64) == bool(np.all(lengths == max_length))  # the short lengths do cut
    assert np.all(ids[mask == 0] == tokenizer.pad_token_id)


def test_batch_is_each_question_stacked(t5):
    template = FORMATS["fid"]
    ids, mask = encode_reader_batch(t5, QUESTIONS, PASSAGES, template, 20)
    assert ids.shape == mask.shape == (2, 3, 20)
    for i, question in enumerate(QUESTIONS):
        one_ids, one_mask = encode_reader_inputs(t5, question, PASSAGES[i], template, 20)
        np.testing.assert_array_equal(ids[i], one_ids)
        np.testing.assert_array_equal(mask[i], one_mask)
    with pytest.raises(UserError, match="question 1 has 2 passages"):
        encode_reader_batch(t5, QUESTIONS, [PASSAGES[0], PASSAGES[1][:2]], template, 20)
    with pytest.raises(UserError, match="question 0 is empty"):
        encode_reader_batch(t5, [" ", QUESTIONS[1]], PASSAGES, template, 20)


@pytest.mark.parametrize("max_length", [12, 64])
def test_emdr2_format_is_built_from_its_pieces(bert, max_length):
    """[CLS] q [SEP] t [SEP] text [SEP] from each piece's ids, cut to N - 1 then [SEP] (EMDR2's
    query_single_context_t5_format); BERT's own [CLS]/[SEP] not added again."""
    template = resolve_format("emdr2", "reader.format")
    ids, mask = encode_reader_inputs(bert, QUESTIONS[1], PASSAGES[1], template, max_length)

    def pieces(text):
        return bert(text, add_special_tokens=False)["input_ids"]

    cls, sep = bert.cls_token_id, bert.sep_token_id
    for (title, text), row, row_mask in zip(PASSAGES[1], ids, mask):
        expected = [cls] + pieces(QUESTIONS[1]) + [sep] + pieces(title) + [sep] + pieces(text)
        expected = expected[:max_length - 1] + [sep]
        assert row[:row_mask.sum()].tolist() == expected
        assert bert.unk_token_id not in row
    assert (max_length == 12) == bool(mask.all())


@pytest.mark.parametrize("value, message", [
    ("title: {title} context: {text}", "neither a preset"),
    ("fidd", "neither a preset"),
    ("question: {question} passage: {passage}", r"unknown field\(s\) \{passage\}"),
    ("{} {question}", r"unknown field\(s\) \{\}"),
    ("question: {question.upper} {text}", r"\{question.upper\}"),
    ("question: {question context: {text}", "cannot read the template"),
])
def test_bad_templates_are_one_line_naming_the_key(value, message):
    with pytest.raises(UserError, match=message) as err:
        resolve_format(value, "--reader-format")
    assert str(err.value).startswith("--reader-format: ") and "\n" not in str(err.value)


def test_custom_template_and_presets():
    assert resolve_format("Q: {question}", "k") == "Q: {question}"  # no passage: a closed-book reader
    assert resolve_format("{text} {question} {title}", "k") == "{text} {question} {title}"
    assert resolve_format("fid", "k") == "question: {question} title: {title} context: {text}"
    assert resolve_format("emdr2", "k") == "[CLS] {question} [SEP] {title} [SEP] {text} [SEP]"


@pytest.mark.parametrize("max_tokens", [3, 6, 32])
def test_answers_are_fids_target_call(t5, max_tokens):
    answers = ["Ada Lovelace", "the river Thames in 1851", "Kyoto"]
    labels, mask = encode_answers(t5, answers, max_tokens)
    expected_ids, expected_mask = _fid_collator(t5, answers, max_tokens)
    np.testing.assert_array_equal(labels, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)
    assert labels.dtype == np.int32 and np.all(labels[mask == 0] == 0)
    assert np.all(labels[np.arange(3), mask.sum(-1) - 1] == t5.eos_token_id)
    assert t5.unk_token_id not in labels
    assert (max_tokens < 32) == bool(mask[1].all())  # the long answer is cut below 32


def test_answers_end_with_sep_when_the_tokenizer_has_no_eos(bert):
    """A T5 with BERT's vocabulary (EMDR2's) ends its answers with [SEP]; a tokenizer with neither
    token is refused."""
    from transformers import PreTrainedTokenizerFast

    labels, mask = encode_answers(bert, ["Kyoto Tower"], 8)
    length = int(mask.sum())
    assert labels[0, length - 1] == bert.sep_token_id
    assert labels[0, :length - 1].tolist() == bert("Kyoto Tower", add_special_tokens=False)["input_ids"]
    with pytest.raises(UserError, match="no eos"):
        encode_answers(PreTrainedTokenizerFast(tokenizer_object=bert.backend_tokenizer), ["Kyoto"], 8)


def test_sample_answer_is_seeded():
    answers = ["Kyoto", "Paris", "Lagos"]
    draws = [sample_answer(answers, rng) for rng in [np.random.default_rng(7)] for _ in range(60)]
    assert draws == [sample_answer(answers, rng) for rng in [np.random.default_rng(7)] for _ in range(60)]
    assert set(draws) == set(answers)
    with pytest.raises(UserError, match="without gold answers"):
        sample_answer([], np.random.default_rng(0))


def _store(tmp_path, bert, rows, name):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"id": i, "title": title, "text": text}) + "\n" for i, title, text in rows))
    return prepare_corpus(str(path), str(tmp_path / name), bert, TokenizerSpec("bert", 32), progress=False)


def test_article_continuation_from_a_corpus_store(tmp_path, bert):
    rows = [(1, "Paris", CORPUS[0]), (2, "Paris", CORPUS[1]), (3, "Paris", CORPUS[2]), (4, "Kyoto", CORPUS[3]),
            (5, "Kyoto", CORPUS[4]), (7, "Kyoto", CORPUS[5])]  # id 6 missing: 7 starts elsewhere
    store = _store(tmp_path, bert, rows, "int")
    assert list(article_continuation(store, 0)) == CORPUS[1:3]
    assert list(article_continuation(store, 2)) == []  # the article's last passage
    assert list(article_continuation(store, 3)) == [CORPUS[4]]  # stops at the id gap
    assert list(article_continuation(store, 5)) == []  # the store's last row
    named = _store(tmp_path, bert, [(f"d{i}", title, text) for i, title, text in rows], "str")
    assert list(article_continuation(named, 3)) == CORPUS[4:6]  # string ids: the rows alone


def test_fill_from_article_reads_only_what_it_needs(t5):
    def following():
        yield CORPUS[1]
        yield CORPUS[2]
        raise AssertionError("read past the words needed")

    words = len(CORPUS[0].split())
    assert fill_from_article(CORPUS[0], following(), words) == CORPUS[0]
    assert fill_from_article(CORPUS[0], following(), words + 1) == CORPUS[0] + " " + CORPUS[1]
    assert fill_from_article(CORPUS[0], iter(CORPUS[1:2]), 10 ** 6) == CORPUS[0] + " " + CORPUS[1]
    # N words fill N tokens: the filled passage reaches the cut
    filled = fill_from_article(CORPUS[0], iter(CORPUS[1:20]), 48)
    ids, mask = encode_reader_inputs(t5, QUESTIONS[0], [("Paris", filled)], FORMATS["fid"], 48)
    assert mask.all() and ids[0, -1] == t5.eos_token_id
