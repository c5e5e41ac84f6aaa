"""The reader demo as the README gives it: `art-jax train --config=configs/reader_demo.py` (EMDR2
on the generated world, its retriever pre-trained by the ART demo first) must raise dev EM by at
least 20 points, the answers judged by SQuAD's normalisation, and not lose the retriever's top-5.
Slow (minutes on 2 CPU cores): `python -m pytest -m slow tests/test_reader_demo.py`."""

import os
import re
import subprocess
import sys

import pytest

from tests.multiprocess import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_reader_demo_learns_to_answer(tmp_path):
    env = child_env(compile_fast=False)  # one CPU device, as on a fresh machine
    run = subprocess.run([sys.executable, "-m", "art_jax", "train", "--config=configs/reader_demo.py",
                          f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    [line] = [line for line in run.stdout.splitlines() if line.startswith("dev EM")]
    figures = {name: (float(a), float(b)) for name, a, b in re.findall(r"(EM|top-5) ([\d.]+)% -> ([\d.]+)%", line)}
    assert set(figures) == {"EM", "top-5"}, line
    assert figures["EM"][1] - figures["EM"][0] >= 20.0, line
    assert figures["top-5"][1] >= figures["top-5"][0] - 2.0, line  # the retriever kept what pre-training gave
    assert "the retriever's pre-training: 300 steps" in run.stdout
