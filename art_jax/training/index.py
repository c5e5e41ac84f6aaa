"""The evidence index a run trains against: built at the start (or taken from
``data.initial_index``), rebuilt from the current passage tower when the loop says so
(``sync``), or swapped for the versions `art-jax refresh` publishes (``async``); restored
with the checkpoint it was training against."""

from __future__ import annotations

import os

from art_jax.core.distributed import barrier, is_lead
from art_jax.core.errors import UserError
from art_jax.data.corpus import CorpusStore
from art_jax.retrieval.index import IndexVersion, remove_versions_before, version_name
from art_jax.retrieval.refresh import IndexWatcher, build_index, initial_index
from art_jax.retrieval.search import ShardedIndex
from art_jax.workdir import INDEX


class TrainingIndex:
    def __init__(self, cfg, workdir: str, store: CorpusStore, mesh, *, watch: bool = True):
        self.cfg, self.workdir, self.store, self.mesh = cfg, workdir, store, mesh
        # async refresh: `art-jax refresh` builds the indexes, this only watches for them
        self.watcher = (IndexWatcher(workdir, cfg.train.refresh_every) if watch and cfg.train.refresh_mode == "async"
                        else None)
        self.index: ShardedIndex | None = None
        self.version, self.step, self.path = None, 0, None

    def rebuild(self, tower, step: int, *, replace: bool = False) -> None:
        """Re-embed the corpus with ``tower``, publish it as a new version in WORKDIR/index and
        search that from now on; with ``replace`` the older versions are deleted (an index kept
        for evaluations only: no checkpoint needs them, and each holds the whole corpus)."""
        path = build_index(self.cfg, tower, self.store, self.workdir, checkpoint=self.workdir, step=step)
        self.load(path, step)
        if replace:
            barrier("art_jax.index.replaced")  # every process searches the new version now
            if is_lead():
                remove_versions_before(os.path.join(self.workdir, INDEX), self.version)

    def load(self, path: str, step: int) -> None:
        version = IndexVersion.open(path)
        self.index = ShardedIndex.from_version(version, self.mesh,
                                               rows_per_device=self.cfg.index.rows_per_device or None)
        self.version, self.step, self.path = version.meta["version"], step, version.path

    def start(self, tower) -> None:
        """A fresh run: ``data.initial_index`` if given, else the corpus embedded by ``tower``."""
        if self.cfg.data.initial_index:
            self.load(initial_index(self.cfg.data.initial_index, self.store, tower.config.embedding_dim), 0)
        else:
            self.rebuild(tower, 0)

    def resume(self, record: dict) -> None:
        """The version a checkpoint was training against (an initial index lies outside the
        workdir: its path is recorded; older records lack the path)."""
        path = record.get("index_path") or os.path.join(self.workdir, INDEX, version_name(record["index_version"]))
        try:
            self.load(path, record["index_step"])
        except UserError as err:
            raise UserError(f"resuming: the checkpoint's index is unusable: {err}") from None

    def poll(self, step: int) -> None:
        """Async: swap to a version built from a later checkpoint, if one was published."""
        if found := self.watcher.poll(step, self.step):
            self.load(*found)

    def record(self) -> dict:
        return {"index_version": self.version, "index_step": self.step, "index_path": self.path}
