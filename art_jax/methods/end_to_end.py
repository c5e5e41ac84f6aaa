"""Reader and retriever trained together on question-answer pairs: EMDR2 (``emdr2.py``),
Individual top-K (``individual_topk.py``) and Joint top-K (``joint_topk.py``) share everything
here but their loss.

A step, as ART's: this process's questions -> question tower (the step's dropout) -> exact top-K
rows from the sharded index (stale, refreshed; joint_topk's never refreshed) -> the rows'
retriever tokens, re-embedded in the loss by the passage tower (each micro-batch's distinct rows
once, as ART; joint_topk's frozen tower's vectors are read from its index instead), and the reader
inputs (question + passage k, ``methods/reading.py``) with one gold answer drawn per epoch -> the
generic update. Questions without answers are counted and left out.

Batch: question_ids/mask [B, Lq], the reader arrays [B, K, N] and [B, T]; the retrieved passages
as passage_index [B, K] (which of the micro-batch's U passages) and passage_ids/mask [A, U, Lp] per
micro-batch, or as passage_vectors [B, K, D] (the index's, in its dtype).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.batching import round_up
from art_jax.core.errors import UserError
from art_jax.core.sharding import from_identical, from_process_rows, process_rows
from art_jax.data.reader_inputs import article_continuation, fill_from_article
from art_jax.data.shuffle import step_positions
from art_jax.data.tokenization import tokenize_questions
from art_jax.evaluation.predict import Retrieved
from art_jax.methods.art import check_store_tokens, unique_passages
from art_jax.methods.common import (
    TrainsTowers,
    answer_metrics,
    check_batch,
    check_input_files,
    check_retriever,
    check_selection,
    check_topk,
    dev_retrieval,
    epoch_steps,
    open_store,
)
from art_jax.methods.questions import check_question_sources, training_questions
from art_jax.methods.reading import (
    READER_ARRAYS,
    READER_METRICS,
    check_reader,
    drawn_answer,
    initial_reader,
    reader_arrays,
    reader_keys,
    reader_settings,
    reading_metrics,
)
from art_jax.objectives import retrieval_scores, retriever_log_probs, score_scale
from art_jax.retrieval.encoder import load_retriever_tokenizer
from art_jax.training.state import ParamGroups, TrainState
from art_jax.training.update import Objective, split_evenly, step_key

PASSAGE_ARRAYS = ("passage_ids", "passage_mask")  # [A, U, Lp]; every other array is per question


def step_keys(key: jax.Array) -> tuple[jax.Array, ...]:
    """A step's dropout keys: question tower, passage tower, reader encoder, reader decoder."""
    towers, reader = jax.random.split(key)
    return (*jax.random.split(towers), *reader_keys(reader))


def split_micro_batches(batch: dict[str, jax.Array], accumulation: int) -> dict[str, jax.Array]:
    """Per-question arrays cut into A micro-batches; the passage arrays are per micro-batch already."""
    per_question = split_evenly({name: v for name, v in batch.items() if name not in PASSAGE_ARRAYS}, accumulation)
    return {name: per_question.get(name, value) for name, value in batch.items()}


def _questions(groups: ParamGroups, params, batch, keys) -> jax.Array:
    return groups.module(params, "question").embed_cls(batch["question_ids"], batch["question_mask"],
                                                       dropout_key=keys[0])


def retriever_scores(groups: ParamGroups, params, batch, keys) -> jax.Array:
    """q . z [B, K] of each question and its K retrieved passages, both re-embedded."""
    p = groups.module(params, "passage").embed_cls(batch["passage_ids"], batch["passage_mask"], dropout_key=keys[1])
    return retrieval_scores(_questions(groups, params, batch, keys), p[batch["passage_index"]])


def indexed_retriever_scores(groups: ParamGroups, params, batch, keys) -> jax.Array:
    """q . z [B, K] of each re-embedded question and its K passages' vectors as the index stores them
    (a frozen passage tower's own, at the index's dtype): what ranked them and what `art-jax answer`
    reads, without the passage tower's pass."""
    return retrieval_scores(_questions(groups, params, batch, keys), batch["passage_vectors"])


def log_p_retrieved(groups: ParamGroups, params, batch, keys, *, tau: float) -> jax.Array:
    """log p(z_k | q) [B, K] (``objectives.retriever_log_probs`` of ``retriever_scores``, both towers
    trained)."""
    return retriever_log_probs(retriever_scores(groups, params, batch, keys), tau)


def objective(loss, groups: ParamGroups, *, accumulation: int, **settings) -> Objective:
    """The update's objective of a method's ``loss(groups, params, batch, keys, **settings)``."""
    return Objective(functools.partial(loss, groups, **settings), keys=step_keys, accumulation=accumulation,
                     split=split_micro_batches)


def batch_shardings(mesh, *, vectors_from_index: bool = False) -> dict[str, NamedSharding]:
    """Per-question arrays split over `data` by question, the passage arrays [A, U, Lp] by passage;
    ``vectors_from_index``: passage_vectors [B, K, D] in place of the passages to re-embed."""
    questions, passages = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "data"))
    retrieved = ({"passage_vectors": questions} if vectors_from_index else
                 {"passage_index": questions, **{name: passages for name in PASSAGE_ARRAYS}})
    return {**{name: questions for name in ("question_ids", "question_mask", *READER_ARRAYS)}, **retrieved}


