"""The ART teacher scorer against an independent oracle: transformers' T5 on PyTorch CPU.

The oracle builds the teacher prompt on its own, from the recipe text (docs/art-recipe.md,
"Teacher score"), not with art_jax's PromptBuilder: encoder = tok("Passage: ") + tok(title)
+ tok(text), cut from the end so that it, tok(verbalizer) and </s> fit; target =
tok("Question: " + q) cut to max - 1, then </s>; score = mean over ALL target tokens of
log p(token | prefix, passage).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from art_jax.core.errors import UserError
from art_jax.core.sharding import make_mesh
from art_jax.data.prompts import PromptBuilder, PromptConfig
from art_jax.models.hf import load_tokenizer
from art_jax.teachers.t5 import T5Scorer
from tests.hf_fixtures import CORPUS

# The recipe's strings, written out here rather than read from PromptConfig.
HEAD = "Passage: "
VERBALIZER = " . Please write a question based on this passage."
QUESTION_PREFIX = "Question: "

LONG_TEXT = " ".join(CORPUS[:80])  # far over 512 ids with the fixtures' tiny tokenizer
LONG_QUESTION = "When was the old castle near Kyoto painted by the committee, and who crossed the harbour? " * 8

# Mixed lengths, deliberately not in length order: the scorer sorts by prompt length
# internally and must hand the scores back in input order.
PAIRS = [
    ("Ada Lovelace", "Ada Lovelace visited the bridge near Paris in 1851.", "Who visited the bridge?"),
    ("the river Thames", LONG_TEXT, "Which river crossed the old castle?"),
    ("", "The committee painted the harbour near Kyoto in 1920.", "What did the committee paint?"),
    ("Marie Curie", "x", "Where?"),
    ("A", "a small brown fox crossed the laboratory near Lagos in 1977.", LONG_QUESTION),
    ("Kyoto", "Marie Curie described the laboratory near Kyoto in 1920. " * 3, "Who described the laboratory?"),
    ("", "harbour", "When was the castle painted?"),
    ("The committee", "The committee crossed the bridge near Paris in 1851.", "Who crossed the bridge near Paris?"),
    ("Zürich", "Ünïcode text the tokenizer has never seen: ¿¡ 東京", "What is this?"),
    ("a small brown fox", "a small brown fox visited the old castle.", "Which animal visited the old castle?"),
]

# Small limits for these fixtures: the tiny tokenizer is nearly character-level, so the
# verbalizer alone takes about 46 ids; 72 leaves about 16 ids for "Passage: " + title + text.
SMALL = dict(max_encoder_tokens=72, max_decoder_tokens=6)
DEFAULT = dict(max_encoder_tokens=512, max_decoder_tokens=128)


# ---------------------------------------------------------------------------------------
# The oracle


@functools.lru_cache(maxsize=None)
def _hf(folder: str):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def oracle_prompt(tokenizer, title: str, text: str, question: str, *, max_encoder_tokens: int,
                  max_decoder_tokens: int, head: str = HEAD, verbalizer: str = VERBALIZER):
    def ids(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    tail = ids(verbalizer) + [eos]
    passage = ids(head) + ids(title) + ids(text)
    encoder = passage[:max_encoder_tokens - len(tail)] + tail
    target = tokenizer(QUESTION_PREFIX + question)["input_ids"]
    assert target[-1] == eos  # the tokenizer appends </s>; cut before it, then put it back
    target = target[:-1][:max_decoder_tokens - 1] + [eos]
    return encoder, target


def oracle_scores(folder: str, pairs, *, max_encoder_tokens: int = 512, max_decoder_tokens: int = 128,
                  head: str = HEAD, verbalizer: str = VERBALIZER) -> np.ndarray:
    """ART teacher scores from transformers' T5 (float32, eval mode, one padded batch)."""
    model, tokenizer = _hf(folder)
    prompts = [oracle_prompt(tokenizer, *pair, max_encoder_tokens=max_encoder_tokens,
                             max_decoder_tokens=max_decoder_tokens, head=head, verbalizer=verbalizer)
               for pair in pairs]
    enc_len = max(len(e) for e, _ in prompts)
    dec_len = max(len(d) for _, d in prompts)
    input_ids = torch.zeros((len(prompts), enc_len), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(prompts), dec_len), -100, dtype=torch.long)
    for i, (enc, dec) in enumerate(prompts):
        input_ids[i, :len(enc)] = torch.tensor(enc)
        attention_mask[i, :len(enc)] = 1
        labels[i, :len(dec)] = torch.tensor(dec)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    mask = labels != -100
    picked = torch.gather(log_probs, -1, labels.clamp(min=0)[..., None])[..., 0]
    return ((picked * mask).sum(-1) / mask.sum(-1)).numpy()


