"""The reader methods as the trainer builds them: ``fid`` (the T5 reader alone) and ``emdr2``,
``individual_topk``, ``joint_topk`` (the reader with both retriever towers, end to end).

* Each method's loss on a real batch (its own ``batch``, the index's search stubbed) equals an oracle
  written here: transformers' BertModel and T5ForConditionalGeneration on PyTorch in float64,
  then the papers' formulas as probabilities (products and sums). Dropout off (no keys).
* The gradients reach what each paper says, and only that.
* Short runs: 2 processes x 4 devices (and for emdr2 1 process x 1 device) give the metrics of
  1 process x 8 devices; a preempted run resumes as the uninterrupted one.

The oracle's FiD: each (question, passage k) input encoded alone and unpadded by transformers'
encoder, the K outputs laid end to end by hand (zeros at padding) as the decoder's memory; its
p(a | q, z_k): the whole model on passage k's input alone. Joint top-K's bias lambda * p(z | q)
has no argument in transformers: it goes in as the decoder's encoder attention mask, a prepared
4-D float mask [B, 1, 1, K * N] (padding at the float64 minimum, plus the bias), which
transformers passes through as it is and its eager attention adds to the cross-attention
logits of every layer and head.

Models: one-layer tiny BERT and T5, drawn so that their scores do not tie (``models``).
"""

import dataclasses
import functools
import json
import os
import signal

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from art_jax.config import apply_override, default_config
from art_jax.core.sharding import make_mesh
from art_jax.methods import METHODS, make_trainer
from art_jax.methods import fid as fid_method
from art_jax.methods.reading import READER_ARRAYS
from art_jax.retrieval.search import ShardedIndex
from art_jax.training.loop import Trainer
from art_jax.training.state import init_state
from tests import hf_fixtures
from tests.multiprocess import art_jax_job

transformers = pytest.importorskip("transformers")

# (subject, verb, object, place, year): every passage 15 or 16 BERT tokens, so each step's passage
# arrays have one shape (16 wide) and a run compiles its update once
FACTS = [("Ada Lovelace", "visited", "bridge", "Paris", 1851),
         ("Marie Curie", "painted", "old castle", "Kyoto", 1920),
         ("The committee", "crossed", "harbour", "Lagos", 1977),
         ("Ada Lovelace", "described", "harbour", "Lagos", 1920),
         ("Marie Curie", "crossed", "laboratory", "Paris", 1977),
         ("The committee", "painted", "bridge", "Kyoto", 1851),
         ("Ada Lovelace", "crossed", "old castle", "Kyoto", 1977),
         ("Marie Curie", "visited", "laboratory", "Lagos", 1851)]
PASSAGES = [(subject, f"{subject} {verb} the {obj} near {place} in {year}.")
            for subject, verb, obj, place, year in FACTS]
# two questions per passage; answers of several lengths, some with two gold answers (one drawn per epoch)
QUESTIONS = [q for subject, verb, obj, place, year in FACTS for q in (
    {"question": f"who {verb} the {obj} near {place}?", "answers": [subject]},
    {"question": f"{subject} {verb} the {obj} in which year?", "answers": [str(year), f"in {year}"]})]
