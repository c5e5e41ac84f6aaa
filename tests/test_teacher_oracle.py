"""The T5-teacher training path against transformers on PyTorch CPU, end to end from a corpus
store: the teacher scores of retrieved store rows (prompts built from the store's
pre-tokenized passages) and one ART loss over them. The oracle rebuilds every input from
the raw (title, text, question) strings on its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from art_jax.data.corpus import TokenizerSpec, prepare_corpus
from art_jax.data.tokenization import tokenize_questions
from art_jax.models.hf import load_bert, load_tokenizer
from art_jax.objectives import art_loss
from art_jax.teachers.t5 import T5Scorer
from tests.hf_fixtures import CORPUS, make_bert_checkpoint
from tests.test_scorer import oracle_scores

QUESTION_LENGTH, PASSAGE_LENGTH = 16, 32  # retriever tokens, as the trainer cuts them

# (title, text) in store order. Row 4 is far over 512 teacher ids (the prompt cuts it),
# rows 4, 5 and 8 over 32 retriever ids (the store re-cuts them), and row 5 has characters
# neither tokenizer knows (unknown ids).
PASSAGES = [
    ("Ada Lovelace", "Ada Lovelace visited the bridge near Paris in 1851."),
    ("Marie Curie", "Marie Curie painted the laboratory near Kyoto in 1920."),
    ("", "a small brown fox crossed the harbour near Lagos in 1977."),
    ("Kyoto", "The committee described the old castle near Kyoto in 1920."),
    ("The river Thames", " ".join(CORPUS[:80])),
    ("Zürich", "Ünïcode text the tokenizer has never seen: ¿¡ 東京"),
    ("", "harbour"),
    ("Questions", CORPUS[-1]),
    ("The committee", "The committee crossed the bridge near Paris in 1851. " * 3),
    ("Lagos", "the river Thames described the harbour near Lagos in 1977."),
]
QUESTIONS = ["Who visited the bridge near Paris?", "What did Marie Curie paint?",
             "Which fox crossed the harbour?", "When was the castle near Kyoto described?"]
# B=4 x K=3 retrieved rows: distinct per question, some shared between questions (as
# retrieval gives), each question's spanning a wide range of teacher scores.
ROWS = np.array([[0, 8, 6], [1, 4, 5], [2, 9, 4], [3, 8, 7]])


@pytest.fixture(scope="module")
def teacher_dir(t5_sharp_dir):
    return t5_sharp_dir


@pytest.fixture(scope="module")
def retriever_dir(tmp_path_factory):
    """bert_dir's tiny BERT (same tokenizer, sizes and seed) drawn with initializer_range 0.5
    instead of 0.02: at 0.02 its last-layer [CLS] is one vector for every input (q.d = sqrt(H)
    exactly), so the student would be uniform whatever the tokens, and this check blind to them."""
    return make_bert_checkpoint(str(tmp_path_factory.mktemp("bert_sharp")), initializer_range=0.5)


@pytest.fixture(scope="module")
def store(retriever_dir, teacher_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher_store")
    with open(folder / "corpus.tsv", "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        f.writelines(f"{7 + 3 * i}\t{text}\t{title}\n" for i, (title, text) in enumerate(PASSAGES))
    return prepare_corpus(str(folder / "corpus.tsv"), str(folder / "store"), load_tokenizer(retriever_dir),
                          TokenizerSpec(retriever_dir, 64), load_tokenizer(teacher_dir), TokenizerSpec(teacher_dir, 512),
                          progress=False)


def _oracle_teacher(teacher_dir) -> np.ndarray:
    """[B, K] float64 ART scores from transformers' T5 on the strings (tests/test_scorer.py)."""
    pairs = [(*PASSAGES[r], q) for q, rows in zip(QUESTIONS, ROWS) for r in rows]
    return oracle_scores(teacher_dir, pairs).reshape(ROWS.shape)


