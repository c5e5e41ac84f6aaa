"""ART (Sachan et al., TACL 2023): questions alone, a frozen teacher's question likelihood of
each retrieved passage as soft labels.

A step: this process's questions -> question tower (the step's dropout) -> exact top-K rows
from the sharded index -> the frozen teacher's score of every (question, passage) pair ->
the rows' passage tokens from the memory-mapped corpus store -> the generic update, whose
loss re-embeds the questions and each micro-batch's retrieved passages once (with gradient)
and takes KL(teacher || student) over the K passages.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.batching import round_up
from art_jax.core.errors import UserError
from art_jax.core.sharding import from_identical, from_process_rows, process_rows
from art_jax.data.corpus import CorpusStore
from art_jax.data.prompts import PromptBuilder
from art_jax.data.questions import read_questions
from art_jax.data.tasks import question_stream
from art_jax.data.tokenization import passage_rows, tokenize_questions
from art_jax.methods.common import (
    TrainsTowers,
    answer_metrics,
    check_batch,
    check_input_files,
    check_retriever,
    check_topk,
    dev_accuracy,
    open_store,
)
from art_jax.models.hf import load_tokenizer
from art_jax.objectives import art_loss
from art_jax.retrieval.encoder import load_retriever_tokenizer
from art_jax.teachers.cache import ScoreCache
from art_jax.training.loop import check_total_steps
from art_jax.training.state import ParamGroups, TrainState
from art_jax.training.update import Objective, split_evenly, step_key

# per-question arrays of a step's batch; the others are per micro-batch ([A, U, Lp])
PER_QUESTION = ("question_ids", "question_mask", "passage_index", "teacher_scores")


def unique_passages(rows: np.ndarray, accumulation: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Each micro-batch's retrieved rows once. ``rows`` [B, K] -> (store rows [A, U], positions
    [B, K] into their micro-batch's U); micro-batch a holds questions a, a + A, ... (as
    ``training.update.split_evenly`` deals them). U is the largest micro-batch's count rounded up
    to ``multiple``, so few shapes get compiled; shorter lists repeat their last row, and no
    question points at those copies (they get no gradient)."""
    groups = [rows[a::accumulation] for a in range(accumulation)]
    uniques, inverses = zip(*(np.unique(group, return_inverse=True) for group in groups))
    width = round_up(max(map(len, uniques)), multiple)
    unique_rows = np.stack([np.pad(unique, (0, width - len(unique)), mode="edge") for unique in uniques])
    positions = np.empty(rows.shape, np.int32)
    for a, (group, inverse) in enumerate(zip(groups, inverses)):
        positions[a::accumulation] = inverse.reshape(group.shape)
    return unique_rows, positions


def split_micro_batches(batch: dict[str, jax.Array], accumulation: int) -> dict[str, jax.Array]:
    """Leading axis A on every array: per-question ones split into A equal parts, passage
    ones ([A, U, Lp]) are per micro-batch already."""
    per_question = split_evenly({name: batch[name] for name in PER_QUESTION}, accumulation)
    return {name: per_question.get(name, value) for name, value in batch.items()}


def tower_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A step's dropout keys for the question and the passage tower."""
    question_key, passage_key = jax.random.split(key)
    return question_key, passage_key


def loss(groups: ParamGroups, temperature_multiplier: float, score_scaling: bool, params, batch, keys):
    """``batch``: question_ids/mask [B, Lq], passage_ids/mask [U, Lp], passage_index [B, K]
    (which of the U passages each question retrieved), teacher_scores [B, K]."""
    question_key, passage_key = keys
    q = groups.module(params, "question").embed_cls(batch["question_ids"], batch["question_mask"],
                                                    dropout_key=question_key)
    p = groups.module(params, "passage").embed_cls(batch["passage_ids"], batch["passage_mask"],
                                                   dropout_key=passage_key)
    return art_loss(q, p[batch["passage_index"]], batch["teacher_scores"], temperature_multiplier, score_scaling)


def objective(groups: ParamGroups, *, temperature_multiplier: float = 1.0, score_scaling: bool = True,
              accumulation: int = 1) -> Objective:
    return Objective(functools.partial(loss, groups, temperature_multiplier, score_scaling), keys=tower_keys,
                     accumulation=accumulation, split=split_micro_batches)


def batch_shardings(mesh) -> dict[str, NamedSharding]:
    """Per-question arrays split over `data`, each micro-batch's unique passages [A, U, Lp] along U."""
    questions, passages = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "data"))
    return {name: questions if name in PER_QUESTION else passages
            for name in (*PER_QUESTION, "passage_ids", "passage_mask")}


