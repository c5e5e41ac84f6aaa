"""Contrastive dual-encoder training, shared by supervised DPR, ICT and pair pre-training:
each question's positive among every passage of the global batch (DPR's NLL over all
devices' passages, ``objectives.contrastive_loss``), gradients cached across micro-batches
so the whole global batch stays the negatives (``training/grad_cache.py``).

The methods differ only in where a step's examples come from: a subclass says how many
examples an epoch has and gives example i of an epoch as (question, [positive, hard
negatives...]). A step takes positions step*B .. step*B+B-1 of its epoch's order
(``data/shuffle.py``): the step alone fixes the data, on every host.

Batch layout: every array has a leading micro-batch axis A (``train.accumulation``) and is
split over ``data`` along its second axis, so each micro-batch spans every device; global
question g = a * b + j (b = B / A) owns passages g * P .. g * P + P - 1, its positive first.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.errors import UserError
from art_jax.core.sharding import local_replica, make_mesh, process_rows
from art_jax.data.examples import read_training_examples
from art_jax.data.questions import read_questions
from art_jax.data.shuffle import step_positions
from art_jax.data.tokenization import Tokens, tokenize_passages, tokenize_questions
from art_jax.methods.common import (
    TrainsTowers,
    answer_metrics,
    check_batch,
    check_input_files,
    check_retriever,
    dev_accuracy,
    epoch_steps,
    open_store,
)
from art_jax.models.hf import for_inference
from art_jax.objectives import contrastive_loss
from art_jax.retrieval.encoder import load_retriever_tokenizer
from art_jax.retrieval.proxy import ProxyCorpus
from art_jax.training.grad_cache import cached_gradients, whole_batch_loss
from art_jax.training.state import ParamGroups, TrainState
from art_jax.training.update import Objective

ARRAYS = ("question_ids", "question_mask", "passage_ids", "passage_mask")
Passage = tuple[str, str]  # (title, text)


def encode(groups: ParamGroups, params, micro_batch: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
    """One micro-batch's question and passage embeddings (each tower its own dropout key)."""
    question_key, passage_key = jax.random.split(key)
    return {"questions": groups.module(params, "question").embed_cls(
                micro_batch["question_ids"], micro_batch["question_mask"], dropout_key=question_key),
            "passages": groups.module(params, "passage").embed_cls(
                micro_batch["passage_ids"], micro_batch["passage_mask"], dropout_key=passage_key)}


def loss_of_embeddings(temperature_multiplier: float, score_scaling: bool, embeddings, batch):
    """The NLL over the whole batch from every micro-batch's embeddings ([A, b, H], [A, b*P, H])."""
    del batch  # the layout alone says which passage is whose
    flat = {name: value.reshape(-1, value.shape[-1]) for name, value in embeddings.items()}
    return contrastive_loss(flat["questions"], flat["passages"], temperature_multiplier, score_scaling)


def objective(groups: ParamGroups, *, temperature_multiplier: float = 1.0, score_scaling: bool = True,
              accumulation: int = 1) -> Objective:
    """The loss of a whole batch and its cached gradients (plain backpropagation for one
    micro-batch); the step's key is the dropout key."""
    encode_fn = functools.partial(encode, groups)
    loss_fn = functools.partial(loss_of_embeddings, temperature_multiplier, score_scaling)
    return Objective(functools.partial(whole_batch_loss, encode_fn, loss_fn), accumulation=accumulation,
                     gradients=functools.partial(cached_gradients, encode_fn, loss_fn))


def draw_hard_negatives(rng: np.random.Generator, available: int, wanted: int) -> np.ndarray:
    """Which of an example's ``available`` hard negatives an epoch takes: ``wanted`` at most, at random."""
    return rng.permutation(available)[:wanted]


def random_fill(rng: np.random.Generator, population: int, count: int, is_own) -> np.ndarray:
    """``count`` random draws from range(population) to fill missing hard negatives; a draw that
    ``is_own`` (draws -> bool mask) says is the example's own positive is drawn again (a few times
    at most: a tiny population may hold nothing else)."""
    draws = rng.integers(population, size=count)
    for _ in range(8):
        own = np.asarray(is_own(draws), bool)
        if not own.any():
            break
        draws[own] = rng.integers(population, size=int(own.sum()))
    return draws


def batch_shardings(mesh) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, P(None, "data")) for name in ARRAYS}


