"""The training loop: resume after preemption gives bitwise the uninterrupted run, a
half-written checkpoint is ignored, bad configs are one clear error each."""

import json
import os

import jax
import numpy as np
import pytest

from art_jax.config import apply_override, default_config
from art_jax.errors import UserError
from art_jax.train import Trainer
from tests.hf_fixtures import CORPUS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
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


def _config(files, bert_dir, **overrides):
    cfg = default_config()
    corpus, questions = files
    settings = {"retriever.checkpoint": bert_dir, "data.corpus": corpus, "data.train_questions": questions,
                "data.dev_questions": questions, "scorer.kind": "query_likelihood", "scorer.scale": 6.0,
                "retriever.question_max_length": 16, "retriever.passage_max_length": 32,
                "retriever.train_passage_max_length": 32, "index.chunk_rows": 64, "index.progress": False,
                "train.batch_size": 8, "train.topk": 4, "train.steps": 6, "train.learning_rate": 1e-3,
                "train.refresh_every": 3, "train.checkpoint_every": 2, "train.eval_every": 100,
                "train.log_every": 100, "train.eval_topk": (1, 5), **overrides}
    for key, value in settings.items():
        apply_override(cfg, f"config.{key}={value}")
    return cfg


def _params(trainer):
    return jax.tree.leaves(jax.device_get(trainer.state.params))


def test_preempted_and_resumed_run_equals_the_uninterrupted_one(files, bert_dir, tmp_path, monkeypatch):
    straight = Trainer(_config(files, bert_dir), str(tmp_path / "straight"))
    straight.run()

    workdir = str(tmp_path / "interrupted")
    first = Trainer(_config(files, bert_dir), workdir)
    real_step = Trainer.train_step

    def preempt_at_4(self, step):
        metrics = real_step(self, step)
        if step == 3:
            os.kill(os.getpid(), 15)  # SIGTERM, as a preemption notice would send
        return metrics

    monkeypatch.setattr(Trainer, "train_step", preempt_at_4)
    result = first.run()
    assert result["after"] == {} and first.checkpoints.latest_step() == 4
    monkeypatch.undo()
    # a save killed half-way leaves a temporary folder that resuming must ignore
    os.makedirs(os.path.join(workdir, "checkpoints", "5.orbax-checkpoint-tmp-1"))
    resumed = Trainer(_config(files, bert_dir), workdir)
    resumed.run()
    assert int(resumed.state.step) == 6
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 6


@pytest.mark.parametrize("override,message", [
    ({"train.batch_size": 12}, "must divide evenly over 8 devices"),
    ({"train.topk": 10_000}, "larger than the corpus"),
    ({"data.dev_questions": "/nonexistent/dev.jsonl"}, "data.dev_questions: file not found"),
    ({"scorer.kind": "bm25"}, "scorer.kind"),
])
def test_bad_config_is_one_clear_error(files, bert_dir, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        Trainer(_config(files, bert_dir, **override), str(tmp_path / "run"))


def test_unknown_override_key_is_named():
    with pytest.raises(UserError, match="unknown config key 'config.train.stepz'"):
        apply_override(default_config(), "--config.train.stepz=3")
    with pytest.raises(UserError, match="config.train.steps: cannot parse .three. as int"):
        apply_override(default_config(), "--config.train.steps=three")


@pytest.mark.parametrize("arg,batch,topk,epochs,interval", [
    ("nq", 64, 32, 10, 500), ("webq", 16, 32, 20, 500), ("msmarco", 512, 4, 10, 500),
    ("nq,t5-xxl-lm-adapt", 32, 16, 10, 1000),
])
def test_paper_configs_carry_the_recipe(arg, batch, topk, epochs, interval):
    from art_jax.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", f"art_nq_base.py:{arg}"))
    assert (cfg.train.batch_size, cfg.train.topk, cfg.train.epochs) == (batch, topk, epochs)
    assert cfg.train.refresh_every == cfg.train.eval_every == cfg.train.checkpoint_every == interval
    assert (cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.warmup_fraction) == (2e-5, 0.1, 0.01)
    assert cfg.retriever.passage_max_length == 256 and cfg.retriever.train_passage_max_length == 512
