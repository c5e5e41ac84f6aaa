"""What several methods share: the towers a run starts from, the corpus store, dev accuracy."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from art_jax.core import storage
from art_jax.core.distributed import lead_value
from art_jax.core.errors import UserError
from art_jax.core.sharding import local_replica
from art_jax.data.corpus import CorpusStore, TokenizerSpec, prepare_corpus
from art_jax.evaluation.answers import metric_name
from art_jax.models.hf import for_inference, load_tokenizer, with_config
from art_jax.models.layers import COMPUTE_DTYPES, REMAT_POLICIES
from art_jax.retrieval.encoder import (
    DualEncoder,
    load_retriever,
    load_retriever_tokenizer,
)
from art_jax.retrieval.results import dpr_results, retrieve
from art_jax.training.loop import check_total_steps
from art_jax.training.state import OptimConfig, ParamGroups, TrainState
from art_jax.workdir import CORPUS_STORE


def answer_metrics(cfg) -> tuple[str, ...]:
    """Dev top-k answer accuracy for k in ``train.eval_topk``."""
    ks = tuple(cfg.train.eval_topk)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise UserError(f"train.eval_topk={ks}: give at least one k, every k at least 1")
    return tuple(metric_name(k) for k in ks)


def check_batch(cfg, *, accumulation: int) -> None:
    """The global batch splits evenly over the devices and the micro-batches."""
    devices = jax.device_count()
    for key in ("batch_size", "accumulation"):
        if cfg.train[key] < 1:
            raise UserError(f"train.{key}={cfg.train[key]} must be at least 1")
    if cfg.train.batch_size % (devices * accumulation):
        raise UserError(f"train.batch_size={cfg.train.batch_size} must divide evenly over {devices} devices "
                        f"x train.accumulation={accumulation}")


def check_topk(cfg) -> None:
    if cfg.train.topk < 1:
        raise UserError(f"train.topk={cfg.train.topk} must be at least 1")


def check_selection(cfg, dev_key: str) -> None:
    """A best checkpoint (``train.best_metric``) needs the dev data ``data.{dev_key}``."""
    if cfg.train.best_metric and not cfg.data[dev_key]:
        raise UserError(f"train.best_metric={cfg.train.best_metric!r} needs data.{dev_key}; set "
                        "train.best_metric='' to train without selecting a best checkpoint")


def epoch_steps(cfg, count: int, what: str) -> tuple[int, int]:
    """(steps per epoch, total steps) of ``count`` training examples (``what`` they are)."""
    per_epoch = count // cfg.train.batch_size
    if per_epoch == 0:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is larger than the {count} {what}")
    total = cfg.train.steps or cfg.train.epochs * per_epoch
    check_total_steps(cfg, total)
    return per_epoch, total


def check_compute_policy(section, name: str) -> None:
    """``NAME.dtype`` and ``NAME.remat_policy`` of a model's config section (retriever, reader)."""
    if section.dtype not in COMPUTE_DTYPES:
        raise UserError(f"{name}.dtype: {section.dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    if section.remat_policy not in REMAT_POLICIES:
        raise UserError(f"{name}.remat_policy: {section.remat_policy!r} is not one of {', '.join(REMAT_POLICIES)}")


def check_retriever(cfg) -> None:
    """``retriever.*`` keys every method reads."""
    check_compute_policy(cfg.retriever, "retriever")
    if cfg.retriever.question_truncation not in ("right", "left"):
        raise UserError(f"retriever.question_truncation: {cfg.retriever.question_truncation!r} is not "
                        "'right' or 'left'")
    train = cfg.train
    if cfg.retriever.shared_towers and train.train_question_tower != train.train_passage_tower:
        # one shared tower is one parameter group: freezing one of its roles would silently train it anyway
        frozen = "passage" if train.train_question_tower else "question"
        raise UserError(f"train.train_{frozen}_tower=False freezes a tower that retriever.shared_towers=True "
                        "shares with the trained one; set retriever.shared_towers=False, or freeze both")


def check_input_files(cfg, keys: tuple[str, ...]) -> None:
    """``data.KEY`` files that are set exist (a URL is checked when read)."""
    for key in keys:
        path = cfg.data[key]
        if path and not storage.is_remote(path) and not os.path.isfile(path):
            what = "is a folder, expected a file" if os.path.isdir(path) else "file not found"
            raise UserError(f"data.{key}: {what}: {path}")


def open_store(cfg, workdir: str, *, scorer: str | None = None) -> CorpusStore:
    """The configured corpus store, or one prepared from ``data.corpus`` into the workdir
    (with the teacher ``scorer``'s tokens when given)."""
    if cfg.data.corpus_store:
        return CorpusStore(cfg.data.corpus_store)
    path = os.path.join(workdir, CORPUS_STORE)
    prepared = bool(lead_value(storage.isfile(os.path.join(path, "meta.json"))))  # one view for all
    if not (prepared or cfg.data.corpus):
        raise UserError("config: set data.corpus (an evidence TSV/JSONL) or data.corpus_store")
    if not prepared:  # every process tokenizes its share of the batches
        return prepare_corpus(cfg.data.corpus, path, load_retriever_tokenizer(cfg.retriever.checkpoint),
                              TokenizerSpec(cfg.retriever.checkpoint, cfg.retriever.train_passage_max_length),
                              load_tokenizer(scorer) if scorer else None,
                              TokenizerSpec(scorer, 512) if scorer else None)
    return CorpusStore(path)


def initial_towers(spec: str, *, shared: bool, projection: bool = False):
    """(question, passage) towers a run starts from: any retriever argument (a Hugging Face
    checkpoint gives both; an export or a run its two), one module when ``shared``; with
    ``projection`` each gets a fresh projection head if it has none."""
    encoder = load_retriever(spec, projection=True if projection else None)
    question, passage = encoder.question, encoder.passage
    if shared:
        if passage is not question and any(
                not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(question, nnx.Param)),
                                                         jax.tree.leaves(nnx.state(passage, nnx.Param)))):
            raise UserError(f"retriever.shared_towers=True, but retriever.checkpoint {spec} has two different "
                            "towers; set retriever.shared_towers=False")
        return question, question
    # two towers from one set of weights (a Hugging Face checkpoint, a run with shared towers) get
    # copies that share no buffer: the update donates the state, and a buffer in it twice cannot be
    return question, _copy(passage)