def unique_width(cfg, mesh) -> int:
    """U, the passages a micro-batch re-embeds: padded to its B x K, one shape to compile (the
    reader's K x N tokens a question cost far more than re-embedding the few passages
    deduplication would save)."""
    return round_up(cfg.train.batch_size // cfg.train.accumulation * cfg.train.topk, mesh.size)


def retriever_tau(cfg, embedding_dim: int) -> float:
    """The scale of q . z in p(z | q) = softmax(q . z / tau)."""
    return float(score_scale(embedding_dim, cfg.train.temperature_multiplier, cfg.train.score_scaling))


def embed_questions(groups: ParamGroups, state: TrainState, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The step's queries with the step's question dropout: the query that retrieves is the one
    the loss sees."""
    return groups.module(state.params, "question").embed_cls(ids, mask, dropout_key=step_keys(step_key(state))[0])


class EndToEnd(TrainsTowers):
    """The loop's method for end-to-end reader and retriever training; subclasses give the loss as
    ``objective_loss(groups, params, batch, keys, **loss_settings(cfg, tau))``, a pure function over
    the batch above, keys as ``step_keys``."""

    index_use = "train"
    log_labels = {"grad_norm": "|g|", "learning_rate": "lr", "index_staleness": "staleness"}
    objective_loss: Callable[..., tuple[jax.Array, dict]]
    biased_reader = False  # whether the reader reads with a cross-attention bias from the retriever
    # whether the loss takes the retrieved passages' vectors from the index rather than re-embedding
    # them (a frozen passage tower, its index never refreshed: the same vectors, without its pass)
    vectors_from_index = False

    @staticmethod
    def loss_settings(cfg, tau: float) -> dict:
        """The loss's settings beside the parameter groups: tau, the retriever scores' scale."""
        return {"tau": tau}

    def loss(self, params, batch, keys):
        return self.objective_loss(self.groups, params, batch, keys, **self.loss_settings(self.cfg, self.tau))

    @staticmethod
    def other_modules(cfg) -> dict:
        """Trained modules beside the towers and the reader, by role."""
        return {}

    @staticmethod
    def eval_metrics(cfg) -> tuple[str, ...]:
        return READER_METRICS + answer_metrics(cfg)

    @staticmethod
    def check_settings(cfg) -> None:
        """The method's own config rules, which need no file (``--dry-run`` checks them too)."""

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.check_settings(cfg)
        check_question_sources(cfg)
        check_topk(cfg)
        # a span store's run evaluates on held-out sentences unless dev questions are given
        check_selection(cfg, "salient_dev" if cfg.data.salient_spans and not cfg.data.dev_questions
                        else "dev_questions")
        check_batch(cfg, accumulation=cfg.train.accumulation)
        check_retriever(cfg)
        check_reader(cfg)
        check_input_files(cfg, ("train_questions", "dev_questions"))

    def __init__(self, cfg, workdir: str, mesh):
        self.cfg, self.mesh = cfg, mesh
        train = cfg.train
        self.tokenizer = load_retriever_tokenizer(cfg.retriever.checkpoint)
        self.my_rows = process_rows(mesh, train.batch_size)
        if (self.my_rows.stop - self.my_rows.start) * jax.process_count() != train.batch_size:
            raise UserError(f"train: this process has {jax.local_device_count()} of the {jax.device_count()} devices; "
                            f"every one of the {jax.process_count()} processes needs as many devices")
        self.store = open_store(cfg, workdir)
        check_store_tokens(self.store, "data.corpus_store" if cfg.data.corpus_store else "data.corpus", self.tokenizer)
        # a span example's own passage is kept out of its top-K
        if train.topk + bool(cfg.data.salient_spans) > len(self.store):
            raise UserError(f"train.topk={train.topk} is larger than the corpus ({len(self.store)} passages"
                            f"{', one of them excluded per question' if cfg.data.salient_spans else ''})")

        reader = initial_reader(cfg)
        self.reader_tokenizer = reader.tokenizer
        self.training, self.dev = training_questions(cfg, self.store, self.tokenizer, self.reader_tokenizer)
        self.steps_per_epoch, self.total_steps = epoch_steps(
            cfg, len(self.training), "salient-span examples" if cfg.data.salient_spans else "training questions with "
            "answers")
        self.init_towers(cfg, reader=reader.model, **self.other_modules(cfg))
        self.tau = retriever_tau(cfg, self.groups.module(self.params, "question").config.embedding_dim)
        self.settings = reader_settings(cfg, **self.joint_settings(cfg))
        self.initial_reader = (cfg.reader.checkpoint, self.settings)
        self.max_lengths["reader"] = self.settings.max_input_tokens
        self.objective = objective(self.objective_loss, self.groups, accumulation=train.accumulation,
                                   **self.loss_settings(cfg, self.tau))
        self.batch_shardings = batch_shardings(mesh, vectors_from_index=self.vectors_from_index)
        questions, replicated = self.batch_shardings["question_ids"], NamedSharding(mesh, P())
        self._embed_questions = jax.jit(functools.partial(embed_questions, self.groups),
                                        in_shardings=(None, questions, questions),  # None: the state as placed
                                        out_shardings=replicated)

    def joint_settings(self, cfg) -> dict:
        """ReaderSettings' Joint top-K fields (joint_topk alone has them)."""
        return {}

    def describe(self) -> str:
        train = self.cfg.train
        return f"global batch {train.batch_size}, K={train.topk}, {self.steps_per_epoch} steps per epoch"

    def passages_of(self, rows: np.ndarray) -> list[list[tuple[str, str]]]:
        """(title, text) of each retrieved row; with reader.pad_with_following a short passage goes on
        with the next ones of its article (EMDR2; every word is at least one token)."""
        store, length = self.store, self.settings.max_input_tokens

        def text(row: int) -> str:
            if not self.cfg.reader.pad_with_following:
                return store.text(row)
            return fill_from_article(store.text(row), article_continuation(store, row), length)

        return [[(store.title(int(r)), text(int(r))) for r in question_rows] for question_rows in rows]

    def batch(self, state: TrainState, step: int, index) -> tuple[dict[str, jax.Array], dict[str, float]]:
        cfg, mesh = self.cfg, self.mesh
        start = time.perf_counter()
        # every question of the step (the search is every process's), this process's rows of them
        epoch, every = step_positions(step, steps_per_epoch=self.steps_per_epoch, batch_size=cfg.train.batch_size,
                                      accumulation=1, rows=slice(0, cfg.train.batch_size), count=len(self.training),
                                      seed=cfg.seed)
        indices = every[self.my_rows]
        questions = self.training.take(indices)
        q_tokens = tokenize_questions(self.tokenizer, questions.retriever, cfg.retriever.question_max_length,
                                      truncation_side=cfg.retriever.question_truncation,
                                      pad_to=cfg.retriever.question_max_length)
        question_ids, question_mask = (from_process_rows(mesh, a) for a in (q_tokens.ids, q_tokens.mask))
        if cfg.data.salient_source_passage:  # each sentence with its own passage, nothing searched
            rows = self.training.excluded(every)[:, None]
        else:
            queries = self._embed_questions(state, question_ids, question_mask)
            _, rows = index.search(np.asarray(queries), cfg.train.topk, self.training.excluded(every))  # all B x K
        searched = time.perf_counter()
        if self.vectors_from_index:
            retrieved = {"passage_vectors": index.vectors(rows, self.batch_shardings["passage_vectors"])}
        else:
            retrieved = {name: from_identical(self.batch_shardings[name], value)
                         for name, value in self.passages_to_embed(rows).items()}
        answers = [drawn_answer(targets, seed=cfg.seed, epoch=epoch, index=i)
                   for targets, i in zip(questions.targets, indices)]
        local = reader_arrays(self.reader_tokenizer, self.settings, questions.reader,
                              self.passages_of(rows[self.my_rows]), answers)
        batch = {"question_ids": question_ids, "question_mask": question_mask,
                 **{name: from_process_rows(mesh, value) for name, value in local.items()}, **retrieved}
        return batch, {"time_search": searched - start}

    def passages_to_embed(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every question's retrieved ``rows`` [B, K] as the loss re-embeds them: each micro-batch's
        distinct passages' tokens [A, U, Lp] and where each question's K are among them [B, K]."""
        unique_rows, positions = unique_passages(rows, self.cfg.train.accumulation, unique_width(self.cfg, self.mesh))
        passages = self.store.retriever_tokens(unique_rows.reshape(-1), self.cfg.retriever.train_passage_max_length,
                                               multiple=8)
        micro_batches, unique = unique_rows.shape
        return {"passage_index": positions, "passage_ids": passages.ids.reshape(micro_batches, unique, -1),
                "passage_mask": passages.mask.reshape(micro_batches, unique, -1)}

    def evaluate(self, state: TrainState, index) -> dict[str, float]:
        if not self.dev:
            return {}
        k, dev = self.cfg.train.topk, self.dev
        metrics, scores, rows = dev_retrieval(self.cfg, self.groups, state, self.tokenizer, dev.for_retrieval(), index,
                                              self.store, depth=k, exclude=dev.exclude)
        if self.cfg.data.salient_source_passage and dev.exclude is not None:  # read as trained: its own passage
            scores, rows = np.zeros((len(dev), 1), np.float32), dev.exclude[:, None]
        items = [Retrieved(question, passages, question_scores[:k].tolist())
                 for question, passages, question_scores in zip(dev.reader, self.passages_of(rows[:, :k]), scores)]
        settings = self.evaluation_settings(state)
        metrics.update(reading_metrics(self.groups.module(state.params, "reader"), self.reader_tokenizer, settings,
                                       items, dev.gold, topk=k, batch_size=self.cfg.reader.eval_batch_size))
        return metrics

    def evaluation_settings(self, state: TrainState):
        """The reader's settings as trained so far (joint_topk: its current lambda)."""
        return self.settings
