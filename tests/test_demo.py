"""The README's quick start, shortened: `art-jax train --config=configs/demo.py` on the
generated world must teach the random retriever to find the passages that answer the dev
questions (accuracy recomputed from the retrieved texts, as `art-jax evaluate` does)."""

import os
import re
import subprocess
import sys

from tests.multiprocess import ROOT


def test_a_shortened_demo_run_raises_dev_accuracy(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a fresh machine
    run = subprocess.run([sys.executable, "-m", "art_jax", "train", "--config=configs/demo.py",
                          f"--workdir={tmp_path / 'demo'}", "--config.train.steps=100",
                          "--config.train.eval_every=100"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    [line] = [line for line in run.stdout.splitlines() if line.startswith("dev accuracy:")]
    accuracy = {int(k): (float(a), float(b)) for k, a, b in re.findall(r"top-(\d+) ([\d.]+)% -> ([\d.]+)%", line)}
    assert set(accuracy) == {1, 5, 20}, line
    before, after = accuracy[5]
    assert after - before >= 20.0, line  # the bar for the full demo, met in a quarter of its steps
    assert os.path.isfile(tmp_path / "demo" / "config.json")