class Contrastive(TrainsTowers):
    """The loop's method for contrastive training; subclasses give the examples."""

    name = "contrastive"
    log_labels = {"accuracy": "in-batch acc", "positive_rank": "rank", "grad_norm": "|g|", "learning_rate": "lr"}
    hard_negatives = 0  # per question, beside its positive (the subclass sets it)

    # ------------------------------------------------------------------ a subclass gives
    num_examples: int  # examples in an epoch

    def load_examples(self, cfg) -> None:
        """Reads the training data; sets ``num_examples`` and ``hard_negatives`` (``self.store``
        is open by then when the run has a corpus)."""
        raise NotImplementedError

    def examples(self, indices: list[int], epoch: int) -> list[tuple[str, list[Passage]]]:
        """(question, [positive, hard negative, ...]) of each example in ``epoch``, exactly
        ``1 + hard_negatives`` passages each."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @staticmethod
    def eval_metrics(cfg) -> tuple[str, ...]:
        """Top-k answer accuracy over the evidence index with data.dev_questions; MRR over the
        in-memory proxy corpus with data.dev_examples."""
        return answer_metrics(cfg) + (("mrr",) if cfg.data.dev_examples else ())

    @staticmethod
    def check_config(cfg) -> None:
        check_batch(cfg, accumulation=cfg.train.accumulation)
        check_retriever(cfg)
        if cfg.train.hard_negatives < 0:
            raise UserError(f"train.hard_negatives={cfg.train.hard_negatives} must be 0 or more")
        check_input_files(cfg, ("dev_questions", "dev_examples"))
        if cfg.data.dev_questions and not (cfg.data.corpus or cfg.data.corpus_store):
            raise UserError("data.dev_questions needs the evidence to search: set data.corpus or data.corpus_store")
        metric = cfg.train.best_metric
        if metric and not (cfg.data.dev_examples if metric == "mrr" else cfg.data.dev_questions):
            needs = "data.dev_examples" if metric == "mrr" else "data.dev_questions"
            raise UserError(f"train.best_metric={metric!r} needs {needs}; set train.best_metric='' to train "
                            "without selecting a best checkpoint")

    def __init__(self, cfg, workdir: str, mesh):
        self.cfg, self.mesh = cfg, mesh
        train = cfg.train
        self.tokenizer = load_retriever_tokenizer(cfg.retriever.checkpoint)
        self.store = open_store(cfg, workdir) if cfg.data.corpus or cfg.data.corpus_store else None
        self.load_examples(cfg)
        self.micro_batch = train.batch_size // train.accumulation
        self.my_rows = process_rows(mesh, self.micro_batch)  # of every micro-batch
        if (self.my_rows.stop - self.my_rows.start) * jax.process_count() != self.micro_batch:
            raise UserError(f"train: this process has {jax.local_device_count()} of the {jax.device_count()} devices; "
                            f"every one of the {jax.process_count()} processes needs as many devices")
        self.steps_per_epoch, self.total_steps = epoch_steps(cfg, self.num_examples, "training examples")
        self.dev_questions = read_questions(cfg.data.dev_questions) if cfg.data.dev_questions else []
        self.proxy = (ProxyCorpus.build(read_training_examples(cfg.data.dev_examples).examples, self.tokenizer,
                                        question_max_length=cfg.retriever.question_max_length,
                                        passage_max_length=cfg.retriever.train_passage_max_length,
                                        question_truncation=cfg.retriever.question_truncation)
                      if cfg.data.dev_examples else None)
        self.index_use = "eval" if self.dev_questions else None

        self.init_towers(cfg)
        self.objective = objective(self.groups, temperature_multiplier=train.temperature_multiplier,
                                   score_scaling=train.score_scaling, accumulation=train.accumulation)
        self.batch_shardings = batch_shardings(mesh)

    def describe(self) -> str:
        train = self.cfg.train
        return (f"global batch {train.batch_size} x (1 positive + {self.hard_negatives} hard negative(s)), "
                f"{self.steps_per_epoch} steps per epoch")

    def step_examples(self, step: int) -> tuple[int, list[int]]:
        """The epoch and the examples of this process's rows of ``step``, micro-batch-major."""
        train = self.cfg.train
        return step_positions(step, steps_per_epoch=self.steps_per_epoch, batch_size=train.batch_size,
                              accumulation=train.accumulation, rows=self.my_rows, count=self.num_examples,
                              seed=self.cfg.seed)

    def tokens(self, indices: list[int], epoch: int) -> tuple[Tokens, Tokens]:
        """The examples' questions [n, question_max_length] and passages [n * P,
        train_passage_max_length], padded to those lengths (static shapes). Tokenizes the text
        ``examples`` gives; a source that stores tokens gives them here instead."""
        cfg, questions, passages = self.cfg, [], []
        for question, its_passages in self.examples(indices, epoch):
            questions.append(question)
            passages += its_passages
        q = tokenize_questions(self.tokenizer, questions, cfg.retriever.question_max_length,
                               pad_to=cfg.retriever.question_max_length,
                               truncation_side=cfg.retriever.question_truncation)
        p = tokenize_passages(self.tokenizer, [t for t, _ in passages], [x for _, x in passages],
                              cfg.retriever.train_passage_max_length, pad_to=cfg.retriever.train_passage_max_length)
        return q, p

    def batch(self, state: TrainState, step: int, index) -> tuple[dict[str, jax.Array], dict[str, float]]:
        epoch, indices = self.step_examples(step)
        q, p = self.tokens(indices, epoch)
        if p.ids.shape[0] != (1 + self.hard_negatives) * q.ids.shape[0]:
            raise AssertionError(f"{type(self).__name__}: {p.ids.shape[0]} passages for {q.ids.shape[0]} questions")
        micro_batches = self.cfg.train.accumulation
        local = {"question_ids": q.ids, "question_mask": q.mask, "passage_ids": p.ids, "passage_mask": p.mask}
        batch = {name: jax.make_array_from_process_local_data(
                     self.batch_shardings[name], value.reshape(micro_batches, -1, value.shape[-1]))
                 for name, value in local.items()}
        return batch, {}

    def evaluate(self, state: TrainState, index) -> dict[str, float]:
        metrics = {}
        if self.dev_questions:
            metrics.update(dev_accuracy(self.cfg, self.groups, state, self.tokenizer, self.dev_questions, index,
                                        self.store))
        if self.proxy is not None:  # every process alone on its own devices (process 0 reports)
            local = make_mesh(devices=jax.local_devices())
            question, passage = (for_inference(self.groups.module(state.params, role))
                                 for role in ("question", "passage"))
            metrics["mrr"] = self.proxy.mrr(local_replica(question, local), local_replica(passage, local), local)
        return metrics
