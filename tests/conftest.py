"""Test session set-up: 8 fake CPU devices (before JAX initialises) and tiny checkpoints."""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests import hf_fixtures  # noqa: E402
from tests.hf_fixtures import CORPUS  # noqa: E402


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
