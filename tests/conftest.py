"""Test session set-up: 8 fake CPU devices (before JAX initialises) and tiny checkpoints."""

import atexit
import json
import os
import shutil
import tempfile

from tests.multiprocess import COMPILE_FAST  # noqa: E402  (no JAX import: before JAX initialises)

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {COMPILE_FAST}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiling is most of a tiny training run, and many tests (and the processes they start) compile
# the same programs: one persistent compilation cache for the session (same program, same binary)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="art_jax-test-jit-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests import hf_fixtures  # noqa: E402
from tests.hf_fixtures import CORPUS  # noqa: E402

# pytest-xdist hands out whole files (the README's --dist loadfile), by default those of most tests first:
# the longest files (measured in CI) go first instead, so that both workers are busy to the end. test_demo.py
# early, test_metrics.py and test_user_path.py late: the demo run they share is built by the first to ask.
LONGEST_FILES = ("test_mss.py", "test_answer.py", "test_multihost.py", "test_train.py", "test_reader_methods.py",
                 "test_checkpoints.py", "test_demo.py", "test_dry_run.py", "test_train_step.py", "test_refresh.py",
                 "test_storage.py", "test_contrastive.py")
LAST_FILES = ("test_metrics.py", "test_user_path.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(LONGEST_FILES)}
    order.update({name: len(order) + 1 + i for i, name in enumerate(LAST_FILES)})
    items.sort(key=lambda item: order.get(item.path.name, len(LONGEST_FILES)))


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices; was JAX initialised earlier?"


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return hf_fixtures.make_bert_checkpoint(str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="session")
def t5_v10_dir(tmp_path_factory):
    return hf_fixtures.make_t5_checkpoint(str(tmp_path_factory.mktemp("t5v10")), version="1.0")


@pytest.fixture(scope="session")
def t5_v11_dir(tmp_path_factory):
    return hf_fixtures.make_t5_checkpoint(str(tmp_path_factory.mktemp("t5v11")), version="1.1")


@pytest.fixture(scope="session")
def t5_sharp_dir(t5_v11_dir, tmp_path_factory):
    """t5_v11_dir with its output head scaled by 10. The random tiny T5's scores are nearly
    flat in the passage (max - min over ROWS: 0.02 to 0.05 per question, over 70 passages at
    most 0.06), so the teacher would hardly weigh in the loss; sharper logits spread them by
    tenths of a nat, as a trained teacher's over retrieved passages."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = str(tmp_path_factory.mktemp("t5_sharp"))
    shutil.copytree(t5_v11_dir, folder, dirs_exist_ok=True)
    weights = load_file(f"{t5_v11_dir}/model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 10
    save_file(weights, f"{folder}/model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(corpus TSV, questions JSONL) of a small training run: tests/test_train.py's `_config`."""
    folder = tmp_path_factory.mktemp("train_data")
    corpus = folder / "corpus.tsv"
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for i, sentence in enumerate(CORPUS):
            f.write(f"{i + 1}\t{sentence}\tT{i % 9}\n")
    questions = folder / "questions.jsonl"
    with open(questions, "w", encoding="utf-8") as f:
        for sentence in CORPUS[:40]:
            words = sentence.rstrip(".").split()
            f.write(json.dumps({"question": f"who {words[1]} the {words[3]}?", "answers": [words[-1]]}) + "\n")
    return str(corpus), str(questions)


def once_per_session(tmp_path_factory, name, build):
    """build(folder) -> a JSON value, run once for the whole session: pytest-xdist gives each worker
    its own session fixtures, and a costly run wanted by test files on both workers would otherwise
    run twice. The first worker to ask builds it under a lock; the other waits and reads it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder all workers' temporary folders are in
    result = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not result.exists():
            value = build(root / name)
            result.write_text(json.dumps(value))
    return json.loads(result.read_text())


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's quick start, shortened to 100 steps: `art-jax train --config=configs/demo.py`
    as its own process on one CPU device, as on a fresh machine. Returns (workdir, stdout); tests
    only read the workdir."""

    def train(folder):
        import subprocess
        import sys

        from tests.multiprocess import ROOT, child_env

        workdir = folder / "run"
        env = child_env(compile_fast=False)  # one CPU device; it learns for 100 steps: optimised code
        run = subprocess.run([sys.executable, "-m", "art_jax", "train", "--config=configs/demo.py",
                              f"--workdir={workdir}", "--config.train.steps=100", "--config.train.eval_every=100"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout + run.stderr
        return [str(workdir), run.stdout]

    return tuple(once_per_session(tmp_path_factory, "demo_run", train))