K = 3
# float32 against the float64 oracle: 1e-7 apart measured, compared at 100 times that
RTOL = 1e-5
# the stubbed index's answer: batch position b reads passages b, b+3, b+6 (mod 8), all 8 in the batch
ROWS = np.array([[b % 8, (b + 3) % 8, (b + 6) % 8] for b in range(8)])
END_TO_END = ("emdr2", "individual_topk", "joint_topk")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(BERT folder, T5 folder), one layer each, drawn so that a question's passages do not tie.
    BERT's weights at 0.5, not 0.02: a random [CLS] then tells passages apart (in the batch below,
    p(z | q) of a question's 3 passages differs by a factor of 1.3 to 10). T5 v1.1 with its output
    head scaled by 3 and its cross-attention's output by 10: the decoder then reads its memory, and
    log p(a | q, z_k) differs between a question's passages by 0.2 to 1 nat, without which the
    retriever's terms would get no gradient."""
    from safetensors.torch import load_file, save_file

    bert = hf_fixtures.make_bert_checkpoint(str(tmp_path_factory.mktemp("bert")), num_hidden_layers=1,
                                            initializer_range=0.5)
    t5 = hf_fixtures.make_t5_checkpoint(str(tmp_path_factory.mktemp("t5")), version="1.1", num_layers=1,
                                        num_decoder_layers=1)
    weights = load_file(f"{t5}/model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 3
    cross = "decoder.block.0.layer.1.EncDecAttention.o.weight"
    weights[cross] = weights[cross] * 10
    save_file(weights, f"{t5}/model.safetensors", metadata={"format": "pt"})
    return bert, t5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(corpus TSV, questions JSONL, DPR-format results for fid: each question's gold passage and two others)."""
    folder = tmp_path_factory.mktemp("world")
    with open(folder / "corpus.tsv", "w") as f:
        f.write("id\ttext\ttitle\n")
        f.writelines(f"{i + 1}\t{text}\t{title}\n" for i, (title, text) in enumerate(PASSAGES))
    with open(folder / "questions.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in QUESTIONS)
    results = [{**q, "ctxs": [{"id": str(r + 1), "title": PASSAGES[r][0], "text": PASSAGES[r][1]}
                              for r in ((i // 2 + j) % 8 for j in (0, 3, 6))]} for i, q in enumerate(QUESTIONS)]
    with open(folder / "results.json", "w") as f:
        json.dump(results, f)
    return str(folder / "corpus.tsv"), str(folder / "questions.jsonl"), str(folder / "results.json")


def _settings(method, world, models, **overrides) -> dict:
    corpus, questions, results = world
    return {"method": method, "seed": 7, "retriever.checkpoint": models[0], "reader.checkpoint": models[1],
            "data.corpus": corpus, "data.train_questions": questions, "data.train_results": results,
            "retriever.question_max_length": 16, "retriever.passage_max_length": 24,
            "retriever.train_passage_max_length": 24, "reader.max_input_tokens": 56, "reader.max_answer_tokens": 8,
            "index.chunk_rows": 8, "index.progress": False, "train.batch_size": 8, "train.topk": K,
            "train.steps": 1, "train.best_metric": "", "train.eval_every": 0, "train.log_every": 100, **overrides}


def _config(settings: dict):
    cfg = default_config()
    for key, value in settings.items():
        apply_override(cfg, f"config.{key}={value}")
    return cfg


# ---------------------------------------------------------------- losses and gradients


class FixedRows:
    """The index, its search stubbed: ROWS whatever the queries; its vectors those of ``index`` (a
    ShardedIndex of every passage), for joint_topk's batch."""

    def __init__(self, index=None):
        self.index = index

    def search(self, queries, k, exclude=None):
        assert k == K and exclude is None
        return np.zeros((len(queries), k), np.float32), ROWS[:len(queries)]

    def vectors(self, rows, sharding):
        return self.index.vectors(rows, sharding)


def _passage_vectors(method) -> np.ndarray:
    """Every passage's float32 vector [8, H] by the method's passage tower, from the tokens the other
    methods re-embed: an index of them is what the run builds (float32 here, no dropout)."""
    tokens = method.store.retriever_tokens(np.arange(len(PASSAGES)), 24, multiple=8)
    tower = method.groups.module(method.params, "passage")
    return np.asarray(tower.embed_cls(jax.numpy.asarray(tokens.ids), jax.numpy.asarray(tokens.mask)))


def _index_of(method, mesh) -> FixedRows:
    return FixedRows(ShardedIndex.from_array(_passage_vectors(method), mesh))


def _method(name, world, models, workdir, **overrides):
    cfg = _config(_settings(name, world, models, **overrides))
    METHODS[name].check_config(cfg)
    return METHODS[name](cfg, workdir, make_mesh(devices=jax.devices()[:1]))


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grad(loss, params, batch, keys):
    return jax.value_and_grad(loss, has_aux=True)(params, batch, keys)


@dataclasses.dataclass
class Computed:
    loss: float
    metrics: dict[str, float]
    grads: dict[str, list[np.ndarray]]  # group -> leaves


def _computed(loss, params, batch, keys) -> Computed:
    (value, metrics), grads = _value_and_grad(loss, params, batch, keys)
    return Computed(float(value), {k: float(v) for k, v in metrics.items()},
                    {group: [np.asarray(g) for g in jax.tree.leaves(tree)] for group, tree in grads.items()})


def _micro_batch(method, index) -> dict[str, np.ndarray]:
    """Step 0's batch made by the method's own ``batch``, as its one micro-batch in numpy."""
    batch, _ = method.batch(init_state(method.params, optax.identity(), 0), 0, index)
    return {name: np.asarray(value[0]) for name, value in method.objective.split(batch, 1).items()}


@pytest.fixture(scope="module")
def setup(world, models, tmp_path_factory):
    """(the end-to-end methods by name, with emdr2's ``marginalise="token"`` as "emdr2_token", and
    fid; step 0's micro-batch, numpy, by emdr2's own ``batch``; joint_topk's own, the passages' index
    vectors in place of their tokens)."""
    root = tmp_path_factory.mktemp("methods")
    methods = {name: _method(name, world, models, str(root / name)) for name in END_TO_END}
    methods["emdr2_token"] = _method("emdr2", world, models, str(root / "token"), **{"train.marginalise": "token"})
    methods["fid"] = _method("fid", world, models, str(root / "fid"))
    joint = methods["joint_topk"]
    return (methods, _micro_batch(methods["emdr2"], FixedRows()),
            _micro_batch(joint, _index_of(joint, make_mesh(devices=jax.devices()[:1]))))


@pytest.fixture(scope="module")
def computed(setup):
    """Each method's (loss, metrics, gradients) on the batch, no dropout; "fid_term" is the FiD
    term alone (``methods.fid``'s loss) on the end-to-end methods' reader."""
    methods, batch, joint_batch = setup
    done = {name: _computed(methods[name].objective.loss, methods[name].params,
                            joint_batch if name == "joint_topk" else batch, (None,) * 4)
            for name in (*END_TO_END, "emdr2_token")}
    reader_batch = {name: batch[name] for name in READER_ARRAYS}
    fid = methods["fid"]
    done["fid"] = _computed(fid.objective.loss, fid.params, reader_batch, (None, None))
    groups, params = methods["emdr2"].groups, methods["emdr2"].params
    done["fid_term"] = _computed(functools.partial(fid_method.loss, groups), {"reader": params["reader"]},
                                 reader_batch, (None, None))
    return done


class Oracle:
    """Float64 transformers models of the same checkpoints and the batch's log-probabilities."""

    def __init__(self, models, batch):
        bert, t5 = models
        self.bert = transformers.BertModel.from_pretrained(bert, attn_implementation="eager").double().eval()
        self.t5 = transformers.T5ForConditionalGeneration.from_pretrained(t5, attn_implementation="eager").double()
        self.t5.eval()
        self.batch = {name: torch.tensor(value).long() for name, value in batch.items()}
        self.mask = self.batch["label_mask"].bool()  # [B, T]

    @torch.no_grad()
    def scores(self) -> np.ndarray:
        """q . z [B, K]: BERT's [CLS] of each question and of each of its passages (no token types)."""
        b = self.batch
        q = self.bert(input_ids=b["question_ids"], attention_mask=b["question_mask"]).last_hidden_state[:, 0]
        p = self.bert(input_ids=b["passage_ids"], attention_mask=b["passage_mask"]).last_hidden_state[:, 0]
        return torch.einsum("bh,bkh->bk", q, p[b["passage_index"]]).numpy()

    def _gold(self, logits, labels) -> np.ndarray:
        return torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0].numpy()

    @torch.no_grad()
    def fid(self, weights: np.ndarray | None = None) -> np.ndarray:
        """log p(a_t | q, z_1..K, a_<t) [B, T]; ``weights`` [B, K] added to the cross-attention logits
        of each passage's positions."""
        ids, mask, labels = self.batch["reader_ids"], self.batch["reader_mask"], self.batch["labels"]
        batch, passages, length = ids.shape
        memory = torch.zeros(batch, passages, length, self.t5.config.d_model, dtype=torch.float64)
        for b, k in np.ndindex(batch, passages):
            row = ids[b, k, :int(mask[b, k].sum())][None]
            memory[b, k, :row.shape[1]] = self.t5.encoder(input_ids=row).last_hidden_state[0]
        flat = mask.reshape(batch, -1)
        if weights is None:
            encoder_mask = flat
        else:
            padding = (1.0 - flat.double()) * torch.finfo(torch.float64).min
            bias = torch.repeat_interleave(torch.from_numpy(weights), length, dim=-1)
            encoder_mask = (padding + bias)[:, None, None, :]
        out = self.t5(encoder_outputs=(memory.reshape(batch, passages * length, -1),), attention_mask=encoder_mask,
                      labels=labels.masked_fill(~self.mask, -100))
        return self._gold(out.logits, labels)

    @torch.no_grad()
    def per_passage(self) -> np.ndarray:
        """log p(a_t | q, z_k, a_<t) [B, K, T]: the model reading passage k's input alone."""
        ids, mask, labels = self.batch["reader_ids"], self.batch["reader_mask"], self.batch["labels"]
        out = np.zeros(ids.shape[:2] + labels.shape[1:])
        for b, k in np.ndindex(*ids.shape[:2]):
            row = ids[b, k, :int(mask[b, k].sum())][None]
            logits = self.t5(input_ids=row, labels=labels[b:b + 1].masked_fill(~self.mask[b:b + 1], -100)).logits
            out[b, k] = self._gold(logits, labels[b:b + 1])[0]
        return out


@dataclasses.dataclass
class Expected:
    scores: np.ndarray  # q . z [B, K]
    prior: np.ndarray  # p(z_k | q) [B, K]
    fid: np.ndarray  # FiD's log p(a_t | ...) [B, T]
    passage: np.ndarray  # one passage's log p(a_t | ...) [B, K, T]
    joint_fid: np.ndarray  # FiD's, K * p(z | q) on the cross-attention logits [B, T]
    mask: np.ndarray  # [B, T] bool


@pytest.fixture(scope="module")
def expected(setup, models):
    _, batch, _ = setup
    oracle = Oracle(models, batch)
    scores = oracle.scores()
    prior = np.exp(scores / np.sqrt(32.0))  # tau = sqrt(hidden) (score scaling, multiplier 1)
    prior /= prior.sum(-1, keepdims=True)
    # joint top-K's lambda starts at K (reader.joint_lambda=0)
    return Expected(scores, prior, oracle.fid(), oracle.per_passage(), oracle.fid(K * prior),
                    batch["label_mask"].astype(bool))


def _token_mean_nll(token_log_probs, mask) -> float:
    return -token_log_probs[mask].sum() / mask.sum()


def _answer_probs(e: Expected) -> np.ndarray:
    """p(a | q, z_k) [B, K]: the product over the answer's tokens."""
    return np.where(e.mask[:, None, :], np.exp(e.passage), 1.0).prod(-1)


def _marginal_nll(e: Expected) -> float:
    """-log sum_k p(a | q, z_k) p(z_k | q), mean over questions."""
    return float(-np.log((_answer_probs(e) * e.prior).sum(-1)).mean())


def _token_marginal_nll(e: Expected) -> float:
    """EMDR2's reference code: -log sum_k p(z_k | q) p(a_t | q, z_k, a_<t) per answer token, mean over tokens."""
    mixture = (e.prior[:, :, None] * np.exp(e.passage)).sum(1)
    return _token_mean_nll(np.log(mixture), e.mask)


def _entropy(prior) -> float:
    return float(-(prior * np.log(prior)).sum(-1).mean())


def test_the_batch_is_the_retrieved_passages_and_tells_them_apart(setup, expected):
    """The batch holds ROWS' passages, questions' answers of several lengths, and scores that
    do not tie: the retriever's and the one-passage reader's values differ between a question's
    passages by far more than the tolerances below. Joint top-K's batch is the same but for the
    passages, which it holds as their index vectors."""
    methods, batch, joint_batch = setup
    store = methods["emdr2"].store
    tokens = store.retriever_tokens(ROWS.reshape(-1), 24, multiple=8)
    np.testing.assert_array_equal(batch["passage_ids"][batch["passage_index"]].reshape(len(ROWS) * K, -1),
                                  tokens.ids)
    assert joint_batch.keys() == batch.keys() - {"passage_index", "passage_ids", "passage_mask"} | {"passage_vectors"}
    for name in joint_batch.keys() - {"passage_vectors"}:
        np.testing.assert_array_equal(joint_batch[name], batch[name])
    np.testing.assert_array_equal(joint_batch["passage_vectors"], _passage_vectors(methods["joint_topk"])[ROWS])
    assert len(set(batch["label_mask"].sum(-1))) > 1
    e = expected
    assert np.all(e.prior.max(-1) / e.prior.min(-1) > 1.2), e.prior
    answer = np.where(e.mask[:, None, :], e.passage, 0.0).sum(-1)  # log p(a | q, z_k)
    assert np.all(answer.max(-1) - answer.min(-1) > 0.1), answer


def test_fid_loss_is_transformers_fid_nll_and_trains_the_reader_alone(setup, computed, expected):
    methods = setup[0]
    fid, e = computed["fid"], expected
    np.testing.assert_allclose(fid.loss, _token_mean_nll(e.fid, e.mask), rtol=RTOL)
    per_answer = -np.where(e.mask, e.fid, 0.0).sum(-1).mean()
    np.testing.assert_allclose(fid.metrics["answer_nll"], per_answer, rtol=RTOL)
    assert set(methods["fid"].params) == set(methods["fid"].groups.roles) == set(fid.grads) == {"reader"}
    assert max(np.abs(g).max() for g in fid.grads["reader"]) > 1e-3
    # the FiD term below reads the end-to-end methods' reader: the same weights as fid's own
    for a, b in zip(*(jax.tree.leaves(methods[name].params["reader"]) for name in ("fid", "emdr2"))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(fid.grads["reader"], computed["fid_term"].grads["reader"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["emdr2", "emdr2_token"])
def test_emdr2_loss_is_fid_nll_plus_the_retrievers_marginal(computed, expected, name):
    e, got = expected, computed[name]
    reader = _token_mean_nll(e.fid, e.mask)
    retriever = _marginal_nll(e) if name == "emdr2" else _token_marginal_nll(e)
    np.testing.assert_allclose(got.metrics["reader_nll"], reader, rtol=RTOL)
    np.testing.assert_allclose(got.metrics["retriever_nll"], retriever, rtol=RTOL)
    np.testing.assert_allclose(got.metrics["retriever_entropy"], _entropy(e.prior), rtol=RTOL)
    np.testing.assert_allclose(got.loss, reader + retriever, rtol=RTOL)
    assert abs(_marginal_nll(e) - _token_marginal_nll(e)) > 0.1  # the two marginals are different losses


def _max(leaves) -> float:
    return max(float(np.abs(g).max()) for g in leaves)


def _relative_difference(a, b) -> float:
    flat = [np.concatenate([x.ravel() for x in leaves]) for leaves in (a, b)]
    return float(np.linalg.norm(flat[0] - flat[1]) / np.linalg.norm(flat[1]))


@pytest.mark.parametrize("name", ["emdr2", "emdr2_token"])
def test_emdr2_trains_the_reader_by_fid_alone_and_both_towers(computed, name):
    """The one-passage reads give the retriever its target and the reader nothing: the reader's
    gradient is the FiD term's."""
    grads = computed[name].grads
    assert set(grads) == {"question", "passage", "reader"}
    # equal to float32 rounding of the two programs' different fusions (bitwise with XLA:CPU's fusion
    # emitters; measured with the suite's elemental ones: 1e-8 at most, of gradients up to ~5e-2)
    reader = computed["fid_term"].grads["reader"]
    for a, b in zip(grads["reader"], reader):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * _max(reader))
    assert _max(grads["question"]) > 1e-4 and _max(grads["passage"]) > 1e-4


def test_individual_topk_loss_is_the_marginal_over_passages(computed, expected):
    got, e = computed["individual_topk"], expected
    np.testing.assert_allclose(got.loss, _marginal_nll(e), rtol=RTOL)
    np.testing.assert_allclose(got.metrics["retriever_entropy"], _entropy(e.prior), rtol=RTOL)


def test_individual_topk_trains_the_reader_through_each_passage_and_both_towers(computed):
    grads = computed["individual_topk"].grads
    assert set(grads) == {"question", "passage", "reader"}
    assert _max(grads["question"]) > 1e-4 and _max(grads["passage"]) > 1e-4 and _max(grads["reader"]) > 1e-3
    assert _relative_difference(grads["reader"], computed["fid_term"].grads["reader"]) > 0.1


def test_joint_topk_loss_is_fid_with_the_retrievers_attention_bias(computed, expected):
    got, e = computed["joint_topk"], expected
    np.testing.assert_allclose(got.loss, _token_mean_nll(e.joint_fid, e.mask), rtol=RTOL)
    np.testing.assert_allclose(got.metrics["token_nll"], got.loss, rtol=1e-6)
    assert got.metrics["lambda"] == K
    # the bias moves the loss (by 6e-3, measured) far beyond the tolerance: where it goes matters
    assert abs(_token_mean_nll(e.joint_fid, e.mask) - _token_mean_nll(e.fid, e.mask)) > 100 * RTOL * got.loss


def test_joint_topk_refuses_shared_towers(world, models):
    """One shared tower cannot be both trained (question) and frozen (passage): refused before loading."""
    from art_jax.core.errors import UserError

    cfg = _config(_settings("joint_topk", world, models, **{"retriever.shared_towers": True}))
    with pytest.raises(UserError, match=r"retriever\.shared_towers: joint_topk .* set retriever.shared_towers=False"):
        METHODS["joint_topk"].check_config(cfg)
    METHODS["emdr2"].check_config(cfg)  # the others train both roles of a shared tower


@pytest.mark.parametrize("method,frozen", [("art", "passage"), ("dpr", "question"), ("emdr2", "passage"),
                                           ("individual_topk", "question")])
def test_a_shared_tower_cannot_be_frozen_in_one_role(method, frozen, world, models):
    """``train.train_{frozen}_tower=False`` beside a shared tower would train it through the other
    role all the same (one parameter group): every method that trains towers refuses it."""
    from art_jax.core.errors import UserError

    shared = {"retriever.shared_towers": True, f"train.train_{frozen}_tower": False,
              "data.dev_questions": world[1], "data.train_examples": world[1], "train.best_metric": ""}
    with pytest.raises(UserError, match=rf"train\.train_{frozen}_tower=False freezes a tower that "
                                        r"retriever\.shared_towers=True shares"):
        METHODS[method].check_config(_config(_settings(method, world, models, **shared)))
    METHODS[method].check_config(_config(_settings(method, world, models, **{**shared, "retriever.shared_towers":
                                                                              False})))


def test_the_retrievers_compute_policy_reaches_both_towers(world, models, tmp_path):
    """retriever.dtype, retriever.remat and retriever.remat_policy (as the reader's): the towers a run
    trains, and its reader, compute so; another dtype or policy is refused in one line."""
    from art_jax.core.errors import UserError
    from art_jax.models.hf import for_inference

    policy = {"retriever.dtype": "bfloat16", "retriever.remat": True,
              "retriever.remat_policy": "dots_with_no_batch_dims_saveable", "reader.remat": True,
              "reader.remat_policy": "dots_saveable"}
    for shared in (False, True):
        method = METHODS["emdr2"](_config(_settings("emdr2", world, models, **policy,
                                                    **{"retriever.shared_towers": shared})),
                                  str(tmp_path / str(shared)), make_mesh(devices=jax.devices()[:1]))
        assert (method.groups.roles["question"] == method.groups.roles["passage"]) == shared  # one module stays one
        reader = method.groups.module(method.params, "reader")
        assert reader.encoder.remat and reader.decoder.remat_policy == "dots_saveable"
        for role in ("question", "passage"):
            tower = method.groups.module(method.params, role)
            assert tower.config.dtype == "bfloat16" and tower.config.remat, role
            assert tower.config.remat_policy == "dots_with_no_batch_dims_saveable", role
            # indexes and evaluations embed as the exported tower will: float32, no remat
            inference = for_inference(tower)
            assert inference.config.dtype == "float32" and not inference.config.remat
            assert all(a is b for a, b in zip(jax.tree.leaves(nnx.state(inference, nnx.Param)),
                                              jax.tree.leaves(nnx.state(tower, nnx.Param))))
    with pytest.raises(UserError, match=r"retriever\.dtype: 'float16' is not one of float32, bfloat16"):
        METHODS["emdr2"].check_config(_config(_settings("emdr2", world, models, **{"retriever.dtype": "float16"})))
    for model in ("retriever", "reader"):  # what a recomputed layer keeps: a jax.checkpoint_policies name
        with pytest.raises(UserError, match=rf"{model}\.remat_policy: 'everything' is not one of nothing_saveable, "
                                            "dots_with_no_batch_dims_saveable, dots_saveable"):
            METHODS["emdr2"].check_config(_config(_settings("emdr2", world, models,
                                                            **{f"{model}.remat_policy": "everything"})))


def test_joint_topk_trains_the_question_tower_lambda_and_reader_never_the_passage_tower(setup, computed):
    methods = setup[0]
    grads = computed["joint_topk"].grads
    assert set(grads) == {"question", "passage", "reader", "joint"}
    assert all(np.all(g == 0) for g in grads["passage"])
    assert _max(grads["question"]) > 1e-4 and _max(grads["joint"]) > 1e-4 and _max(grads["reader"]) > 1e-3
    assert "passage" in methods["joint_topk"].optim_config().frozen_roles


# ---------------------------------------------------------------- training runs

def _dev_items(count: int):
    """``count`` dev questions, each with 2 passages of its own."""
    from art_jax.evaluation.predict import Retrieved

    return [Retrieved(f"who is person {i}?", [(f"P{i}", f"person {i} lives in town {j}") for j in range(2)])
            for i in range(count)]


def test_dev_em_and_f1_sum_the_shares_each_process_decodes(models, monkeypatch):
    """Each process decodes its share of the dev questions: the shares of 2 and 3 processes, their
    sums added (as ``process_sum`` adds them), give the metrics of one process decoding all. Gold
    answers: the prediction itself for questions 0, 1 and 4 (EM 3/7 exactly), for the others the
    prediction and i more words (each question's F1 its own, so a question counted twice or not
    at all would show)."""
    from art_jax.core import distributed
    from art_jax.evaluation.predict import predict_answers
    from art_jax.methods import reading
    from art_jax.models.hf import load_t5, load_tokenizer
    from art_jax.models.reader_folder import ReaderSettings

    reader, tokenizer = load_t5(models[1]), load_tokenizer(models[1])
    settings = ReaderSettings(max_input_tokens=24, max_answer_tokens=4)
    items = _dev_items(7)
    mesh = make_mesh(devices=jax.local_devices())
    predictions = predict_answers(reader, tokenizer, items, settings, topk=2, mesh=mesh, progress=False)
    assert all(predictions), predictions
    answers = [[p if i in (0, 1, 4) else p + " word" * i] for i, p in enumerate(predictions)]
    metrics = lambda: reading.reading_metrics(reader, tokenizer, settings, items, answers, topk=2,  # noqa: E731
                                              batch_size=3)
    whole = metrics()
    assert whole["em"] == pytest.approx(3 / 7) and 3 / 7 < whole["f1"] < 1, whole
    for processes in (2, 3):
        sums = []
        for index in range(processes):
            monkeypatch.setattr(jax, "process_index", lambda index=index: index)
            monkeypatch.setattr(jax, "process_count", lambda processes=processes: processes)
            shares = distributed.process_share(7)
            monkeypatch.undo()
            monkeypatch.setattr(reading, "process_share", lambda count, shares=shares: shares)
            monkeypatch.setattr(reading, "process_sum", lambda values: sums.append(np.asarray(values)) or np.zeros(2))
            metrics()
        np.testing.assert_allclose(np.sum(sums, axis=0) / 7, [whole["em"], whole["f1"]], rtol=1e-6)
    monkeypatch.undo()


def test_two_processes_decode_their_shares_into_the_one_process_metrics(models, tmp_path):
    """5 dev questions over 2 processes of 2 devices, batches of 2: shares of 3 and 2 questions,
    decoded in 2 batches and in 1, and gathered: the EM and F1 of one process decoding all."""
    from art_jax.evaluation.predict import predict_answers
    from art_jax.methods.reading import reading_metrics
    from art_jax.models.hf import load_t5, load_tokenizer
    from art_jax.models.reader_folder import ReaderSettings
    from tests.multiprocess import run_two_processes

    reader, tokenizer = load_t5(models[1]), load_tokenizer(models[1])
    settings = ReaderSettings(max_input_tokens=24, max_answer_tokens=4)
    items = _dev_items(5)
    predictions = predict_answers(reader, tokenizer, items, settings, topk=2, mesh=make_mesh(), progress=False)
    answers = [[p if i in (0, 3) else p + " word" * i] for i, p in enumerate(predictions)]
    whole = reading_metrics(reader, tokenizer, settings, items, answers, topk=2, batch_size=2)
    assert whole["em"] == pytest.approx(2 / 5), whole
    with open(tmp_path / "items.json", "w") as f:
        json.dump([{"question": r.question, "passages": r.passages, "answers": a} for r, a in zip(items, answers)], f)
    run_two_processes("read", models[1], str(tmp_path / "items.json"), str(tmp_path / "metrics.json"))
    with open(tmp_path / "metrics.json") as f:
        two = json.load(f)
    assert two == pytest.approx(whole, rel=1e-6)


def test_process_shares_cover_every_item_once(monkeypatch):
    from art_jax.core import distributed

    for count in (0, 1, 5, 7, 8):
        for processes in (1, 2, 3, 4):
            monkeypatch.setattr(jax, "process_count", lambda processes=processes: processes)
            covered = []
            for index in range(processes):
                monkeypatch.setattr(jax, "process_index", lambda index=index: index)
                covered += list(distributed.process_share(count))
            assert covered == list(range(count)), (count, processes)
    monkeypatch.undo()


def test_joint_topk_searches_one_index_it_never_refreshes(world, models, tmp_path):
    """Its passage tower is frozen: the index of step 0 serves every step (refresh_every=1 rebuilds
    nothing), and a resumed run searches that same version."""
    from art_jax.retrieval.index import published_versions

    settings = _settings("joint_topk", world, models, **{"train.refresh_every": 1, "train.checkpoint_every": 1})
    _train_here(settings, tmp_path)
    assert published_versions(str(tmp_path / "index")) == [0]
    assert "index_staleness" not in _rows(tmp_path)[0]
    resumed = make_trainer(_config({**settings, "train.steps": 2}), str(tmp_path))
    assert resumed.resume() == 1 and resumed.index.version == 0


# 4 steps of 2 micro-batches of 8 questions (every step an epoch: the 16 questions reshuffled,
# answers drawn again), dropout on in the reader and the towers. No index refresh: the float16
# index that 1 device and 8 embed (in other batch splits) differs by an ulp here and there, which
# swapped two of a question's passages 8e-4 apart in score (measured), and with dropout on the
# passages' order moves the loss; the initial index is the same bits for all
RUN = {"train.batch_size": 16, "train.accumulation": 2, "train.steps": 4, "train.refresh_every": 0,
       "train.checkpoint_every": 2, "train.learning_rate": 1e-3, "reader.dropout": 0.1}
@pytest.mark.parametrize("name", END_TO_END)
def test_the_loss_and_gradients_on_eight_devices_are_those_on_one(name, world, models, computed, tmp_path):
    """The same step on a mesh of 8 devices: the method's own batch, laid out over the data axis as
    the trainer lays it, and the loss partitioned by the compiler, give the one device's values (the
    runs below compare whole runs, as 2 processes and on 1 device, on top of this)."""
    cfg = _config(_settings(name, world, models))
    method = METHODS[name](cfg, str(tmp_path), make_mesh(devices=jax.devices()[:8]))
    index = _index_of(method, method.mesh) if name == "joint_topk" else FixedRows()
    batch, _ = method.batch(init_state(method.params, optax.identity(), 0), 0, index)
    micro = {key: value[0] for key, value in method.objective.split(batch, 1).items()}
    assert len(micro["reader_ids"].sharding.device_set) == 8
    got = _computed(method.objective.loss, method.params, micro, (None,) * 4)
    want = computed[name]
    np.testing.assert_allclose(got.loss, want.loss, rtol=RTOL)
    for group, leaves in want.grads.items():
        for ours, theirs in zip(got.grads[group], leaves, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(theirs).max())))


BASE_CONFIG = "from art_jax.config import default_config\n\n\ndef get_config():\n    return default_config()\n"


def _rows(workdir) -> list[dict]:
    """metrics.jsonl's rows, the stage timings left out."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in f]


def _train_elsewhere(settings: dict, workdir, *, devices: int, processes: int = 1) -> None:
    """`art-jax train` with ``settings`` as its own process(es), ``devices`` CPU devices each
    (several processes through launch/local.sh); its config: default_config() and the same overrides."""
    config = os.path.join(os.path.dirname(workdir), "base_config.py")
    with open(config, "w") as f:
        f.write(BASE_CONFIG)
    done = art_jax_job("train", f"--config={config}", f"--workdir={workdir}",
                       *(f"--config.{k}={v}" for k, v in settings.items()), devices=devices, processes=processes,
                       timeout=900)
    assert f"training on {devices * processes} devices ({processes} process(es))" in done.stdout


def _train_here(settings: dict, workdir) -> Trainer:
    """The run in this process, on the suite's 8 devices."""
    trainer = make_trainer(_config(settings), str(workdir))
    trainer.run()
    return trainer


def _close_rows(rows, expected, rtol):
    assert [row["step"] for row in rows] == [row["step"] for row in expected]
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        np.testing.assert_allclose([row[k] for k in sorted(row)], [want[k] for k in sorted(want)], rtol=rtol,
                                   err_msg=f"step {row['step']}: {sorted(row)}")


# individual_topk's run differs from emdr2's in its loss alone, which the step test above partitions;
# one method's run on 1 device as well (its reader's dropout, the sums over devices, its evaluation unsplit)
@pytest.mark.parametrize("method,one_device", [("emdr2", True), ("joint_topk", False), ("fid", False)])
def test_two_processes_and_one_device_train_as_eight(world, models, tmp_path, method, one_device):
    """Every metric of every step (loss, its terms, |g|, lr, lambda, index staleness) and the dev
    evaluations (EM and F1, each process decoding its share; top-k) of 2 processes x 4 devices (and
    for emdr2 of 1 process x 1 device): those of 1 process x 8 devices. The index is refreshed after
    step 2 (each process embedding its share), so steps 3-4 search the one the run's towers wrote."""
    refreshed = method in ("emdr2", "individual_topk")  # joint_topk's index is never refreshed, fid has none
    settings = _settings(method, world, models, **{**RUN, "data.dev_questions": world[1],
                                                   "data.dev_results": world[2], "train.eval_every": 2,
                                                   "train.eval_topk": "(1,2)", "train.refresh_every": 2 * refreshed})
    _train_here(settings, tmp_path / "eight")
    _train_elsewhere(settings, str(tmp_path / "two"), devices=4, processes=2)
    if one_device:
        _train_elsewhere(settings, str(tmp_path / "one"), devices=1)
    eight = _rows(tmp_path / "eight")
    losses = [row["loss"] for row in eight]
    assert len(losses) == 4 and np.ptp(losses) > 1e-2, losses  # the steps train: a changed update would show
    if refreshed:
        assert [row["index_staleness"] for row in eight] == [0, 1, 0, 1]
    _close_rows(_rows(tmp_path / "two"), eight, rtol=1e-5)
    if one_device:
        _close_rows(_rows(tmp_path / "one"), eight, rtol=1e-5)


def _leaves(trainer) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.state.params))]


def test_a_preempted_reader_run_resumes_as_the_uninterrupted_one(world, models, tmp_path, monkeypatch):
    """emdr2 stopped by SIGTERM after step 2, its index refresh due as it resumes, then rerun: the
    uninterrupted run's metrics and final parameters, bitwise (one process, one device count)."""
    settings = _settings("emdr2", world, models, **{**RUN, "train.refresh_every": 2})
    straight = _train_here(settings, tmp_path / "straight")
    workdir = tmp_path / "run"
    real_step = Trainer.train_step

    def preempt_after_2(self, step):
        metrics = real_step(self, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a preemption notice would
        return metrics

    monkeypatch.setattr(Trainer, "train_step", preempt_after_2)
    assert make_trainer(_config(settings), str(workdir)).run()["after"] == {}
    monkeypatch.undo()
    assert [row["step"] for row in _rows(workdir)] == [1, 2]
    resumed = _train_here(settings, workdir)
    assert _rows(workdir) == _rows(tmp_path / "straight")
    assert [row["index_staleness"] for row in _rows(workdir)] == [0, 1, 0, 1]  # refreshed at step 2
    for a, b in zip(_leaves(resumed), _leaves(straight)):
        np.testing.assert_array_equal(a, b)
