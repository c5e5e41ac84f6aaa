"""Orbax checkpoints of a training run: the train state (params, optimizer state, step,
RNG, skipped-step count) and a small JSON record (data position, index version).

Orbax writes each step into a temporary folder and renames it when complete, so a kill
at any moment leaves the previous checkpoint restorable; saves are asynchronous.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, workdir: str, *, every: int, keep: int):
        self.every = every
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                                 enable_async_checkpointing=True),
            item_names=("state", "record"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, record: dict, *, force: bool = False) -> bool:
        """Saves at multiples of ``every`` (or when forced: preemption, the last step)."""
        if (not force and step % self.every) or step == self.manager.latest_step():
            return False
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               record=ocp.args.JsonSave(record)), force=force)

    def restore(self, step: int, like) -> tuple[object, dict]:
        """The state at ``step``, placed like ``like`` (same tree, shapes and shardings)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      record=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["record"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