def _split(pairs):
    titles, texts, questions = (list(x) for x in zip(*pairs))
    return titles, texts, questions


@pytest.fixture(scope="module")
def scorers_f32(t5_v10_dir, t5_v11_dir):
    """Float32 scorers without a mesh, one per checkpoint version and prompt size."""
    cache = {}

    def get(version, limits):
        folder = {"1.0": t5_v10_dir, "1.1": t5_v11_dir}[version]
        key = (version, tuple(sorted(limits.items())))
        if key not in cache:
            cache[key] = T5Scorer.from_pretrained(folder, dtype="float32", prompt=PromptConfig(**limits))
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------
# 1. Score parity


@pytest.mark.parametrize("limits", [DEFAULT, SMALL], ids=["default", "small"])
@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_scores_match_transformers(version, limits, scorers_f32, t5_v10_dir, t5_v11_dir):
    folder = {"1.0": t5_v10_dir, "1.1": t5_v11_dir}[version]
    _, tokenizer = _hf(folder)
    prompts = [oracle_prompt(tokenizer, *p, **limits) for p in PAIRS]
    enc_lens = [len(e) for e, _ in prompts]
    full_lens = [len(oracle_prompt(tokenizer, *p, max_encoder_tokens=10**6, max_decoder_tokens=10**6)[0])
                 for p in PAIRS]
    # The cases this test claims to cover are really there.
    assert enc_lens != sorted(enc_lens), "pairs must not already be in length order"
    assert any(f > limits["max_encoder_tokens"] for f in full_lens), "some passage must be truncated"
    assert any(f <= limits["max_encoder_tokens"] for f in full_lens), "some passage must fit"
    assert max(enc_lens) == limits["max_encoder_tokens"]
    assert max(len(d) for _, d in prompts) == limits["max_decoder_tokens"], "some question must be cut"

    expected = oracle_scores(folder, PAIRS, **limits)
    # The order check means something: scores handed back in length order would fail it.
    length_order = np.argsort(enc_lens, kind="stable")
    assert np.abs(expected - expected[length_order]).max() > 1e-3
    gaps = np.abs(expected[:, None] - expected[None, :]) + np.eye(len(PAIRS))
    assert np.sum(gaps.min(axis=1) > 2e-4) >= 4, "most pairs must have scores of their own"

    scorer = scorers_f32(version, limits)
    # The prompts themselves, id for id: a random tiny teacher barely depends on its
    # passage (one id more or less moves a score by about 1e-3), so check them directly.
    titles, texts, questions = _split(PAIRS)
    assert scorer.builder.encoder_ids(titles, texts) == [e for e, _ in prompts]
    assert scorer.builder.decoder_ids(questions) == [d for _, d in prompts]
    # batch_size 4: several length-sorted chunks, the last one short
    got = scorer.score(titles, texts, questions, batch_size=4)
    assert got.dtype == np.float32 and got.shape == (len(PAIRS),)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)  # float32 vs float32: ~1e-6 seen


# ---------------------------------------------------------------------------------------
# 2. Truncation


