"""`art-jax train`: the ART loop - retrieve, score, update; refresh the index; evaluate.

Stages talk through plain arrays: question tokens -> queries (jitted) -> exact top-K rows
from the sharded index -> the rows' passage tokens from the memory-mapped corpus store
and the frozen teacher's scores -> ``update`` (jitted, state donated).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from art_jax.checkpoints import Checkpoints
from art_jax.config import write_config
from art_jax.corpus import CorpusStore, TokenizerSpec, prepare_corpus
from art_jax.data.questions import Question, read_questions
from art_jax.embed import embed_corpus
from art_jax.errors import UserError
from art_jax.evaluation import format_table
from art_jax.index import IndexVersion, version_name
from art_jax.models.hf import load_bert, load_tokenizer
from art_jax.retrieval_jobs import dpr_results, retrieve
from art_jax.retriever import DualEncoder, tokenize_questions
from art_jax.search import ShardedIndex
from art_jax.sharding import make_mesh
from art_jax.train_step import OptimConfig, Towers, embed_questions, init_state, learning_rate_schedule, \
    make_optimizer, update


class QuestionStream:
    """Deterministic batches of question indices: epoch e is a permutation seeded by
    (seed, e), the remainder of each epoch dropped, so step s alone fixes the position."""

    def __init__(self, count: int, batch_size: int, seed: int):
        if count < batch_size:
            raise UserError(f"train.batch_size={batch_size} is larger than the {count} training questions")
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.steps_per_epoch = count // batch_size

    def batch(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return order[offset * self.batch_size:(offset + 1) * self.batch_size]


def _check_config(cfg, devices: int, store: CorpusStore) -> None:
    if cfg.train.batch_size % (devices * cfg.train.accumulation):
        raise UserError(f"train.batch_size={cfg.train.batch_size} must divide evenly over {devices} devices "
                        f"x train.accumulation={cfg.train.accumulation}")
    if cfg.train.topk > len(store):
        raise UserError(f"train.topk={cfg.train.topk} is larger than the corpus ({len(store)} passages)")
    for key in ("train_questions", "dev_questions"):
        path = cfg.data[key]
        if path and not os.path.isfile(path):
            raise UserError(f"data.{key}: file not found: {path}")


def open_store(cfg, workdir: str) -> CorpusStore:
    """The configured corpus store, or one prepared from ``data.corpus`` into the workdir."""
    if cfg.data.corpus_store:
        return CorpusStore(cfg.data.corpus_store)
    path = os.path.join(workdir, "corpus_store")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return CorpusStore(path)
    if not cfg.data.corpus:
        raise UserError("config: set data.corpus (an evidence TSV/JSONL) or data.corpus_store")
    scorer = cfg.scorer.checkpoint if cfg.scorer.kind == "t5" else None
    return prepare_corpus(cfg.data.corpus, path, load_tokenizer(cfg.retriever.checkpoint),
                          TokenizerSpec(cfg.retriever.checkpoint, cfg.retriever.train_passage_max_length),
                          load_tokenizer(scorer) if scorer else None,
                          TokenizerSpec(scorer, 512) if scorer else None)


def make_teacher(cfg, tokenizer, store, mesh):
    from art_jax.scorer import PromptConfig, QueryLikelihoodScorer, T5Scorer

    if cfg.scorer.kind == "query_likelihood":
        return QueryLikelihoodScorer(tokenizer, store, mu=cfg.scorer.mu, scale=cfg.scorer.scale,
                                     max_length=cfg.retriever.question_max_length)
    if cfg.scorer.kind == "t5":
        return T5Scorer.from_pretrained(cfg.scorer.checkpoint, dtype=cfg.scorer.dtype, prompt=PromptConfig(),
                                        mesh=mesh)
    raise UserError(f"scorer.kind: {cfg.scorer.kind!r} is not 't5' or 'query_likelihood'")


class Trainer:
    """Holds what one run needs; ``run()`` trains to the end and returns the last evaluation."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
        self.cfg, self.workdir = cfg, workdir
        os.makedirs(workdir, exist_ok=True)
        write_config(cfg, workdir)
        self.mesh = make_mesh()
        self.store = open_store(cfg, workdir)
        _check_config(cfg, self.mesh.size, self.store)
        self.tokenizer = load_tokenizer(cfg.retriever.checkpoint)
        self.train_questions = read_questions(cfg.data.train_questions)
        self.dev_questions = read_questions(cfg.data.dev_questions) if cfg.data.dev_questions else []
        self.stream = QuestionStream(len(self.train_questions), cfg.train.batch_size, cfg.seed)
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.stream.steps_per_epoch
        self.teacher = make_teacher(cfg, self.tokenizer, self.store, self.mesh)

        question = load_bert(cfg.retriever.checkpoint)
        passage = question if cfg.retriever.shared_towers else load_bert(cfg.retriever.checkpoint)
        self.towers, params = Towers.split(question, passage)
        optim = OptimConfig(learning_rate=cfg.train.learning_rate, total_steps=self.total_steps,
                            warmup_fraction=cfg.train.warmup_fraction, weight_decay=cfg.train.weight_decay,
                            clip_norm=cfg.train.clip_norm, train_question_tower=cfg.train.train_question_tower,
                            train_passage_tower=cfg.train.train_passage_tower)
        optimizer = make_optimizer(optim, params)
        replicated = NamedSharding(self.mesh, P())
        self.state = jax.device_put(init_state(params, optimizer, cfg.seed), replicated)
        state_sharding = jax.tree.map(lambda _: replicated, self.state)
        batch_sharding = NamedSharding(self.mesh, P("data"))
        self._embed_questions = jax.jit(functools.partial(embed_questions, self.towers),
                                        in_shardings=(state_sharding, batch_sharding, batch_sharding),
                                        out_shardings=replicated)
        self._update = jax.jit(
            functools.partial(update, self.towers, optimizer, learning_rate_schedule(optim),
                              temperature_multiplier=cfg.train.temperature_multiplier,
                              accumulation=cfg.train.accumulation),
            in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
            donate_argnums=0)
        self.index: ShardedIndex | None = None
        self.index_version, self.index_step = None, 0
        self.checkpoints = Checkpoints(workdir, every=cfg.train.checkpoint_every, keep=cfg.train.keep_checkpoints)
        self.preempted = False

    # ------------------------------------------------------------------ stages

    def refresh_index(self, step: int) -> None:
        """Sync refresh: re-embed the corpus with the current passage tower, publish it as a
        new version in the workdir's index folder, and search that from now on."""
        cfg = self.cfg
        path = embed_corpus(self.towers.passage_tower(self.state.params), self.store,
                            os.path.join(self.workdir, "index"), checkpoint=self.workdir, step=step,
                            dtype=cfg.index.dtype, max_length=cfg.retriever.passage_max_length,
                            chunk_rows=cfg.index.chunk_rows, batch_size=cfg.index.embed_batch_size,
                            progress=cfg.index.progress)
        self.load_index(path, step)

    def load_index(self, path: str, step: int) -> None:
        version = IndexVersion.open(path)
        self.index = ShardedIndex.from_version(version, self.mesh,
                                               rows_per_device=self.cfg.index.rows_per_device or None)
        self.index_version, self.index_step = version.meta["version"], step

    def resume(self) -> int:
        """Restores the newest checkpoint and the index it was training against; returns
        the step to continue from (0 for a fresh run, which builds the first index)."""
        step = self.checkpoints.latest_step()
        if step is None:
            self.refresh_index(0)
            return 0
        self.state, record = self.checkpoints.restore(step, self.state)
        self.load_index(os.path.join(self.workdir, "index", version_name(record["index_version"])),
                        record["index_step"])
        print(f"resumed from step {step} (index v{record['index_version']} from step {record['index_step']})")
        return step

    def save(self, step: int, *, force: bool = False) -> None:
        record = {"step": step, "data_position": step, "index_version": self.index_version,
                  "index_step": self.index_step}
        self.checkpoints.save(step, self.state, record, force=force)

    def evaluate(self) -> dict[int, float]:
        if not self.dev_questions:
            return {}
        encoder = DualEncoder(self.towers.question_tower(self.state.params),
                              self.towers.passage_tower(self.state.params), self.tokenizer,
                              question_max_length=self.cfg.retriever.question_max_length)
        k = min(max(self.cfg.train.eval_topk), len(self.store))
        scores, rows = retrieve(encoder, self.index, self.dev_questions, k, progress=False)
        accuracy, _ = dpr_results(self.dev_questions, scores, rows, self.store, self.store.ids)
        return {key: value for key, value in accuracy.items() if key in self.cfg.train.eval_topk}

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        times = {}
        start = time.perf_counter()
        questions: list[Question] = [self.train_questions[i] for i in self.stream.batch(step)]
        texts = [q.question for q in questions]
        q_tokens = tokenize_questions(self.tokenizer, texts, cfg.retriever.question_max_length,
                                      pad_to=cfg.retriever.question_max_length)
        queries = self._embed_questions(self.state, q_tokens.ids, q_tokens.mask)
        _, rows = self.index.search(np.asarray(queries), cfg.train.topk)
        times["search"] = time.perf_counter() - start

        start = time.perf_counter()
        teacher_scores = np.asarray(self.teacher.score_retrieved(texts, rows, self.store,
                                                                 batch_size=cfg.scorer.batch_size))
        times["scorer"] = time.perf_counter() - start

        start = time.perf_counter()
        passages = self.store.retriever_tokens(rows.reshape(-1), cfg.retriever.train_passage_max_length,
                                               multiple=8)
        b, k = rows.shape
        batch = {"question_ids": q_tokens.ids, "question_mask": q_tokens.mask,
                 "passage_ids": passages.ids.reshape(b, k, -1), "passage_mask": passages.mask.reshape(b, k, -1),
                 "teacher_scores": teacher_scores.astype(np.float32)}
        self.state, metrics = self._update(self.state, batch)
        metrics = {name: float(value) for name, value in metrics.items()}
        times["update"] = time.perf_counter() - start
        return {**metrics, **{f"time_{name}": value for name, value in times.items()},
                "index_staleness": step - self.index_step}

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, dict[int, float]]:
        cfg = self.cfg
        start = self.resume()
        first = self.evaluate() if start == 0 else {}
        self._report(0, {}, first, "before training")
        log = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")
        started = time.perf_counter()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            for step in range(start, self.total_steps):
                self._one_step(step, start, started, log)
                if self.preempted:
                    self.save(step + 1, force=True)
                    print(f"preempted: saved step {step + 1}; rerun the same command to resume")
                    return {"before": first, "after": {}}
        finally:
            signal.signal(signal.SIGTERM, previous)
            log.close()
            self.checkpoints.close()
        last = self.evaluate()
        self._report(self.total_steps, {}, last, "after training")
        return {"before": first, "after": last}

    def _on_sigterm(self, *_) -> None:
        self.preempted = True  # finish the step, save, stop

    def _one_step(self, step: int, start: int, started: float, log) -> None:
        cfg = self.cfg
        if step and step % cfg.train.refresh_every == 0 and self.index_step != step:
            self.refresh_index(step)
        metrics = self.train_step(step)
        done = step + 1
        accuracy = {}
        if done == self.total_steps:
            self.refresh_index(done)  # the final index, from the final passage tower
        elif done % cfg.train.eval_every == 0:
            accuracy = self.evaluate()
        if done % cfg.train.log_every == 0 or accuracy or done == self.total_steps:
            metrics["eta_s"] = (time.perf_counter() - started) / (done - start) * (self.total_steps - done)
            self._report(done, metrics, accuracy)
        log.write(json.dumps({"step": done, **metrics, **{f"top{k}": v for k, v in accuracy.items()}}) + "\n")
        self.save(done, force=done == self.total_steps)

    def _report(self, step: int, metrics: dict, accuracy: dict, title: str = "") -> None:
        if jax.process_index() != 0:
            return
        if metrics:
            print(f"step {step}/{self.total_steps} loss {metrics['loss']:.4f} "
                  f"H(teacher) {metrics['teacher_entropy']:.3f} H(student) {metrics['student_entropy']:.3f} "
                  f"agree {metrics['argmax_agreement']:.2f} |g| {metrics['grad_norm']:.3f} "
                  f"lr {metrics['learning_rate']:.2e} skipped {int(metrics['skipped'])} "
                  f"staleness {metrics['index_staleness']} | search {metrics['time_search'] * 1e3:.0f}ms "
                  f"scorer {metrics['time_scorer'] * 1e3:.0f}ms update {metrics['time_update'] * 1e3:.0f}ms "
                  f"| ETA {metrics['eta_s']:.0f}s", flush=True)
        if accuracy:
            heading = f"dev top-k accuracy at step {step}" + (f" ({title})" if title else "")
            print(heading + "\n" + format_table(accuracy), flush=True)
