"""Index refresh beside the trainer (`art-jax refresh`): EMDR2's asynchronous variant of
ART's refresh, for ``train.refresh_mode = "async"``.

The refresher is its own process on its own devices; it and the trainer talk only through
the workdir, so either can die or restart without the other:
  trainer -> refresher: a checkpoint at every multiple of ``train.refresh_every`` ("checkpoint
    ready"), ``config.json`` (the run's settings) and ``finished.json`` (the run is over: the
    refresher indexes the last checkpoint and exits);
  refresher -> trainer: index versions published in ``index/`` by their meta.json, written
    last ("index ready"), and ``refresher.json``, a heartbeat (pid, host, state, time)
    replaced whole, which the trainer quotes when an index is overdue.
The trainer looks for a newer version at step boundaries (one listing) and swaps to it;
a slow or dead refresher only makes the index staler.
"""

from __future__ import annotations

import json
import os
import socket
import time

import ml_collections
import numpy as np

from art_jax.config import read_run_config
from art_jax.core import storage
from art_jax.core.checkpoints import Checkpoints
from art_jax.core.distributed import is_lead, lead_value
from art_jax.core.errors import UserError
from art_jax.core.fileio import read_json
from art_jax.data.corpus import CorpusStore
from art_jax.retrieval.embed import embed_corpus
from art_jax.retrieval.index import IndexVersion, finished_chunks, published_versions, version_folder
from art_jax.workdir import CHECKPOINTS, CONFIG, CORPUS_STORE, FINISHED, HEARTBEAT, INDEX, read_tower


def build_index(cfg, tower, store: CorpusStore, workdir: str, *, checkpoint: str, step: int) -> str:
    """Embed ``store`` with ``tower`` into a new version in WORKDIR/index as the run's config
    says (the trainer's sync refresh and the refresher alike); returns the published folder."""
    return embed_corpus(tower, store, os.path.join(workdir, INDEX), checkpoint=checkpoint, step=step,
                        dtype=cfg.index.dtype, max_length=cfg.retriever.passage_max_length,
                        chunk_rows=cfg.index.chunk_rows, batch_size=cfg.index.embed_batch_size,
                        progress=cfg.index.progress)


def initial_index(path: str, store: CorpusStore, dim: int) -> str:
    """``data.initial_index`` checked against the run: a published version (or an index folder:
    its newest) whose rows are the corpus store's passages; returns the version folder."""
    try:
        version = IndexVersion.open(path)
    except (UserError, OSError) as err:
        raise UserError(f"data.initial_index: {err}") from None
    if version.count != len(store) or not np.array_equal(version.ids, store.ids):
        raise UserError(f"data.initial_index: {version.path} has {version.count} rows, but the corpus store "
                        f"{store.path} has {len(store)} passages (or other ids); it must be an index of that store")
    if version.dim != dim:
        raise UserError(f"data.initial_index: {version.path} holds {version.dim}-d embeddings; "
                        f"the passage tower makes {dim}-d ones")
    return version.path


# ---------------------------------------------------------------------------- trainer side

def mark_finished(workdir: str, step: int | None) -> None:
    """``step``: the run ended there (its last checkpoint is complete); None: it is running."""
    if not is_lead():
        return
    path = os.path.join(workdir, FINISHED)
    if step is None:
        storage.remove(path)
    else:
        storage.write_text(path, json.dumps({"step": step, "time": time.time()}))


class IndexWatcher:
    """The trainer's half: at each step boundary process 0 lists WORKDIR/index (in a gs://
    workdir at most every ``poll_seconds``: each look is a few requests), and reads one small
    meta.json when a new version number shows up."""

    def __init__(self, workdir: str, refresh_every: int, *, poll_seconds: float = 10.0):
        self.workdir, self.refresh_every = workdir, refresh_every
        self.index_dir = os.path.join(workdir, INDEX)
        self.poll_seconds = poll_seconds if storage.is_remote(workdir) else 0.0
        self._looked = -float("inf")
        self._seen = -1  # newest version number already looked at
        self._warned = False

    def _look(self) -> list[int]:
        if time.monotonic() - self._looked < self.poll_seconds:
            return []
        self._looked = time.monotonic()
        return published_versions(self.index_dir, after=self._seen)

    def poll(self, step: int, index_step: int) -> tuple[str, int] | None:
        """(folder, checkpoint step) of a version built from a later checkpoint than the index
        in use (whose embeddings come from ``index_step``), or None; warns once when overdue."""
        # process 0 looks: a lagging host's view must not differ
        versions = self._look() if is_lead() else []
        newest = lead_value(versions[-1] if versions else None)
        if newest is not None:
            self._seen = newest
            path = version_folder(self.index_dir, newest)
            built = lead_value(read_json(os.path.join(path, "meta.json")).get("step") if is_lead() else None)
            if built is not None and built > index_step:
                self._warned = False
                if is_lead():
                    print(f"step {step}: searching {path} (from step {built}, staleness {step - built})", flush=True)
                return path, built
        # the next index is due from the checkpoint at index_step + refresh_every
        if not self._warned and step - index_step > 3 * self.refresh_every:
            self._warned = True
            if is_lead():
                print(f"warning: step {step}: no new index for {step - index_step} steps (train.refresh_every="
                      f"{self.refresh_every}); training goes on with the index from step {index_step}. "
                      f"{refresher_state(self.workdir)}", flush=True)
        return None


