"""Test session set-up: 8 fake CPU devices (before JAX initialises) and tiny checkpoints."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests import hf_fixtures  # noqa: E402


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