def _torch_cls(folder, encodings) -> torch.Tensor:
    """CLS of transformers' BertModel (float32, eval mode: no dropout), token types all 0."""
    from transformers import BertModel

    model = BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    width = max(len(ids) for ids in encodings)
    ids = torch.zeros((len(encodings), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(encodings):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    return hidden[:, 0]


def _oracle_embeddings(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """Question [B, H] from `[CLS] q [SEP]` and passage [B, K, H] from `[CLS] title [SEP] text [SEP]`
    (only the text cut), tokenized here by transformers from the strings."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    q_ids = [tokenizer(q, truncation=True, max_length=QUESTION_LENGTH)["input_ids"] for q in QUESTIONS]
    p_ids = [tokenizer(*PASSAGES[r], truncation="only_second", max_length=PASSAGE_LENGTH)["input_ids"]
             for r in ROWS.reshape(-1)]
    assert max(map(len, p_ids)) == PASSAGE_LENGTH  # some passage is really cut
    q = _torch_cls(folder, q_ids).double()
    d = _torch_cls(folder, p_ids).double().reshape(*ROWS.shape, -1)
    return q, d


def _oracle_art_loss(q: torch.Tensor, d: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """mean over b of KL(softmax(teacher) || softmax(q.d / sqrt(hidden))), float64."""
    log_student = torch.log_softmax(torch.einsum("bh,bkh->bk", q, d) / q.shape[-1] ** 0.5, dim=-1)
    log_teacher = torch.log_softmax(teacher_scores, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean()


def _art_jax_embeddings(folder, store) -> tuple[jax.Array, jax.Array]:
    """The trainer's inputs: question tokens from the tokenizer, passage tokens from the store."""
    bert = load_bert(folder)
    questions = tokenize_questions(load_tokenizer(folder), QUESTIONS, QUESTION_LENGTH, pad_to=QUESTION_LENGTH)
    passages = store.retriever_tokens(ROWS.reshape(-1), PASSAGE_LENGTH)
    q = bert.embed_cls(jnp.asarray(questions.ids), jnp.asarray(questions.mask))
    d = bert.embed_cls(jnp.asarray(passages.ids), jnp.asarray(passages.mask)).reshape(*ROWS.shape, -1)
    return q, d


@pytest.fixture(scope="module")
def scorer(teacher_dir) -> T5Scorer:
    return T5Scorer.from_pretrained(teacher_dir, dtype="float32")


@pytest.fixture(scope="module")
def teacher_scores(scorer, store) -> np.ndarray:
    return scorer.score_retrieved(QUESTIONS, ROWS, store, batch_size=5)  # several length-sorted batches


def test_score_retrieved_equals_transformers(teacher_dir, scorer, store, teacher_scores):
    expected = _oracle_teacher(teacher_dir)
    # informative: far from uniform within each question (0.58 to 0.78 measured)
    assert (expected.max(axis=1) - expected.min(axis=1)).min() > 0.2
    assert teacher_scores.shape == ROWS.shape and teacher_scores.dtype == np.float32
    np.testing.assert_allclose(teacher_scores, expected, rtol=0, atol=1e-4)

    # the store's pre-tokenized passages give the prompts `score` builds from the strings
    titles, texts = zip(*(PASSAGES[r] for r in ROWS.reshape(-1)))
    assert (scorer.builder.encoder_ids_from_passages(store.scorer_passages(ROWS.reshape(-1)))
            == scorer.builder.encoder_ids(titles, texts))
    from_strings = scorer.score(titles, texts, [q for q in QUESTIONS for _ in range(ROWS.shape[1])])
    np.testing.assert_allclose(teacher_scores, from_strings.reshape(ROWS.shape), rtol=0, atol=1e-5)


def test_art_loss_equals_torch(retriever_dir, teacher_dir, store, teacher_scores):
    q_torch, d_torch = _oracle_embeddings(retriever_dir)
    q, d = _art_jax_embeddings(retriever_dir, store)
    np.testing.assert_allclose(np.asarray(q), q_torch.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(d), d_torch.numpy(), rtol=0, atol=1e-4)

    q_torch.requires_grad_(True)
    d_torch.requires_grad_(True)
    expected = _oracle_art_loss(q_torch, d_torch, torch.from_numpy(_oracle_teacher(teacher_dir)))
    expected.backward()
    # informative on both sides: the student's own distribution is far from uniform too
    student = torch.einsum("bh,bkh->bk", q_torch, d_torch).detach() / q_torch.shape[-1] ** 0.5
    assert (student.max(dim=1).values - student.min(dim=1).values).min() > 0.5  # 1.1 to 2.7 measured
    assert expected.item() > 0.05  # and not already the teacher's

    def loss_fn(q, d, scores):
        return art_loss(q, d, scores)[0]

    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(q, d, jnp.asarray(teacher_scores))
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-4)
    # the loss's gradient reaches the embeddings as torch's does, and never the teacher
    np.testing.assert_allclose(np.asarray(grads[0]), q_torch.grad.numpy(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1]), d_torch.grad.numpy(), rtol=1e-3, atol=1e-6)
    assert not np.asarray(grads[2]).any()


def test_one_art_step_of_the_loop_equals_torch(teacher_dir, files, tmp_path, monkeypatch):
    """One step of `art-jax train` with the T5 teacher (the method's batch: search, teacher,
    dedupe, store tokens; the generic update), its logged loss against transformers on the
    same retrieved pairs, rebuilt from their strings. Dropout off, so that torch can follow."""
    from art_jax.methods import make_trainer
    from art_jax.retrieval.search import ShardedIndex
    from tests.test_train import _config

    retriever = make_bert_checkpoint(str(tmp_path / "bert"), initializer_range=0.5, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    cfg = _config(files, retriever, **{"scorer.kind": "t5", "scorer.checkpoint": teacher_dir,
                                       "scorer.dtype": "float32", "train.steps": 1, "train.topk": 8,
                                       "data.dev_questions": "", "train.best_metric": "",
                                       "retriever.question_max_length": QUESTION_LENGTH,
                                       "retriever.train_passage_max_length": PASSAGE_LENGTH})
    trainer = make_trainer(cfg, str(tmp_path / "run"))
    searched = []
    real_search = ShardedIndex.search
    monkeypatch.setattr(ShardedIndex, "search", lambda self, q, k: searched.append(real_search(self, q, k)) or
                        searched[-1])
    trainer.resume()
    metrics = trainer.train_step(0)
    trainer.checkpoints.close()

    _, questions = trainer.method.stream.batch(0)
    [(_, rows)] = searched
    store = trainer.method.store
    passages = [[(store.title(r), store.text(r)) for r in row] for row in rows]
    teacher = oracle_scores(teacher_dir, [(*p, q) for q, row in zip(questions, passages) for p in row])
    assert (teacher.reshape(rows.shape).max(1) - teacher.reshape(rows.shape).min(1)).min() > 0.05  # informative

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(retriever)
    q = _torch_cls(retriever, [tokenizer(x, truncation=True, max_length=QUESTION_LENGTH)["input_ids"]
                               for x in questions]).double()
    d = _torch_cls(retriever, [tokenizer(*p, truncation="only_second", max_length=PASSAGE_LENGTH)["input_ids"]
                               for row in passages for p in row]).double().reshape(*rows.shape, -1)
    teacher = torch.as_tensor(teacher.reshape(rows.shape))
    expected = float(_oracle_art_loss(q, d, teacher))
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-4, atol=1e-6)
    # informative: the teacher's scores given to other passages of the same question change the loss
    shuffled = float(_oracle_art_loss(q, d, teacher.roll(1, dims=1)))
    assert abs(shuffled - expected) > 100 * (1e-4 * expected + 1e-6), (shuffled, expected)