def refresher_state(workdir: str) -> str:
    """The refresher's heartbeat in words, for the trainer's warning."""
    path = os.path.join(workdir, HEARTBEAT)
    try:
        beat = read_json(path)
    except UserError:
        return f"No refresher has run ({path} is missing): start `art-jax refresh --workdir={workdir}`."
    running = ""
    if beat.get("host") == socket.gethostname():
        try:
            os.kill(beat["pid"], 0)
        except ProcessLookupError:
            running = ", and that process is no longer running"
        except PermissionError:
            pass
    return (f"{path}: the refresher (pid {beat.get('pid')} on {beat.get('host')}) was {beat.get('state')!r} "
            f"{time.time() - beat.get('time', 0):.0f}s ago{running}.")


# ---------------------------------------------------------------------------- refresher side

def read_async_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config the trainer wrote into ``workdir``; it must be an async run."""
    cfg = read_run_config(workdir)
    mode = cfg.train.get("refresh_mode", "sync")
    if mode != "async":
        raise UserError(f"{os.path.join(workdir, CONFIG)}: train.refresh_mode is {mode!r}; the refresher serves runs "
                        "with train.refresh_mode=async (a sync run re-embeds the corpus itself)")
    return cfg


class Refresher:
    """Builds an index version from each new checkpoint of the run in ``workdir``, newest first."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.cfg = read_async_config(workdir)
        self.index_dir = os.path.join(workdir, INDEX)
        self.checkpoints: Checkpoints | None = None
        self._store: CorpusStore | None = None  # opened at the first build
        self._beat = {"pid": os.getpid(), "host": socket.gethostname()}

    def heartbeat(self, state: str, **fields) -> None:
        if not is_lead():
            return
        storage.write_text(os.path.join(self.workdir, HEARTBEAT),
                     json.dumps({**self._beat, "state": state, "time": time.time(), **fields}))

    def steps(self) -> list[int]:
        if self.checkpoints is None:
            if not storage.isdir(os.path.join(self.workdir, CHECKPOINTS)):
                return []  # the trainer has not opened its checkpoints yet
            self.checkpoints = Checkpoints(self.workdir, read_only=True)
        return self.checkpoints.steps()

    def indexed_step(self) -> int:
        """The checkpoint step of the newest published version (-1: none)."""
        versions = published_versions(self.index_dir)
        if not versions:
            return -1
        step = read_json(os.path.join(version_folder(self.index_dir, versions[-1]), "meta.json")).get("step")
        return -1 if step is None else step

    def _half_built(self) -> tuple[int | None, int]:
        """(checkpoint step, finished chunks) of the next version's unfinished build, if any."""
        folder = version_folder(self.index_dir, (published_versions(self.index_dir) or [-1])[-1] + 1)
        plan = os.path.join(folder, "plan.json")
        if not storage.isfile(plan):
            return None, 0
        return read_json(plan).get("step"), len(finished_chunks(folder))

    def next_step(self, steps: list[int], *, newest_only: bool = False) -> int | None:
        """The checkpoint to index next: a half-built version's, so its finished chunks are kept,
        else the newest; those in between are skipped. None when the newest is indexed."""
        indexed = self.indexed_step()  # (a listing and a read: once, not per step)
        fresh = [s for s in steps if s > indexed]
        if not fresh:
            return None
        half, _ = self._half_built()
        return half if half in fresh and not newest_only else fresh[-1]

    def _load(self, step: int):
        """The passage tower of checkpoint ``step``, built from what the workdir holds (its
        copied initial model config and the Orbax checkpoint), replicated on this process's devices."""
        if self._store is None:
            self._store = CorpusStore(self.cfg.data.corpus_store or os.path.join(self.workdir, CORPUS_STORE))
        return read_tower(self.workdir, self.checkpoints, step, "passage")

    def build(self, step: int, skipped: list[int]) -> str:
        started = time.perf_counter()
        self.heartbeat("embedding", step=step)
        half, done = self._half_built()
        self.steps()  # process 0 picked the step: open and re-list here too (only seen steps restore)
        tower = self._load(step)
        store = self._store
        path = build_index(self.cfg, tower, store, self.workdir,
                           checkpoint=os.path.join(self.checkpoints.directory, str(step)), step=step)
        resumed = f", resumed with {done} chunk(s) already built" if half == step and done else ""
        skipped = f", skipped checkpoint(s) {skipped}" if skipped else ""
        if is_lead():
            print(f"refresh: published {path} from checkpoint step {step} ({len(store)} passages in "
                  f"{time.perf_counter() - started:.1f}s{resumed}{skipped})", flush=True)
        return path

    def run(self, *, once: bool = False, poll_seconds: float = 10.0) -> list[str]:
        """Index each new checkpoint until the trainer has finished and its last checkpoint is
        indexed (``once``: the newest checkpoint only, then return). Returns the published folders."""
        published = []
        while True:
            # read before the steps: when it exists, the last checkpoint is already complete
            finished = bool(lead_value(storage.isfile(os.path.join(self.workdir, FINISHED))))
            steps = self.steps()
            # a multi-process refresher builds one version together: process 0's pick for all
            step = lead_value(self.next_step(steps, newest_only=once))
            if step is not None:
                indexed = self.indexed_step()
                published.append(self.build(step, [s for s in steps if indexed < s < step]))
                if once:
                    break
                continue  # at once: more checkpoints may have come while embedding
            if once:
                if not steps:
                    raise UserError(f"{os.path.join(self.workdir, 'checkpoints')}: no checkpoint to index yet")
                if is_lead():
                    print(f"refresh: checkpoint step {steps[-1]} is indexed already", flush=True)
                break
            if finished:
                if is_lead():
                    print(f"refresh: the trainer has finished and its last checkpoint is indexed "
                          f"(step {self.indexed_step()}); exiting", flush=True)
                break
            self.heartbeat("waiting", indexed_step=self.indexed_step())
            time.sleep(poll_seconds)
        self.heartbeat("exited", indexed_step=self.indexed_step())
        return published