def _copy(module: nnx.Module) -> nnx.Module:
    graph, state = nnx.split(module)
    return nnx.merge(graph, jax.tree.map(jnp.copy, state))


def dev_retrieval(cfg, groups: ParamGroups, state: TrainState, tokenizer, dev_questions, index, store: CorpusStore,
                  depth: int = 0, exclude=None) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Top-k answer accuracy of the dev questions over the run's index (DPR's matching), and their
    scores and rows to ``depth`` (at least the largest k); ``exclude``: rows kept out of each
    question's (``ShardedIndex.search``). Every process searches all of them (process 0
    reports), the towers on its own devices."""
    encoder = DualEncoder(local_replica(for_inference(groups.module(state.params, "question"))),
                          local_replica(for_inference(groups.module(state.params, "passage"))), tokenizer,
                          question_max_length=cfg.retriever.question_max_length,
                          question_truncation=cfg.retriever.question_truncation)
    ks = tuple(cfg.train.eval_topk)
    excluded = 0 if exclude is None else np.asarray(exclude).reshape(len(dev_questions), -1).shape[1]
    scores, rows = retrieve(encoder, index, dev_questions, min(max(*ks, depth), len(store) - excluded),
                            progress=False, exclude=exclude)
    accuracy, _ = dpr_results(dev_questions, scores, rows, store, store.ids, ks=ks, excluded=excluded)
    return {metric_name(k): accuracy[k] for k in ks}, scores, rows


def dev_accuracy(cfg, groups: ParamGroups, state: TrainState, tokenizer, dev_questions, index,
                 store: CorpusStore) -> dict[str, float]:
    """Top-k answer accuracy of the dev questions over the run's index (``dev_retrieval``)."""
    return dev_retrieval(cfg, groups, state, tokenizer, dev_questions, index, store)[0]


def frozen_towers(cfg) -> tuple[str, ...]:
    """The towers ``train.train_question_tower`` / ``train.train_passage_tower`` keep fixed."""
    return tuple(role for role in ("question", "passage") if not cfg.train[f"train_{role}_tower"])


class TrainsTowers:
    """What every method that trains the two retriever towers shares: the towers a run starts
    from (``retriever.*``) and the optimizer's settings (``train.*``)."""

    initial_reader = None  # (reader argument, ReaderSettings) of a method that also trains a reader
    always_frozen: tuple[str, ...] = ()  # roles the method never trains (joint top-K: the passage tower)

    def init_towers(self, cfg, **other_modules) -> None:
        """The towers, and ``other_modules`` by role (a reader), as the run's parameter groups."""
        question, passage = initial_towers(cfg.retriever.checkpoint, shared=cfg.retriever.shared_towers,
                                           projection=cfg.retriever.projection)
        # the compute policy every model takes (as the reader's reader.dtype / remat / remat_policy)
        policy = dict(dtype=cfg.retriever.dtype, remat=cfg.retriever.remat, remat_policy=cfg.retriever.remat_policy)
        shared = passage is question
        question = with_config(question, **policy)
        passage = question if shared else with_config(passage, **policy)
        self.groups, self.params = ParamGroups.split({"question": question, "passage": passage, **other_modules})
        self.source = cfg.retriever.checkpoint
        self.max_lengths = {"question": cfg.retriever.question_max_length, "passage": cfg.retriever.passage_max_length}

    def optim_config(self) -> OptimConfig:
        train = self.cfg.train
        return OptimConfig(learning_rate=train.learning_rate, total_steps=self.total_steps,
                           warmup_fraction=train.warmup_fraction, weight_decay=train.weight_decay,
                           clip_norm=train.clip_norm, frozen_roles=frozen_towers(self.cfg) + self.always_frozen)
