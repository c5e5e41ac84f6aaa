"""Checkpoints under kill -9: a real `art-jax train` process killed by SIGKILL in the middle
of an asynchronous Orbax save leaves the previous checkpoint restorable, and rerunning the
same command resumes from it and ends with bitwise the state of an uninterrupted run."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from art_jax.core.checkpoints import Checkpoints
from tests.multiprocess import ROOT, child_env

CONFIG = """
from tests.test_train import _config


def get_config():
    return _config({files!r}, {bert_dir!r})
"""

# `art-jax train` that SIGKILLs itself inside the save of step 4, at POINT (argv[1]), as an OOM
# kill or a lost host would: no cleanup. Checkpoints are every 2 steps, so step 2's save is
# finished (Orbax waits for it before starting 4's) and step 4's is under way in Orbax's
# background thread. Points: "arrays" - the state's arrays are written (per-process OCDBT
# files) but not yet merged or renamed; "rename" - everything is written, commit marker
# included, and only the rename of the step folder into place is left.
KILL_IN_SAVE_OF_STEP_4 = """
import os, signal, sys
from orbax.checkpoint._src.path import async_path
from orbax.checkpoint._src.serialization import ocdbt_utils

POINT = sys.argv.pop(1)
STEP_4_TMP = "4" + ".orbax-checkpoint-tmp"


def die(where):
    print(f"KILLED in step 4's save: {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


merge, rename = ocdbt_utils.merge_ocdbt_per_process_files, async_path.rename


async def merge_or_die(directory, **kwargs):
    if POINT == "arrays" and directory.parent.name == STEP_4_TMP:
        die(f"arrays written in {directory}, not merged")
    return await merge(directory, **kwargs)


async def rename_or_die(src, dst):
    if POINT == "rename" and src.name == STEP_4_TMP:
        die(f"before renaming {src.name} to {dst.name}")
    return await rename(src, dst)


ocdbt_utils.merge_ocdbt_per_process_files, async_path.rename = merge_or_die, rename_or_die
from art_jax.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def train(files, bert_dir, tmp_path_factory):
    """Runs `art-jax train` on a small config (6 steps, checkpoints every 2, sync refresh at
    3) as its own process on one CPU device (a save does not depend on the device count; one
    compiles faster); ``kill_at`` runs it under
    KILL_IN_SAVE_OF_STEP_4 instead. Returns the finished process (output captured)."""
    folder = tmp_path_factory.mktemp("kill")
    config = folder / "config.py"
    config.write_text(CONFIG.format(files=files, bert_dir=bert_dir))
    # compiling is two thirds of a run; the runs share a persistent compilation cache (an entry
    # cut short by the kill is only a warning and a recompile for the next run)
    env = child_env(JAX_COMPILATION_CACHE_DIR=str(folder / "jax_cache"))

    def run(workdir, kill_at=None):
        program = ["-c", KILL_IN_SAVE_OF_STEP_4, kill_at] if kill_at else ["-m", "art_jax"]
        return subprocess.run([sys.executable, *program, "train", f"--config={config}", f"--workdir={workdir}"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)

    return run


@pytest.fixture(scope="module")
def uninterrupted(train, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    done = train(workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir


def _restore(workdir, step):
    """The state (nested dicts, as saved: read by its own metadata) and record of checkpoint
    ``step``; the record's index path relative to the workdir."""
    checkpoints = Checkpoints(workdir, read_only=True)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=one_device),
                        checkpoints.state_metadata(step))
    state, record = checkpoints.restore(step, like)
    checkpoints.close()
    return jax.device_get(state), {**record, "index_path": os.path.relpath(record["index_path"], workdir)}


def _assert_same_state(got, want):
    """Bitwise: params, optimizer state, step, RNG, skip count."""
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    flat_got = jax.tree.leaves(got)
    assert len(flat_got) == len(flat_want)
    for (path, w), g in zip(flat_want, flat_got):
        np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("point", ["arrays", "rename"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_and_the_rerun_resumes(train, uninterrupted, tmp_path,
                                                                                    point):
    workdir = str(tmp_path / "run")
    checkpoints = os.path.join(workdir, "checkpoints")
    killed = train(workdir, kill_at=point)
    # the kill landed where intended: SIGKILL, in step 4's save, with part of it on disk
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "KILLED in step 4's save" in killed.stdout, killed.stdout
    half_written = os.path.join(checkpoints, "4.orbax-checkpoint-tmp")
    assert os.path.isdir(half_written) and not os.path.exists(os.path.join(checkpoints, "4"))
    if point == "arrays":
        assert os.path.isdir(os.path.join(half_written, "state.orbax-checkpoint-tmp", "ocdbt.process_0"))
    else:  # complete but for the rename: even the commit marker is there
        assert os.path.isfile(os.path.join(half_written, "commit_success.txt"))
        assert os.path.isdir(os.path.join(half_written, "state"))

    # only step 2 counts as saved, and it restores to the uninterrupted run's step 2
    assert Checkpoints(workdir, read_only=True).steps() == [2]
    as_the_trainer_opens_it = Checkpoints(workdir)
    assert as_the_trainer_opens_it.latest_step() == 2
    as_the_trainer_opens_it.close()
    assert os.path.isdir(half_written)  # left for the rerun to cope with
    state, record = _restore(workdir, 2)
    want_state, want_record = _restore(uninterrupted, 2)
    _assert_same_state(state, want_state)
    assert record == want_record and record["index_path"] == os.path.join("index", "v000000")

    # the same command again: resumes from step 2 (not from scratch), saves 4 over the
    # leftover temporary folder, and ends where the uninterrupted run ended, bit for bit
    rerun = train(workdir)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed from step 2 " in rerun.stdout, rerun.stdout
    assert Checkpoints(workdir, read_only=True).steps() == [2, 4, 6]
    assert not os.path.exists(half_written)
    state, record = _restore(workdir, 6)
    want_state, want_record = _restore(uninterrupted, 6)
    assert int(state["step"]) == 6
    _assert_same_state(state, want_state)
    step_2 = jax.tree.leaves(_restore(uninterrupted, 2)[0]["params"])  # steps 3-6 did train
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want_state["params"]), step_2))
    # same data position and index age; the version numbers differ (the killed run published some too)
    assert {k: record[k] for k in ("step", "data_position", "index_step")} == \
        {k: want_record[k] for k in ("step", "data_position", "index_step")}
