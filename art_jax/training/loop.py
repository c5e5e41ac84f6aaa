"""THE training loop, for every method: resume, cadence (index refresh, evaluation,
checkpoints, logging), the best checkpoint, SIGTERM and metrics. A method (``training/method.py``)
supplies its state, its batch for a step, its loss and its evaluation; the jitted update is
``training/update.py``'s, the same for all.
"""

from __future__ import annotations

import functools
import os
import signal
import time

import jax

from art_jax.config import write_config
from art_jax.core import storage
from art_jax.core.checkpoints import Checkpoints
from art_jax.core.distributed import any_process, is_lead, lead_floats
from art_jax.core.errors import UserError
from art_jax.core.sharding import from_identical
from art_jax.models.hf import for_inference
from art_jax.retrieval.refresh import mark_finished
from art_jax.training.index import TrainingIndex
from art_jax.training.layout import check_mesh_config, plan_layout, state_shardings
from art_jax.training.metrics import MetricWriter
from art_jax.training.state import init_state, learning_rate_schedule, make_optimizer
from art_jax.training.update import jit_update
from art_jax.workdir import BEST, CORPUS_STORE, copy_initial_models


def due(step: int, every: int) -> bool:
    """Cadence: ``every`` = 0 means never."""
    return every > 0 and step % every == 0


def check_loop_config(cfg, eval_metrics: tuple[str, ...]) -> None:
    """The loop's own keys, checked before anything is built or written."""
    train = cfg.train
    zero = {"steps": "0 means: train for train.epochs", "keep_checkpoints": "0 keeps every checkpoint",
            "epochs": "0 needs train.steps", **{f"{name}_every": "0 means never"
                                                for name in ("refresh", "eval", "checkpoint", "log")}}
    for key, meaning in zero.items():
        if train[key] < 0:
            raise UserError(f"train.{key}={train[key]} is negative ({meaning})")
    if train.refresh_mode not in ("sync", "async"):
        raise UserError(f"train.refresh_mode: {train.refresh_mode!r} is not 'sync' or 'async'")
    if train.refresh_mode == "async" and not (train.checkpoint_every and train.refresh_every):
        raise UserError("train.refresh_mode=async needs train.checkpoint_every > 0 and train.refresh_every > 0: "
                        "the refresher indexes the run's checkpoints")
    if train.best_metric not in ("", *eval_metrics):
        raise UserError(f"train.best_metric: {train.best_metric!r} is not one of {', '.join(eval_metrics)} "
                        f"(top-k accuracy for k in train.eval_topk) or '' (no best checkpoint)")


def check_total_steps(cfg, total_steps: int) -> None:
    """A method's resolved number of steps (from train.steps, or train.epochs of its data)."""
    if total_steps <= 0:
        raise UserError(f"train.steps={cfg.train.steps}, train.epochs={cfg.train.epochs}: that is no step "
                        "to train (steps=0 means: use epochs)")


def _remove_but_the_store(workdir: str) -> None:
    """A run that failed to start leaves nothing behind in the workdir it made, but the corpus
    store it may have prepared already (hours of tokenizing on a large corpus, which the rerun
    takes up)."""
    names = storage.listdir(workdir)
    for name in names:
        if name != CORPUS_STORE:
            path = os.path.join(workdir, name)
            storage.rmtree(path) if storage.isdir(path) else storage.remove(path)
    if CORPUS_STORE not in names:
        storage.rmtree(workdir)


