"""Asynchronous index refresh: a real `art-jax refresh` process beside the trainer builds
indexes from its checkpoints; the trainer swaps to them, survives the refresher's death,
and a restarted refresher resumes its half-built version."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from art_jax.config import write_config
from art_jax.core.checkpoints import Checkpoints
from art_jax.core.errors import UserError
from art_jax.methods import make_trainer
from art_jax.retrieval.index import (
    IndexBuilder,
    IndexPlan,
    IndexVersion,
    published_versions,
    version_folder,
    version_name,
)
from art_jax.retrieval.refresh import Refresher
from art_jax.training.loop import Trainer
from tests.multiprocess import ROOT, child_env
from tests.test_cli import _fails
from tests.test_train import _config

# `art-jax refresh` that dies by SIGKILL right after writing its first index chunk, as an
# OOM kill or a lost host would: no cleanup, a half-built version left behind
DIE_AFTER_FIRST_CHUNK = """
import os, signal, sys
from art_jax.retrieval import index
write = index.IndexBuilder.write_chunk
def write_then_die(self, chunk, embeddings):
    write(self, chunk, embeddings)
    os.kill(os.getpid(), signal.SIGKILL)
index.IndexBuilder.write_chunk = write_then_die
from art_jax.cli import main
main(sys.argv[1:])
"""


def _async_config(files, bert_dir, **overrides):
    # a checkpoint (and so an index) every 2 steps, none otherwise; keep them all for the resume test
    return _config(files, bert_dir, **{"train.refresh_mode": "async", "train.refresh_every": 2,
                                       "train.checkpoint_every": 100, "train.keep_checkpoints": 10, **overrides})


@pytest.fixture
def refreshers(tmp_path):
    """Starts `art-jax refresh` processes; kills any still running when the test ends."""
    started = []

    def start(workdir, name, *, die_after_first_chunk=False):
        env = child_env()  # its own device, as a separate job
        program = ["-c", DIE_AFTER_FIRST_CHUNK] if die_after_first_chunk else ["-m", "art_jax"]
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen([sys.executable, *program, "refresh", f"--workdir={workdir}",
                                        "--poll-seconds=0.2"], env=env, cwd=ROOT, stdout=out,
                                       stderr=subprocess.STDOUT)
        process.log = log
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait(condition, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _hold_at_step(monkeypatch, hold_step, condition, what):
    """The trainer waits inside step ``hold_step`` until ``condition``: the test, not the
    machine's speed, decides which checkpoints exist while the refresher works."""
    real_step = Trainer.train_step

    def train_step(self, step):
        metrics = real_step(self, step)
        if step == hold_step:
            _wait(condition, what)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", train_step)


def _metas(index_dir):
    return {v: json.load(open(os.path.join(index_dir, version_name(v), "meta.json")))
            for v in published_versions(index_dir)}


def _staleness(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row["index_staleness"] for row in map(json.loads, f)]  # one row per step, in order


def test_trainer_swaps_to_the_index_the_refresher_publishes(files, bert_dir, tmp_path, monkeypatch, refreshers):
    workdir = str(tmp_path / "run")
    index_dir = os.path.join(workdir, "index")
    # the run starts from a copy of the checkpoint that is gone before the refresher starts: it
    # reads the towers back from the workdir alone (WORKDIR/models/ and the Orbax checkpoints)
    start = str(tmp_path / "start")
    shutil.copytree(bert_dir, start)
    trainer = make_trainer(_async_config(files, start), workdir)  # writes config.json: the refresher can start
    shutil.rmtree(start)
    refresher = refreshers(workdir, "refresher")
    # checkpoint 2 is written as step 1 ends; hold the trainer in step 2 until the refresher has indexed it
    _hold_at_step(monkeypatch, 2, lambda: len(published_versions(index_dir)) == 2 or refresher.poll() is not None,
                  "the refresher's first index")
    trainer.run()
    refresher.wait(timeout=120)  # it exits by itself once the trainer's last checkpoint is indexed
    log = refresher.log.read_text()
    assert refresher.returncode == 0, log

    # v0: the trainer's own at step 0; v1: the refresher's, from checkpoint 2, picked up at step 3
    assert _staleness(workdir)[:4] == [0, 1, 2, 1]
    metas = _metas(index_dir)
    assert (metas[0]["step"], metas[1]["step"]) == (0, 2)
    assert metas[1]["checkpoint"] == os.path.join(os.path.abspath(workdir), "checkpoints", "2")
    last = max(metas)
    assert metas[last]["step"] == 6, metas  # the final checkpoint, indexed before the refresher left
    assert log.count("refresh: published") == len(metas) - 1, log  # a status line per index built
    assert "the trainer has finished" in log

    # v1 holds checkpoint 2's passage tower, not the initial one
    state, _ = Checkpoints(workdir, read_only=True).restore(2, trainer.state)
    rows = np.arange(0, len(trainer.method.store), 37)
    tokens = trainer.method.store.retriever_tokens(rows, 32, multiple=32)
    expected = np.asarray(trainer.method.groups.module(state.params, "passage").embed_cls(tokens.ids, tokens.mask))
    v0, v1 = (IndexVersion.open(os.path.join(index_dir, version_name(v))) for v in (0, 1))
    got = np.stack([v1.read(r, r + 1)[0] for r in rows]).astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-3)
    assert not np.allclose(np.stack([v0.read(r, r + 1)[0] for r in rows]).astype(np.float32), expected,
                           rtol=2e-2, atol=2e-3)

    # the checkpoints record the refresher's version: a resumed run searches it again
    assert trainer.index.version >= 1 and trainer.index.step >= 2
    resumed = make_trainer(_async_config(files, bert_dir, **{"train.steps": 8}), workdir)
    try:
        assert resumed.resume() == 6
        assert (resumed.index.version, resumed.index.step) == (trainer.index.version, trainer.index.step)
    finally:
        resumed.checkpoints.close()


