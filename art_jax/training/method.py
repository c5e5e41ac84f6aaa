"""What a training method gives the loop (``art_jax.training.loop.Trainer``).

A method is a class built as ``Method(cfg, workdir, mesh)`` (after ``check_config(cfg)``
has passed) holding what its steps need (data, a teacher, the initial parameters). The loop
owns everything else: resume, cadence, the index, evaluation, checkpoints, SIGTERM and
metrics. Methods never loop over steps.
"""

from __future__ import annotations

from typing import Protocol

import jax
from flax import nnx
from jax.sharding import NamedSharding

from art_jax.training.state import OptimConfig, ParamGroups, TrainState
from art_jax.training.update import Objective


class Method(Protocol):
    name: str
    groups: ParamGroups  # the trained modules' graphs, parameter group per role
    params: dict[str, nnx.State]  # initial parameters by group
    objective: Objective  # the loss and how its gradients are taken
    batch_shardings: dict[str, NamedSharding]  # how each array of a step's batch is placed
    total_steps: int
    # the evidence index of the corpus store: "train" searches it in every step (the loop refreshes it
    # on train.refresh_every), "fixed" searches it in every step and never refreshes it (a frozen passage
    # tower), "eval" only evaluates with it (the loop rebuilds it before each evaluation), None needs none
    index_use: str | None
    store: object  # the corpus store (when it uses the index)
    log_labels: dict[str, str]  # short names for the progress line, e.g. {"teacher_entropy": "H(teacher)"}
    source: str | None  # the retriever argument its towers started from (copied into WORKDIR/models/); None: no towers
    # (reader argument, ReaderSettings) of the reader it trains (copied into WORKDIR/models/reader/), or None
    initial_reader: tuple | None
    max_lengths: dict[str, int]  # each role's max length, recorded for export and search

    @staticmethod
    def check_config(cfg) -> None:
        """Cheap checks of the method's config keys and files, before any heavy work."""

    @staticmethod
    def eval_metrics(cfg) -> tuple[str, ...]:
        """The names ``evaluate`` returns (``top{k}``, ``mrr``, ``em``, ``f1``)."""

    def optim_config(self) -> OptimConfig: ...

    def batch(self, state: TrainState, step: int, index) -> tuple[dict[str, jax.Array], dict[str, float]]:
        """The global arrays of ``step``'s batch (placed as ``batch_shardings``) and host-side
        metrics (stage times as ``time_NAME`` in seconds)."""

    def evaluate(self, state: TrainState, index) -> dict[str, float]:
        """Dev metrics by name; empty when there is nothing to evaluate on."""
