"""`art-jax train`: the ART loop - retrieve, score, update; refresh the index; evaluate.

Stages talk through plain arrays: question tokens -> queries (jitted) -> exact top-K rows
from the sharded index -> the rows' passage tokens from the memory-mapped corpus store
and the frozen teacher's scores -> ``update`` (jitted, state donated).
"""

from __future__ import annotations

import functools
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.config import write_config
from art_jax.core import storage
from art_jax.core.batching import round_up
from art_jax.core.checkpoints import Checkpoints
from art_jax.core.distributed import any_process, is_lead, lead_value
from art_jax.core.errors import UserError
from art_jax.core.sharding import from_identical, from_process_rows, local_replica, make_mesh, process_rows
from art_jax.data.corpus import CorpusStore, TokenizerSpec, prepare_corpus
from art_jax.data.questions import read_questions
from art_jax.data.tasks import question_stream
from art_jax.data.tokenization import tokenize_questions
from art_jax.models.hf import load_bert, load_tokenizer
from art_jax.retrieval.encoder import DualEncoder
from art_jax.retrieval.index import IndexVersion, version_name
from art_jax.retrieval.refresh import IndexWatcher, build_index, initial_index, mark_finished
from art_jax.retrieval.results import dpr_results, retrieve
from art_jax.retrieval.search import ShardedIndex
from art_jax.train_step import (
    OptimConfig,
    Towers,
    embed_questions,
    init_state,
    jit_update,
    learning_rate_schedule,
    make_optimizer,
    unique_passages,
)
from art_jax.training.metrics import MetricWriter


def _check_config(cfg, devices: int, store: CorpusStore) -> None:
    if cfg.train.batch_size % (devices * cfg.train.accumulation):
        raise UserError(f"train.batch_size={cfg.train.batch_size} must divide evenly over {devices} devices "
                        f"x train.accumulation={cfg.train.accumulation}")
    if cfg.train.refresh_mode not in ("sync", "async"):
        raise UserError(f"train.refresh_mode: {cfg.train.refresh_mode!r} is not 'sync' or 'async'")
    allowed = [f"top{k}" for k in cfg.train.eval_topk]
    if cfg.train.best_metric not in ("", *allowed):
        raise UserError(f"train.best_metric: {cfg.train.best_metric!r} is not one of {', '.join(allowed)} "
                        f"(top-k accuracy for k in train.eval_topk) or '' (no best checkpoint)")
    if cfg.train.topk > len(store):
        raise UserError(f"train.topk={cfg.train.topk} is larger than the corpus ({len(store)} passages)")
    for key in ("train_questions", "dev_questions"):
        path = cfg.data[key]
        if path and not storage.is_remote(path) and not os.path.isfile(path):
            raise UserError(f"data.{key}: file not found: {path}")


def open_store(cfg, workdir: str) -> CorpusStore:
    """The configured corpus store, or one prepared from ``data.corpus`` into the workdir."""
    if cfg.data.corpus_store:
        return CorpusStore(cfg.data.corpus_store)
    path = os.path.join(workdir, "corpus_store")
    prepared = bool(lead_value(storage.isfile(os.path.join(path, "meta.json"))))  # one view for all
    if not (prepared or cfg.data.corpus):
        raise UserError("config: set data.corpus (an evidence TSV/JSONL) or data.corpus_store")
    if not prepared:  # every process tokenizes its share of the batches
        scorer = cfg.scorer.checkpoint if cfg.scorer.kind == "t5" else None
        return prepare_corpus(cfg.data.corpus, path, load_tokenizer(cfg.retriever.checkpoint),
                              TokenizerSpec(cfg.retriever.checkpoint, cfg.retriever.train_passage_max_length),
                              load_tokenizer(scorer) if scorer else None,
                              TokenizerSpec(scorer, 512) if scorer else None)
    return CorpusStore(path)


def make_teacher(cfg, tokenizer, store, mesh):
    from art_jax.data.prompts import PromptConfig
    from art_jax.teachers.query_likelihood import QueryLikelihoodScorer
    from art_jax.teachers.t5 import T5Scorer

    if cfg.scorer.kind == "query_likelihood":
        return QueryLikelihoodScorer(tokenizer, store, mu=cfg.scorer.mu, scale=cfg.scorer.scale,
                                     max_length=cfg.retriever.question_max_length)
    if cfg.scorer.kind == "t5":
        return T5Scorer.from_pretrained(cfg.scorer.checkpoint, dtype=cfg.scorer.dtype, prompt=PromptConfig(),
                                        mesh=mesh)
    raise UserError(f"scorer.kind: {cfg.scorer.kind!r} is not 't5' or 'query_likelihood'")