def test_a_killed_refresher_does_not_stop_training_and_a_restarted_one_resumes(
        files, bert_dir, tmp_path, monkeypatch, capsys, refreshers):
    workdir = str(tmp_path / "run")
    index_dir = os.path.join(workdir, "index")
    trainer = make_trainer(_async_config(files, bert_dir, **{"train.steps": 8}), workdir)
    doomed = refreshers(workdir, "doomed", die_after_first_chunk=True)
    _hold_at_step(monkeypatch, 2, lambda: doomed.poll() is not None, "the refresher's death")
    result = trainer.run()
    assert doomed.returncode == -signal.SIGKILL, doomed.log.read_text()

    # training went on to the end with the step-0 index, and said so once
    assert result["after"] and int(trainer.state.step) == 8
    assert _staleness(workdir) == list(range(8))
    out = capsys.readouterr().out
    assert out.count("warning:") == 1, out
    assert "warning: step 7: no new index for 7 steps" in out and "refresher.json" in out
    assert "no longer running" in out

    half = version_folder(index_dir, 1)  # unpublished: no meta.json
    assert json.load(open(os.path.join(half, "plan.json")))["step"] == 2
    [chunk] = os.listdir(os.path.join(half, "done"))
    written = os.stat(os.path.join(half, "done", chunk)).st_mtime_ns

    restarted = refreshers(workdir, "restarted")
    restarted.wait(timeout=120)  # the trainer has finished: it leaves once its last checkpoint is indexed
    log = restarted.log.read_text()
    assert restarted.returncode == 0, log
    # v1 is finished from checkpoint 2 keeping its built chunk; then the newest, 8 (4 and 6 skipped)
    assert {v: meta["step"] for v, meta in _metas(index_dir).items()} == {0: 0, 1: 2, 2: 8}
    assert os.stat(os.path.join(index_dir, "v000001", "done", chunk)).st_mtime_ns == written
    assert "from checkpoint step 2" in log and "resumed with 1 chunk(s) already built" in log, log
    assert "from checkpoint step 8" in log and "skipped checkpoint(s) [4, 6]" in log, log

    # an indexed step is not redone
    assert Refresher(workdir).run(once=True) == []
    assert "checkpoint step 8 is indexed already" in capsys.readouterr().out
    assert published_versions(index_dir) == [0, 1, 2]


def _publish(index_dir, ids, dim):
    """A published version of random embeddings (the trainer only checks its shape and ids)."""
    plan = IndexPlan(count=len(ids), dim=dim, dtype="float16", chunk_rows=len(ids), corpus="", checkpoint="test")
    builder = IndexBuilder(index_dir, 0, plan).open(create=True)
    builder.write_chunk(0, np.random.default_rng(0).normal(size=(len(ids), dim)).astype(np.float16))
    return builder.publish(ids)


def test_bad_workdirs_and_initial_indexes_are_one_clear_error(files, bert_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a training workdir (no config.json)" in _fails(["refresh", f"--workdir={empty}"], capsys)
    started = tmp_path / "started"  # the trainer wrote its config, no checkpoint yet
    started.mkdir()
    write_config(_async_config(files, bert_dir), str(started))
    assert "no checkpoint to index yet" in _fails(["refresh", f"--workdir={started}", "--once"], capsys)
    sync = tmp_path / "sync"
    sync.mkdir()
    write_config(_config(files, bert_dir), str(sync))
    assert "train.refresh_mode is 'sync'" in _fails(["refresh", f"--workdir={sync}"], capsys)

    workdir = str(tmp_path / "run")
    trainer = make_trainer(_config(files, bert_dir), workdir)
    try:
        store = trainer.method.store
        for path, message in [
            (_publish(str(tmp_path / "short"), store.ids[:5], 32), r"has 5 rows, but the corpus store .* has 241"),
            (_publish(str(tmp_path / "narrow"), store.ids, 16), "holds 16-d embeddings; the passage tower makes 32-d"),
            (str(tmp_path / "missing"), "no published index version"),
        ]:
            trainer.cfg.data.initial_index = path
            with pytest.raises(UserError, match=f"^data.initial_index: .*{message}"):
                trainer.resume()
        # a matching one is searched from step 0; the trainer embeds nothing
        trainer.cfg.data.initial_index = str(tmp_path / "good")
        good = _publish(str(tmp_path / "good"), store.ids, 32)
        assert trainer.resume() == 0
        assert (trainer.index.path, trainer.index.step) == (good, 0)
        assert published_versions(os.path.join(workdir, "index")) == []
    finally:
        trainer.checkpoints.close()