def embed_questions(groups: ParamGroups, state: TrainState, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The step's queries, with the step's dropout: the query that retrieves is the query the
    loss sees (bit for bit without gradient accumulation)."""
    question_key, _ = tower_keys(step_key(state))
    return groups.module(state.params, "question").embed_cls(ids, mask, dropout_key=question_key)


def check_store_tokens(store: CorpusStore, key: str, retriever_tokenizer, scorer_tokenizer=None) -> None:
    """A store made with other tokenizers than the run's (or without the teacher's tokens a T5
    teacher needs) is refused before the first step: its first passage is tokenized again
    and compared with what the store holds."""
    title, text = store.title(0), store.text(0)
    stored = store.retriever.row(0).tolist()
    fresh = passage_rows(retriever_tokenizer, [title], [text], store.meta["retriever"]["max_length"])[0]
    if stored != fresh:
        raise UserError(f"{key}: {store.path} was tokenized for the retriever with "
                        f"{store.meta['retriever']['tokenizer']!r}, whose tokens differ from retriever.checkpoint's; "
                        "prepare the store with the run's retriever (art-jax prepare-corpus --retriever ...)")
    if scorer_tokenizer is None:
        return
    if store.scorer is None:
        raise UserError(f"{key}: {store.path} holds no teacher tokens, which scorer.kind='t5' needs; "
                        "prepare it with art-jax prepare-corpus --scorer SCORER_CHECKPOINT")
    fresh = PromptBuilder(scorer_tokenizer).passage_ids([title], [text])[0][:store.meta["scorer"]["max_length"]]
    if store.scorer.row(0).tolist() != fresh:
        raise UserError(f"{key}: {store.path} holds teacher tokens of {store.meta['scorer']['tokenizer']!r}, "
                        "which differ from scorer.checkpoint's tokenizer; prepare the store with the run's scorer")


def make_teacher(cfg, tokenizer, store, mesh):
    if cfg.scorer.kind == "query_likelihood":
        from art_jax.teachers.query_likelihood import QueryLikelihoodScorer

        return QueryLikelihoodScorer(tokenizer, store, mu=cfg.scorer.mu, scale=cfg.scorer.scale,
                                     max_length=cfg.retriever.question_max_length)
    from art_jax.data.prompts import PromptConfig
    from art_jax.teachers.t5 import T5Scorer

    return T5Scorer.from_pretrained(cfg.scorer.checkpoint, dtype=cfg.scorer.dtype, prompt=PromptConfig(), mesh=mesh)


class Art(TrainsTowers):
    """The ART method for ``training.loop.Trainer``."""

    name = "art"
    index_use = "train"
    log_labels = {"teacher_entropy": "H(teacher)", "student_entropy": "H(student)", "argmax_agreement": "agree",
                  "grad_norm": "|g|", "learning_rate": "lr", "index_staleness": "staleness"}

    @staticmethod
    def eval_metrics(cfg) -> tuple[str, ...]:
        return answer_metrics(cfg)

    @staticmethod
    def check_config(cfg) -> None:
        if cfg.scorer.kind not in ("t5", "query_likelihood"):
            raise UserError(f"scorer.kind: {cfg.scorer.kind!r} is not 't5' or 'query_likelihood'")
        if cfg.scorer.cache < 0:
            raise UserError(f"scorer.cache={cfg.scorer.cache} is negative (0: no teacher-score cache)")
        check_topk(cfg)
        check_batch(cfg, accumulation=cfg.train.accumulation)
        check_retriever(cfg)
        # (data.corpus is read only when the store is prepared: a resumed run may have dropped it)
        check_input_files(cfg, ("train_questions", "dev_questions"))

    def __init__(self, cfg, workdir: str, mesh):
        self.cfg, self.mesh = cfg, mesh
        train = cfg.train
        self.tokenizer = load_retriever_tokenizer(cfg.retriever.checkpoint)
        self.dev_questions = read_questions(cfg.data.dev_questions) if cfg.data.dev_questions else []
        # this process's shards of the training questions (a seqio Task): its rows of each global batch
        self.stream = question_stream(cfg.data.dataset, cfg.data.train_questions, batch_size=train.batch_size,
                                      seed=cfg.seed, num_shards=cfg.data.shards or jax.process_count(),
                                      process=jax.process_index(), processes=jax.process_count())
        self.my_rows = process_rows(mesh, train.batch_size)
        if self.my_rows.stop - self.my_rows.start != train.batch_size // jax.process_count():
            raise UserError(f"train: this process has {jax.local_device_count()} of the {jax.device_count()} devices; "
                            f"every one of the {jax.process_count()} processes needs as many devices")
        self.total_steps = train.steps or train.epochs * self.stream.steps_per_epoch
        check_total_steps(cfg, self.total_steps)  # before the heavy work
        # a given store is only opened: checked before any heavy work
        self.store = open_store(cfg, workdir, scorer=cfg.scorer.checkpoint if cfg.scorer.kind == "t5" else None)
        check_store_tokens(self.store, "data.corpus_store" if cfg.data.corpus_store else "data.corpus", self.tokenizer,
                           load_tokenizer(cfg.scorer.checkpoint) if cfg.scorer.kind == "t5" else None)
        if train.topk > len(self.store):
            raise UserError(f"train.topk={train.topk} is larger than the corpus ({len(self.store)} passages)")
        self.teacher = make_teacher(cfg, self.tokenizer, self.store, mesh)
        self.cache = ScoreCache(self.teacher, cfg.scorer.cache) if cfg.scorer.cache else None

        self.init_towers(cfg)
        self.objective = objective(self.groups, temperature_multiplier=train.temperature_multiplier,
                                   score_scaling=train.score_scaling,
                                   accumulation=train.accumulation)
        self.batch_shardings = batch_shardings(mesh)
        replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        self._embed_questions = jax.jit(functools.partial(embed_questions, self.groups),
                                        in_shardings=(None, rows, rows), out_shardings=replicated)  # None: the
        # state as the trainer placed it (replicated, or split by FSDP)
        # U is padded to a multiple of an eighth of the micro-batch's B x K: at most 8 shapes to compile
        micro_batch = train.batch_size // train.accumulation
        self._unique_multiple = round_up(max(8, micro_batch * train.topk // 8), mesh.size)

    def describe(self) -> str:
        return f"global batch {self.cfg.train.batch_size}, K={self.cfg.train.topk}"

    def batch(self, state: TrainState, step: int, index) -> tuple[dict[str, jax.Array], dict[str, float]]:
        cfg, mesh = self.cfg, self.mesh
        start = time.perf_counter()
        indices, texts = self.stream.batch(step)  # this process's questions: rows my_rows of the global batch
        q_tokens = tokenize_questions(self.tokenizer, texts, cfg.retriever.question_max_length,
                                      truncation_side=cfg.retriever.question_truncation,
                                      pad_to=cfg.retriever.question_max_length)
        question_ids, question_mask = (from_process_rows(mesh, a) for a in (q_tokens.ids, q_tokens.mask))
        queries = self._embed_questions(state, question_ids, question_mask)
        _, rows = index.search(np.asarray(queries), cfg.train.topk)  # every process: all B x K
        searched = time.perf_counter()
        cached = {}
        if self.cache is not None:
            teacher_scores, cached["teacher_cache_hit_rate"] = self.cache.score_retrieved(
                texts, indices, rows[self.my_rows], self.store, batch_size=cfg.scorer.batch_size)
        else:
            teacher_scores = np.asarray(self.teacher.score_retrieved(texts, rows[self.my_rows], self.store,
                                                                     batch_size=cfg.scorer.batch_size))
        scored = time.perf_counter()
        # the same on every process (all hold every row): the global dedupe and its tokens
        unique_rows, positions = unique_passages(rows, cfg.train.accumulation, self._unique_multiple)
        passages = self.store.retriever_tokens(unique_rows.reshape(-1), cfg.retriever.train_passage_max_length,
                                               multiple=8)
        micro_batches, unique = unique_rows.shape
        identical = {"passage_index": positions, "passage_ids": passages.ids.reshape(micro_batches, unique, -1),
                     "passage_mask": passages.mask.reshape(micro_batches, unique, -1)}
        batch = {"question_ids": question_ids, "question_mask": question_mask,
                 "teacher_scores": from_process_rows(mesh, teacher_scores.astype(np.float32)),
                 **{name: from_identical(self.batch_shardings[name], value) for name, value in identical.items()}}
        return batch, {"time_search": searched - start, "time_scorer": scored - searched, **cached}

    def evaluate(self, state: TrainState, index) -> dict[str, float]:
        if not self.dev_questions:
            return {}
        return dev_accuracy(self.cfg, self.groups, state, self.tokenizer, self.dev_questions, index, self.store)