def test_encoder_truncation_is_exact(t5_v10_dir):
    tokenizer = load_tokenizer(t5_v10_dir)

    def ids(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    tail = ids(VERBALIZER) + [eos]
    title, text = "Ada Lovelace", "visited the bridge near Paris in 1851."
    passage = ids(HEAD) + ids(title) + ids(text)
    exact = len(passage) + len(tail)  # the prompt fits max_encoder_tokens exactly

    for n in (len(ids(HEAD)) + len(tail), exact - 7, exact - 1, exact, exact + 1, exact + 40):
        builder = PromptBuilder(tokenizer, PromptConfig(max_encoder_tokens=n))
        (row,) = builder.encoder_ids([title], [text])
        assert len(row) == min(n, exact), n
        assert row[-len(tail):] == tail, n
        assert row[:-len(tail)] == passage[:min(n, exact) - len(tail)], n
    # At exactly N the passage is whole (the reference's ids[:-0] would empty it).
    (row,) = PromptBuilder(tokenizer, PromptConfig(max_encoder_tokens=exact)).encoder_ids([title], [text])
    assert row == passage + tail

    # A long passage: exactly N ids, its head kept, verbalizer and </s> last.
    for n in (72, 100, 512):
        (row,) = PromptBuilder(tokenizer, PromptConfig(max_encoder_tokens=n)).encoder_ids(["Kyoto"], [LONG_TEXT])
        assert len(row) == n
        assert row[-len(tail):] == tail
        assert row[:len(ids(HEAD))] == ids(HEAD)
        assert row[:-len(tail)] == (ids(HEAD) + ids("Kyoto") + ids(LONG_TEXT))[:n - len(tail)]

    # Custom head and verbalizer strings are honoured.
    builder = PromptBuilder(tokenizer, PromptConfig(head="P: ", verbalizer=" ?", max_encoder_tokens=12))
    (row,) = builder.encoder_ids(["Ada"], [LONG_TEXT])
    assert row == (ids("P: ") + ids("Ada") + ids(LONG_TEXT))[:12 - len(ids(" ?")) - 1] + ids(" ?") + [eos]


def test_decoder_truncation_keeps_eos(t5_v10_dir):
    tokenizer = load_tokenizer(t5_v10_dir)
    eos = tokenizer.eos_token_id
    short, long = "Who visited the bridge?", LONG_QUESTION
    short_ids = tokenizer(QUESTION_PREFIX + short, add_special_tokens=False)["input_ids"]
    long_ids = tokenizer(QUESTION_PREFIX + long, add_special_tokens=False)["input_ids"]
    exact = len(short_ids) + 1
    for m in (2, 6, exact - 1, exact, exact + 1, 128):
        builder = PromptBuilder(tokenizer, PromptConfig(max_decoder_tokens=m))
        short_row, long_row = builder.decoder_ids([short, long])
        assert len(long_row) == m and long_row == long_ids[:m - 1] + [eos], m
        assert len(short_row) == min(m, exact) and short_row[-1] == eos, m
        assert short_row == short_ids[:min(m, exact) - 1] + [eos], m
    assert len(long_ids) + 1 > 128  # the long question really is cut at the default limit


# ---------------------------------------------------------------------------------------
# 3. bfloat16 teacher vs float32


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p = np.asarray(p_logits, np.float64)
    q = np.asarray(q_logits, np.float64)
    log_p = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
    log_q = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def _grid(num_questions=4, num_passages=8):
    """Each of 4 questions against the same 8 passages (as K retrieved passages)."""
    passages = [(c.split(" ")[0], c) for c in CORPUS[::29][:num_passages]]
    questions = ["Who visited the bridge?", "When was the castle painted?", "Where is the harbour?",
                 "Which fox crossed the laboratory near Lagos?"][:num_questions]
    return [(t, x, q) for q in questions for t, x in passages]


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_bfloat16_teacher_distribution_matches_float32(version, t5_v10_dir, t5_v11_dir):
    folder = {"1.0": t5_v10_dir, "1.1": t5_v11_dir}[version]
    pairs = _grid()
    bf16 = T5Scorer.from_pretrained(folder)  # bfloat16 is the default
    params = jax.tree.leaves(nnx.state(bf16.model, nnx.Param))
    assert params and all(p.dtype == jax.numpy.bfloat16 for p in params)
    f32 = T5Scorer.from_pretrained(folder, dtype="float32")
    assert all(p.dtype == jax.numpy.float32 for p in jax.tree.leaves(nnx.state(f32.model, nnx.Param)))

    s16 = bf16.score(*_split(pairs)).reshape(4, 8)
    s32 = f32.score(*_split(pairs)).reshape(4, 8)
    assert s16.dtype == np.float32
    assert not np.array_equal(s16, s32), "bfloat16 scores identical to float32: was bfloat16 used at all?"
    np.testing.assert_allclose(s32, oracle_scores(folder, pairs).reshape(4, 8), atol=1e-4)
    kl = _kl(s32, s16)
    assert kl.shape == (4,)
    assert np.all(kl <= 1e-3), kl
    # A random tiny teacher is nearly uniform over the 8 passages (KL to uniform is about
    # 1e-4), so the bound above alone would pass even a constant bfloat16 scorer. The
    # bfloat16 teacher must also keep the float32 preferences: its divergence is a small
    # part of the distribution's own (summed over questions: one nearly flat question
    # would make a per-question ratio measure bfloat16 rounding alone), and the scores
    # rank alike.
    assert kl.sum() <= 0.05 * _kl(s32, np.zeros_like(s32)).sum(), kl
    for a, b in zip(s32, s16):
        assert np.corrcoef(a, b)[0, 1] > 0.95


# ---------------------------------------------------------------------------------------
# 4. Sharding


def test_sharded_scorer_matches_unsharded(t5_v11_dir, scorers_f32):
    mesh = make_mesh(data=4, model=2)
    sharded = T5Scorer.from_pretrained(t5_v11_dir, dtype="float32", mesh=mesh)
    specs = [p.sharding.spec for p in jax.tree.leaves(nnx.state(sharded.model, nnx.Param))]
    assert any("model" in tuple(spec) for spec in specs), specs
    assert all(p.sharding.mesh == mesh for p in jax.tree.leaves(nnx.state(sharded.model, nnx.Param)))

    pairs = PAIRS + PAIRS[:3]  # 13 pairs in batches of 6: 6, 6, 1 rows, each padded up to a multiple of 4
    got = sharded.score(*_split(pairs), batch_size=6)
    want = scorers_f32("1.1", DEFAULT).score(*_split(pairs))
    assert got.shape == (len(pairs),)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 5. Errors


def test_empty_question_is_a_user_error(scorers_f32):
    scorer = scorers_f32("1.0", DEFAULT)
    for empty in ("", "   "):
        with pytest.raises(UserError, match=r"question 2 is empty"):
            scorer.score(["a", "b", "c"], ["x", "y", "z"], ["who?", "what?", empty])
    with pytest.raises(ValueError, match="same length"):
        scorer.score(["a"], ["x", "y"], ["who?"])


def test_too_small_encoder_limit_is_a_user_error(t5_v10_dir):
    tokenizer = load_tokenizer(t5_v10_dir)
    smallest = (len(tokenizer(HEAD, add_special_tokens=False)["input_ids"])
                + len(tokenizer(VERBALIZER, add_special_tokens=False)["input_ids"]) + 1)
    PromptBuilder(tokenizer, PromptConfig(max_encoder_tokens=smallest))  # head, verbalizer, </s>: fits
    for n in (smallest - 1, 24, 1):
        with pytest.raises(UserError, match=rf"max_encoder_tokens={n}\b"):
            T5Scorer.from_pretrained(t5_v10_dir, prompt=PromptConfig(max_encoder_tokens=n))
