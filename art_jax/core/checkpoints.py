"""Orbax checkpoints of a training run: the train state (params, optimizer state, step,
RNG, skipped-step count) and a small JSON record (data position, index version).

Orbax writes each step into a temporary folder and renames it when complete (on GCS: writes
a commit marker last), so a kill at any moment leaves the previous checkpoint restorable;
saves are asynchronous.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from art_jax.core.errors import UserError
from art_jax.core.storage import is_remote, split_url

# A leaf of ``like`` that ``Checkpoints.restore`` does not read (it comes back as is): the
# refresher reads only the passage tower out of a whole train state.
SKIP = ocp.PLACEHOLDER


class _ReadingNotices(logging.Filter):
    """Drops the two warnings Orbax gives whenever a run's checkpoints are read (export, refresh,
    answer, resume), which say nothing wrong: that a read-only view is read-only, and that the state
    item's own folder has no metadata file (a composite checkpoint keeps it in the step's folder,
    whose absence still warns)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Given directory is read only") or (
            message.startswith("Metadata file does not exist") and message.endswith("/state/_CHECKPOINT_METADATA")))


logging.getLogger("absl").addFilter(_ReadingNotices())


def orbax_path(path: str) -> str:
    """Orbax takes local paths and gs:// URLs (tensorstore writes the arrays; object stores get
    a commit marker instead of the folder rename); a file:// URL is a local path to it."""
    if not is_remote(path):
        return os.path.abspath(path)
    scheme, rest = split_url(path)
    if scheme == "file":
        return rest
    if scheme != "gs":
        raise UserError(f"{path}: checkpoints are written to a local path, gs:// or file://, not {scheme}://")
    return path


class Checkpoints:
    def __init__(self, workdir: str, *, every: int = 0, keep: int = 0, read_only: bool = False,
                 folder: str = "checkpoints"):
        """``read_only``: another process's view of a run (the refresher): it never saves or
        deletes, and ``steps()`` re-lists the folder, which the writing process keeps changing.
        ``folder``: "checkpoints", or "best" for the best evaluation's state (``keep=1``)."""
        self.every = every
        self.directory = orbax_path(os.path.join(workdir, folder))
        # Orbax names its cross-process barriers after the step's folder: "checkpoints" and "best"
        # both save step s at the end of a run, and equal names would deadlock the processes
        multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=folder)
        options = (ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                                multiprocessing_options=multiprocessing) if read_only else
                   ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                                enable_async_checkpointing=True,
                                                multiprocessing_options=multiprocessing))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "record"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Every finished checkpoint's step, oldest first, as on disk now."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, record: dict, *, force: bool = False) -> bool:
        """Saves at multiples of ``every`` (0: never), or when forced (preemption, the last step)."""
        if not (force or (self.every and step % self.every == 0)) or step == self.manager.latest_step():
            return False
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               record=ocp.args.JsonSave(record)), force=force)

    def restore(self, step: int, like) -> tuple[object, dict]:
        """The state at ``step``, placed like ``like`` (same tree, shapes and shardings; ``SKIP``
        leaves are not read)."""
        abstract = jax.tree.map(lambda x: x if x is SKIP else ocp.utils.to_shape_dtype_struct(x), like)
        state = ocp.args.StandardRestore(abstract)
        if any(x is SKIP for x in jax.tree.leaves(abstract)):  # StandardRestore refuses placeholders
            state = ocp.args.PyTreeRestore(abstract, ocp.checkpoint_utils.construct_restore_args(abstract))
        restored = self.manager.restore(step, args=ocp.args.Composite(state=state, record=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["record"])

    def state_metadata(self, step: int) -> dict:
        """The saved state's tree (nested dicts) with each array's metadata (shape, dtype), read
        without a target: what restoring a part of it needs."""
        path = os.path.join(self.directory, str(step), "state")
        return ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree

    def record(self, step: int) -> dict:
        """The JSON record saved with ``step``, without reading the state."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