class Trainer:
    """One run of ``method_class`` in ``workdir``; ``run()`` trains to the end and returns the
    evaluations before and after. A config error leaves no workdir behind (when this run made it)."""

    def __init__(self, cfg, workdir: str, method_class):
        self.cfg, self.workdir = cfg, workdir
        check_loop_config(cfg, method_class.eval_metrics(cfg))
        check_mesh_config(cfg)
        method_class.check_config(cfg)
        created = not storage.exists(workdir)
        try:
            self._build(method_class)
        except BaseException:
            if created and is_lead():
                _remove_but_the_store(workdir)
            raise

    def _build(self, method_class) -> None:
        cfg, workdir = self.cfg, self.workdir
        storage.makedirs(workdir)
        self.layout = plan_layout(cfg)
        self.mesh = self.layout.mesh
        self.method = method = method_class(cfg, workdir, self.mesh)
        self.total_steps = method.total_steps
        if is_lead():
            write_config(cfg, workdir)
            copy_initial_models(workdir, method.source, method.groups.roles, method.max_lengths, method.initial_reader)
        optim = method.optim_config()
        optimizer = make_optimizer(optim, method.groups, method.params)
        start = functools.partial(init_state, optimizer=optimizer, seed=cfg.seed)
        shapes = jax.eval_shape(start, method.params)
        self.fsdp = self.layout.shards_state(shapes)
        shardings = state_shardings(shapes, self.mesh, self.fsdp)
        # the loaded parameters placed as the state holds them, the rest of the state made in place (under
        # FSDP, AdamW's moments are never whole on one device), and the loaded copy let go
        params = jax.tree.map(from_identical, shardings.params, method.params)
        self.state = jax.jit(start, out_shardings=shardings, donate_argnums=0)(params)
        method.params = None  # the state holds the parameters from here
        self._update = jit_update(method.objective, optimizer, learning_rate_schedule(optim), self.mesh,
                                  method.batch_shardings, shardings)
        self.index = (TrainingIndex(cfg, workdir, method.store, self.mesh, watch=method.index_use == "train")
                      if method.index_use else None)
        # index_use "train": searched in every step, refreshed on the cadence; "fixed": searched in every step,
        # never refreshed (the passage tower is frozen); "eval": rebuilt for evaluations
        self.searched = method.index_use in ("train", "fixed")
        self.refreshes = method.index_use == "train"
        self.async_refresh = self.refreshes and self.index.watcher is not None
        self.checkpoints = Checkpoints(workdir, every=cfg.train.checkpoint_every, keep=cfg.train.keep_checkpoints)
        # WORKDIR/best/: the state of the best evaluation so far by train.best_metric; its record holds
        # the value to beat, so a resumed run goes on comparing against it
        self.best = Checkpoints(workdir, folder=BEST, keep=1) if cfg.train.best_metric else None
        kept = self.best.latest_step() if self.best else None
        self.best_value = self.best.record(kept)["value"] if kept is not None else None
        self.metric_writer: MetricWriter | None = None  # run() opens it, knowing the step it resumes from
        self.preempted = False

    def passage_tower(self):
        return for_inference(self.method.groups.module(self.state.params, "passage"))

    # ------------------------------------------------------------------ state on disk

    def resume(self) -> int:
        """Restores the newest checkpoint and the index it was training against; returns
        the step to continue from (0 for a fresh run, which builds its first index)."""
        step = self.checkpoints.latest_step()
        if step is None:
            if self.index:
                self.index.start(self.passage_tower())
            return 0
        self.state, record = self.checkpoints.restore(step, self.state)
        if self.searched:  # an index for evaluations only is rebuilt at the next one
            self.index.resume(record)
        if is_lead():
            where = (f" (index v{record['index_version']} from step {record['index_step']})" if self.searched
                     else "")
            print(f"resumed from step {step}{where}")
        return step

    def _record(self, step: int) -> dict:
        # (an index kept for evaluations only names a version a later evaluation deletes)
        return {"step": step, "data_position": step, **(self.index.record() if self.index else {})}

    def save(self, step: int, *, force: bool = False) -> None:
        # async: the checkpoint at each refresh_every multiple is the refresher's "checkpoint ready"
        force = force or (self.async_refresh and due(step, self.cfg.train.refresh_every))
        if self.checkpoints.save(step, self.state, self._record(step), force=force):
            # a resumed run keeps the metrics up to its checkpoint: they must be stored by then
            self.metric_writer.sync()

    def keep_if_best(self, step: int, evaluation: dict[str, float]) -> None:
        """Saves the state to WORKDIR/best/ when this evaluation beats every earlier one (ties
        keep the earlier step)."""
        metric = self.cfg.train.best_metric
        if not (self.best and metric in evaluation):
            return
        value = evaluation[metric]
        if self.best_value is not None and value <= self.best_value:
            return
        record = {**self._record(step), "metric": metric, "value": value, "accuracy": dict(evaluation)}
        # False: this step's best is already on disk, from a run interrupted after it (resumed earlier)
        if self.best.save(step, self.state, record, force=True):
            self.best_value = value

    # ------------------------------------------------------------------ one step

    def evaluate(self, step: int) -> dict[str, float]:
        if self.method.index_use == "eval" and self.index.step != step:
            self.index.rebuild(self.passage_tower(), step, replace=True)  # the towers as they are now
        # each process evaluates on its own devices (or its share, gathered): process 0's values decide for all
        return lead_floats(self.method.evaluate(self.state, self.index.index if self.index else None))

    def train_step(self, step: int) -> dict[str, float]:
        start = time.perf_counter()
        batch, host_metrics = self.method.batch(self.state, step, self.index.index if self.index else None)
        prepared = time.perf_counter()
        self.state, metrics = self._update(self.state, batch)
        metrics = {name: float(value) for name, value in metrics.items()}
        finished = time.perf_counter()
        times = {"time_batch": prepared - start - sum(v for k, v in host_metrics.items() if k.startswith("time_")),
                 "time_update": finished - prepared}
        staleness = {"index_staleness": step - self.index.step} if self.refreshes else {}
        return {**metrics, **host_metrics, **times, **staleness}

    def _one_step(self, step: int) -> dict[str, float]:
        """One training step and what follows it: refresh, evaluation, metrics, checkpoints;
        returns the evaluation (empty without one)."""
        cfg = self.cfg
        if self.async_refresh:
            self.index.poll(step)
        elif self.refreshes and step and due(step, cfg.train.refresh_every) and self.index.step != step:
            self.index.rebuild(self.passage_tower(), step)
        metrics = self.train_step(step)
        done = step + 1
        last = done == self.total_steps
        if last and self.refreshes and not self.async_refresh and cfg.train.refresh_every:
            self.index.rebuild(self.passage_tower(), done)  # the final index, from the final passage tower
        evaluation = self.evaluate(done) if last or due(done, cfg.train.eval_every) else {}
        self.metric_writer.step(done, metrics, evaluation)
        self.save(done, force=last)
        self.keep_if_best(done, evaluation)
        return evaluation

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, dict[str, float]]:
        cfg = self.cfg
        if self.async_refresh:
            mark_finished(self.workdir, None)  # (re)started: the refresher must not stop yet
        start = self.resume()
        if is_lead():
            print(f"training on {jax.device_count()} devices ({jax.process_count()} process(es)), "
                  f"{self.method.describe()}, {self.total_steps} steps; {self.layout.describe(self.fsdp)}",
                  flush=True)
        first = self.evaluate(0) if start == 0 else {}
        self.metric_writer = MetricWriter(self.workdir, self.total_steps, start=start, log_every=cfg.train.log_every,
                                          labels=self.method.log_labels)
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
        if self.async_refresh:
            mark_finished(self.workdir, self.total_steps)  # after close: the last checkpoint is complete
        return {"before": first, "after": last}

    def _on_sigterm(self, *_) -> None:
        self.preempted = True  # finish the step, save, stop