def build_model(cfg, total_steps: int):
    """(towers, optimizer config, optimizer, params) as a run starts from ``retriever.checkpoint``:
    what its train state is made of (the refresher rebuilds the state's shape from this)."""
    question = load_bert(cfg.retriever.checkpoint)
    passage = question if cfg.retriever.shared_towers else load_bert(cfg.retriever.checkpoint)
    towers, params = Towers.split(question, passage)
    optim = OptimConfig(learning_rate=cfg.train.learning_rate, total_steps=total_steps,
                        warmup_fraction=cfg.train.warmup_fraction, weight_decay=cfg.train.weight_decay,
                        clip_norm=cfg.train.clip_norm, train_question_tower=cfg.train.train_question_tower,
                        train_passage_tower=cfg.train.train_passage_tower)
    return towers, optim, make_optimizer(optim, params), params


class Trainer:
    """Holds what one run needs; ``run()`` trains to the end and returns the last evaluation."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
        self.cfg, self.workdir = cfg, workdir
        storage.makedirs(workdir)
        if is_lead():
            write_config(cfg, workdir)
        self.mesh = make_mesh()
        self.store = open_store(cfg, workdir)
        _check_config(cfg, self.mesh.size, self.store)
        self.tokenizer = load_tokenizer(cfg.retriever.checkpoint)
        self.dev_questions = read_questions(cfg.data.dev_questions) if cfg.data.dev_questions else []
        # this process's shards of the training questions (a seqio Task): its rows of each global batch
        self.stream = question_stream(cfg.data.dataset, cfg.data.train_questions, batch_size=cfg.train.batch_size,
                                      seed=cfg.seed, num_shards=cfg.data.shards or jax.process_count(),
                                      process=jax.process_index(), processes=jax.process_count())
        self.my_rows = process_rows(self.mesh, cfg.train.batch_size)
        if self.my_rows.stop - self.my_rows.start != cfg.train.batch_size // jax.process_count():
            raise UserError(f"train: this process has {jax.local_device_count()} of the {jax.device_count()} devices; "
                            f"every one of the {jax.process_count()} processes needs as many devices")
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.stream.steps_per_epoch
        self.teacher = make_teacher(cfg, self.tokenizer, self.store, self.mesh)

        self.towers, optim, optimizer, params = build_model(cfg, self.total_steps)
        replicated = NamedSharding(self.mesh, P())
        self.state = jax.tree.map(functools.partial(from_identical, replicated), init_state(params, optimizer, cfg.seed))
        state_sharding = jax.tree.map(lambda _: replicated, self.state)
        batch_sharding = NamedSharding(self.mesh, P("data"))
        self._embed_questions = jax.jit(functools.partial(embed_questions, self.towers),
                                        in_shardings=(state_sharding, batch_sharding, batch_sharding),
                                        out_shardings=replicated)
        self._update, self._batch_sharding = jit_update(self.towers, optimizer, learning_rate_schedule(optim), self.mesh,
                                     temperature_multiplier=cfg.train.temperature_multiplier,
                                     accumulation=cfg.train.accumulation)
        # U is padded to a multiple of an eighth of the micro-batch's B x K: at most 8 shapes to compile
        micro_batch = cfg.train.batch_size // cfg.train.accumulation
        self._unique_multiple = round_up(max(8, micro_batch * cfg.train.topk // 8), self.mesh.size)
        self.index: ShardedIndex | None = None
        self.index_version, self.index_step, self.index_path = None, 0, None
        # async refresh: `art-jax refresh` builds the indexes, this only watches for them
        self.watcher = IndexWatcher(workdir, cfg.train.refresh_every) if cfg.train.refresh_mode == "async" else None
        self.checkpoints = Checkpoints(workdir, every=cfg.train.checkpoint_every, keep=cfg.train.keep_checkpoints)
        # WORKDIR/best/: the state of the best evaluation so far by train.best_metric; its record holds
        # the value to beat, so a resumed run goes on comparing against it
        self.best = Checkpoints(workdir, folder="best", keep=1) if cfg.train.best_metric else None
        kept = self.best.latest_step() if self.best else None
        self.best_value = self.best.record(kept)["value"] if kept is not None else None
        self.metric_writer: MetricWriter | None = None  # run() opens it, knowing the step it resumes from
        self.preempted = False

    # ------------------------------------------------------------------ stages

    def refresh_index(self, step: int) -> None:
        """Sync refresh: re-embed the corpus with the current passage tower, publish it as a
        new version in the workdir's index folder, and search that from now on."""
        path = build_index(self.cfg, self.towers.passage_tower(self.state.params), self.store, self.workdir,
                           checkpoint=self.workdir, step=step)
        self.load_index(path, step)

    def load_index(self, path: str, step: int) -> None:
        version = IndexVersion.open(path)
        self.index = ShardedIndex.from_version(version, self.mesh,
                                               rows_per_device=self.cfg.index.rows_per_device or None)
        self.index_version, self.index_step, self.index_path = version.meta["version"], step, version.path

    def resume(self) -> int:
        """Restores the newest checkpoint and the index it was training against; returns
        the step to continue from (0 for a fresh run, which builds the first index or takes
        ``data.initial_index``)."""
        step = self.checkpoints.latest_step()
        if step is None:
            if self.cfg.data.initial_index:
                dim = self.towers.passage_tower(self.state.params).config.hidden_size
                self.load_index(initial_index(self.cfg.data.initial_index, self.store, dim), 0)
            else:
                self.refresh_index(0)
            return 0
        self.state, record = self.checkpoints.restore(step, self.state)
        # index_path: an initial index lies outside the workdir (older records lack it)
        self.load_index(record.get("index_path") or
                        os.path.join(self.workdir, "index", version_name(record["index_version"])),
                        record["index_step"])
        if is_lead():
            print(f"resumed from step {step} (index v{record['index_version']} from step {record['index_step']})")
        return step

    def _record(self, step: int) -> dict:
        return {"step": step, "data_position": step, "index_version": self.index_version,
                "index_step": self.index_step, "index_path": self.index_path}

    def save(self, step: int, *, force: bool = False) -> None:
        # async: the checkpoint at each refresh_every multiple is the refresher's "checkpoint ready"
        force = force or (self.watcher is not None and step % self.cfg.train.refresh_every == 0)
        if self.checkpoints.save(step, self.state, self._record(step), force=force):
            # a resumed run keeps the metrics up to its checkpoint: they must be stored by then
            self.metric_writer.sync()

    def keep_if_best(self, step: int, accuracy: dict[int, float]) -> None:
        """Saves the state to WORKDIR/best/ when this evaluation beats every earlier one (ties
        keep the earlier step)."""
        if not (self.best and accuracy):
            return
        metric = self.cfg.train.best_metric
        value = accuracy[int(metric.removeprefix("top"))]
        if self.best_value is not None and value <= self.best_value:
            return
        record = {**self._record(step), "metric": metric, "value": value,
                  "accuracy": {f"top{k}": v for k, v in accuracy.items()}}
        # False: this step's best is already on disk, from a run interrupted after it (resumed earlier)
        if self.best.save(step, self.state, record, force=True):
            self.best_value = value

    def evaluate(self) -> dict[int, float]:
        if not self.dev_questions:
            return {}
        # every process searches all dev questions (process 0 reports); towers on its own devices
        encoder = DualEncoder(local_replica(self.towers.question_tower(self.state.params)),
                              local_replica(self.towers.passage_tower(self.state.params)), self.tokenizer,
                              question_max_length=self.cfg.retriever.question_max_length)
        k = min(max(self.cfg.train.eval_topk), len(self.store))
        scores, rows = retrieve(encoder, self.index, self.dev_questions, k, progress=False)
        accuracy, _ = dpr_results(self.dev_questions, scores, rows, self.store, self.store.ids)
        return {key: value for key, value in accuracy.items() if key in self.cfg.train.eval_topk}

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        times = {}
        start = time.perf_counter()
        _, texts = self.stream.batch(step)  # this process's questions: rows my_rows of the global batch
        q_tokens = tokenize_questions(self.tokenizer, texts, cfg.retriever.question_max_length,
                                      pad_to=cfg.retriever.question_max_length)
        question_ids, question_mask = (from_process_rows(self.mesh, a) for a in (q_tokens.ids, q_tokens.mask))
        queries = self._embed_questions(self.state, question_ids, question_mask)
        _, rows = self.index.search(np.asarray(queries), cfg.train.topk)  # every process: all B x K
        times["search"] = time.perf_counter() - start

        start = time.perf_counter()
        teacher_scores = np.asarray(self.teacher.score_retrieved(texts, rows[self.my_rows], self.store,
                                                                 batch_size=cfg.scorer.batch_size))
        times["scorer"] = time.perf_counter() - start

        start = time.perf_counter()
        # the same on every process (all hold every row): the global dedupe and its tokens
        unique_rows, positions = unique_passages(rows, cfg.train.accumulation, self._unique_multiple)
        passages = self.store.retriever_tokens(unique_rows.reshape(-1), cfg.retriever.train_passage_max_length,
                                               multiple=8)
        micro_batches, unique = unique_rows.shape
        identical = {"passage_index": positions, "passage_ids": passages.ids.reshape(micro_batches, unique, -1),
                     "passage_mask": passages.mask.reshape(micro_batches, unique, -1)}
        batch = {"question_ids": question_ids, "question_mask": question_mask,
                 "teacher_scores": from_process_rows(self.mesh, teacher_scores.astype(np.float32)),
                 **{name: from_identical(self._batch_sharding[name], value) for name, value in identical.items()}}
        self.state, metrics = self._update(self.state, batch)
        metrics = {name: float(value) for name, value in metrics.items()}
        times["update"] = time.perf_counter() - start
        return {**metrics, **{f"time_{name}": value for name, value in times.items()},
                "index_staleness": step - self.index_step}

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, dict[int, float]]:
        cfg = self.cfg
        if self.watcher:
            mark_finished(self.workdir, None)  # (re)started: the refresher must not stop yet
        start = self.resume()
        if is_lead():
            print(f"training on {jax.device_count()} devices ({jax.process_count()} process(es)), global batch "
                  f"{cfg.train.batch_size}, K={cfg.train.topk}, {self.total_steps} steps", flush=True)
        first = self.evaluate() if start == 0 else {}
        self.metric_writer = MetricWriter(self.workdir, self.total_steps, start=start, log_every=cfg.train.log_every)
        self.metric_writer.evaluation(0, first, "before training")
        last = {}
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            for step in range(start, self.total_steps):
                last = self._one_step(step)
                # SIGTERM reaches the processes at different moments: all stop after the same step
                if any_process(self.preempted):
                    self.save(step + 1, force=True)
                    if is_lead():
                        print(f"preempted: saved step {step + 1}; rerun the same command to resume")
                    return {"before": first, "after": {}}
        finally:
            signal.signal(signal.SIGTERM, previous)
            try:  # the checkpoints first: in a gs:// workdir closing the metrics is an upload
                self.checkpoints.close()
                if self.best:
                    self.best.close()
            finally:
                self.metric_writer.close()
        if self.watcher:
            mark_finished(self.workdir, self.total_steps)  # after close: the last checkpoint is complete
        return {"before": first, "after": last}

    def _on_sigterm(self, *_) -> None:
        self.preempted = True  # finish the step, save, stop

    def _one_step(self, step: int) -> dict[int, float]:
        """One training step and what follows it: refresh, evaluation, metrics, checkpoints;
        returns the evaluation's accuracy (empty without one)."""
        cfg = self.cfg
        if self.watcher:
            if found := self.watcher.poll(step, self.index_step):
                self.load_index(*found)
        elif step and step % cfg.train.refresh_every == 0 and self.index_step != step:
            self.refresh_index(step)
        metrics = self.train_step(step)
        done = step + 1
        if done == self.total_steps and not self.watcher:  # async: the refresher builds it
            self.refresh_index(done)  # the final index, from the final passage tower
        accuracy = self.evaluate() if done == self.total_steps or done % cfg.train.eval_every == 0 else {}
        self.metric_writer.step(done, metrics, accuracy)
        self.save(done, force=done == self.total_steps)
        self.keep_if_best(done, accuracy)
        return accuracy
