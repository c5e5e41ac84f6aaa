"""Fusion-in-Decoder alone (Izacard & Grave, 2021; FiD's baseline in 001 and 004): the T5 reader
trained on fixed retrieval results, no retriever in the run.

``data.train_results`` / ``data.dev_results``: DPR-format results (`art-jax search` writes them),
each question's first ``train.topk`` ctxs read. A step takes positions step*B .. step*B+B-1 of
its epoch's shuffled order (``data/shuffle.py``) and one gold answer per question, drawn per
epoch; questions without answers are counted and left out. Loss: FiD's, the mean negative
log-likelihood over the batch's answer tokens (``objectives.fid_nll``).
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.distributed import is_lead
from art_jax.core.errors import UserError
from art_jax.core.fileio import read_json
from art_jax.core.sharding import from_process_rows, process_rows
from art_jax.data.shuffle import step_positions
from art_jax.evaluation.predict import read_retrieved
from art_jax.methods.common import (
    TrainsTowers,
    check_batch,
    check_input_files,
    check_selection,
    check_topk,
    epoch_steps,
)
from art_jax.methods.reading import (
    READER_ARRAYS,
    READER_METRICS,
    check_reader,
    drawn_answer,
    fid_log_probs,
    initial_reader,
    reader_arrays,
    reader_keys,
    reader_settings,
    reading_metrics,
)
from art_jax.objectives import fid_nll
from art_jax.training.state import ParamGroups, TrainState
from art_jax.training.update import Objective


def loss(groups: ParamGroups, params, batch, keys):
    log_probs, _, _ = fid_log_probs(groups.module(params, "reader"), batch, keys)
    return fid_nll(log_probs, batch["label_mask"])


def objective(groups: ParamGroups, *, accumulation: int = 1) -> Objective:
    return Objective(functools.partial(loss, groups), keys=reader_keys, accumulation=accumulation)


def batch_shardings(mesh) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, P("data")) for name in READER_ARRAYS}


def read_answered(path: str, key: str):
    """(questions with their ctxs, their answers, how many were left out) of a results file: a
    question without answers or without ctxs has nothing to train or score."""
    results = read_json(path)
    items = read_retrieved(results, path, scores=False)
    kept = [(item, result["answers"]) for item, result in zip(items, results) if result["answers"] and item.passages]
    if not kept:
        raise UserError(f"{key}: {path} has no question with both answers and ctxs")
    return [item for item, _ in kept], [answers for _, answers in kept], len(items) - len(kept)


class Fid(TrainsTowers):
    """The reader alone, for ``training.loop.Trainer``."""

    name = "fid"
    index_use = None
    store = None
    source = None
    log_labels = {"token_nll": "nll/token", "answer_nll": "nll/answer", "grad_norm": "|g|", "learning_rate": "lr"}

    @staticmethod
    def eval_metrics(cfg) -> tuple[str, ...]:
        return READER_METRICS

    @staticmethod
    def check_config(cfg) -> None:
        if not cfg.data.train_results:
            raise UserError("method=fid needs data.train_results: DPR-format retrieval results of the training "
                            "questions (art-jax search writes them)")
        check_topk(cfg)
        check_selection(cfg, "dev_results")
        check_batch(cfg, accumulation=cfg.train.accumulation)
        check_reader(cfg)
        check_input_files(cfg, ("train_results", "dev_results"))

    def __init__(self, cfg, workdir: str, mesh):
        self.cfg, self.mesh = cfg, mesh
        train = cfg.train
        self.settings = reader_settings(cfg)
        self.training, self.answers, unanswered = read_answered(cfg.data.train_results, "data.train_results")
        if unanswered and is_lead():
            print(f"{cfg.data.train_results}: {unanswered} question(s) without answers or ctxs left out")
        self.dev, self.dev_answers = ([], [])
        if cfg.data.dev_results:
            self.dev, self.dev_answers, _ = read_answered(cfg.data.dev_results, "data.dev_results")
        self.steps_per_epoch, self.total_steps = epoch_steps(cfg, len(self.training), "training questions")
        self.my_rows = process_rows(mesh, train.batch_size)

        reader = initial_reader(cfg)
        self.tokenizer = reader.tokenizer
        self.groups, self.params = ParamGroups.split({"reader": reader.model})
        self.initial_reader = (cfg.reader.checkpoint, self.settings)
        self.max_lengths = {"reader": self.settings.max_input_tokens}
        self.objective = objective(self.groups, accumulation=train.accumulation)
        self.batch_shardings = batch_shardings(mesh)

    def describe(self) -> str:
        train = self.cfg.train
        return f"global batch {train.batch_size} x {train.topk} passages, {self.steps_per_epoch} steps per epoch"

    def batch(self, state: TrainState, step: int, index) -> tuple[dict[str, jax.Array], dict[str, float]]:
        cfg, k = self.cfg, self.cfg.train.topk
        epoch, indices = step_positions(step, steps_per_epoch=self.steps_per_epoch, batch_size=cfg.train.batch_size,
                                        accumulation=1, rows=self.my_rows,
                                        count=len(self.training), seed=cfg.seed)
        items = [self.training[i] for i in indices]
        # a question with fewer than K ctxs repeats its last: every row has K
        passages = [[item.passages[min(j, len(item.passages) - 1)] for j in range(k)] for item in items]
        answers = [drawn_answer(self.answers[i], seed=cfg.seed, epoch=epoch, index=i) for i in indices]
        local = reader_arrays(self.tokenizer, self.settings, [item.question for item in items], passages, answers)
        return {name: from_process_rows(self.mesh, value) for name, value in local.items()}, {}

    def evaluate(self, state: TrainState, index) -> dict[str, float]:
        if not self.dev:
            return {}
        return reading_metrics(self.groups.module(state.params, "reader"), self.tokenizer, self.settings, self.dev,
                               self.dev_answers, topk=self.cfg.train.topk, batch_size=self.cfg.reader.eval_batch_size)
