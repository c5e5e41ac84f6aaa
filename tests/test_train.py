"""The training loop: resume after preemption gives bitwise the uninterrupted run, a
half-written checkpoint is ignored, bad configs are one clear error each."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from art_jax.config import apply_override, default_config
from art_jax.core.checkpoints import Checkpoints
from art_jax.core.errors import UserError
from art_jax.methods import make_trainer
from art_jax.models.hf import load_tokenizer
from art_jax.retrieval.index import IndexVersion, version_name
from art_jax.training.loop import Trainer


def _config(files, bert_dir, **overrides):
    cfg = default_config()
    corpus, questions = files
    settings = {"retriever.checkpoint": bert_dir, "data.corpus": corpus, "data.train_questions": questions,
                "data.dev_questions": questions, "scorer.kind": "query_likelihood", "scorer.scale": 6.0,
                "retriever.question_max_length": 16, "retriever.passage_max_length": 32,
                "retriever.train_passage_max_length": 32, "index.chunk_rows": 64, "index.progress": False,
                "train.batch_size": 8, "train.topk": 4, "train.steps": 6, "train.learning_rate": 1e-3,
                "train.refresh_every": 3, "train.checkpoint_every": 2, "train.eval_every": 100,
                "train.log_every": 100, "train.eval_topk": (1, 5), "train.best_metric": "top5",
                **overrides}
    for key, value in settings.items():
        apply_override(cfg, f"config.{key}={value}")
    return cfg


def _params(trainer):
    return jax.tree.leaves(jax.device_get(trainer.state.params))


def test_preempted_and_resumed_run_equals_the_uninterrupted_one(files, bert_dir, tmp_path, monkeypatch):
    straight = make_trainer(_config(files, bert_dir), str(tmp_path / "straight"))
    straight.run()

    workdir = str(tmp_path / "interrupted")
    first = make_trainer(_config(files, bert_dir), workdir)
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
    resumed = make_trainer(_config(files, bert_dir), workdir)
    resumed.run()
    assert int(resumed.state.step) == 6
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 6


def test_the_best_evaluation_is_kept_in_best_and_resume_goes_on_comparing_with_it(files, bert_dir, tmp_path,
                                                                                  monkeypatch):
    workdir = str(tmp_path / "run")
    # every step evaluated and checkpointed: the run's own state at the best step is on disk
    settings = {"train.eval_every": 1, "train.checkpoint_every": 1, "train.keep_checkpoints": 10,
                "train.best_metric": "top1"}
    trainer = make_trainer(_config(files, bert_dir, **settings), workdir)
    trainer.run()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    values = [row["top1"] for row in rows]
    best_step = rows[int(np.argmax(values))]["step"]  # the first of equal values: only a better one replaces it
    assert best_step < 6  # (step 4 here) so that the state compared below is not the final one
    best = Checkpoints(workdir, folder="best", read_only=True)
    assert best.steps() == [best_step]
    record = best.record(best_step)
    assert (record["metric"], record["value"], record["accuracy"]) == ("top1", max(values),
                                                                       {"top1": max(values),
                                                                        "top5": rows[best_step - 1]["top5"]})
    kept, _ = best.restore(best_step, trainer.state)
    regular, _ = Checkpoints(workdir, read_only=True).restore(best_step, trainer.state)
    assert int(kept.step) == best_step
    kept_params = jax.tree.leaves(jax.device_get(kept.params))
    for a, b in zip(kept_params, jax.tree.leaves(jax.device_get(regular.params))):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(kept_params, _params(trainer)))  # not the final state

    # resumed for two more steps: step 7 only equals the best (kept as is), step 8 beats it (replaces it)
    monkeypatch.setattr(Trainer, "evaluate",
                        lambda self, step: {"top1": max(values) + (0.1 if step == 8 else 0.0), "top5": 0.0})
    resumed = make_trainer(_config(files, bert_dir, **settings, **{"train.steps": 8}), workdir)
    assert resumed.best_value == max(values)
    saved = []
    real_save = Checkpoints.save

    def save(self, step, *args, **kwargs):
        saved.append((os.path.basename(self.directory), step))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpoints, "save", save)
    resumed.run()
    assert [step for folder, step in saved if folder == "best"] == [8]
    assert best.steps() == [8] and best.record(8)["value"] == pytest.approx(max(values) + 0.1)


@pytest.mark.parametrize("override,message", [
    ({"train.batch_size": 12}, "must divide evenly over 8 devices"),
    ({"train.topk": 10_000}, "larger than the corpus"),
    ({"data.dev_questions": "/nonexistent/dev.jsonl"}, "data.dev_questions: file not found"),
    ({"scorer.kind": "bm25"}, "scorer.kind"),
    ({"train.best_metric": "top20"}, r"train.best_metric: 'top20' is not one of top1, top5 \(top-k accuracy for k "
                                     r"in train.eval_topk\)"),
    ({"train.steps": -5}, r"train.steps=-5 is negative \(0 means: train for train.epochs\)"),
    ({"train.steps": 0, "train.epochs": 0}, "that is no step to train"),
    ({"train.eval_every": -1}, "train.eval_every=-1 is negative"),
    ({"train.checkpoint_every": 0, "train.refresh_mode": "async"}, "async needs train.checkpoint_every > 0"),
    ({"train.eval_topk": (1, 0)}, r"train.eval_topk=\(1, 0\): give at least one k, every k at least 1"),
    ({"data.train_questions": "/"}, "data.train_questions: is a folder, expected a file"),
    ({"scorer.kind": "t5"}, "holds no teacher tokens, which scorer.kind='t5' needs"),
])
def test_bad_config_is_one_clear_error_and_leaves_no_workdir(files, bert_dir, t5_v10_dir, tmp_path, override,
                                                             message):
    if override.get("scorer.kind") == "t5":  # a store prepared for a query-likelihood teacher: no T5 tokens
        store = str(tmp_path / "store")
        make_trainer(_config(files, bert_dir), str(tmp_path / "first")).checkpoints.close()
        os.rename(tmp_path / "first" / "corpus_store", store)
        override = {**override, "scorer.checkpoint": t5_v10_dir, "data.corpus_store": store}
    with pytest.raises(UserError, match=message):
        make_trainer(_config(files, bert_dir, **override), str(tmp_path / "run"))
    # nothing is left, but a corpus store prepared before the error (the rerun takes it up)
    left = sorted(os.listdir(tmp_path / "run")) if os.path.exists(tmp_path / "run") else []
    assert left == (["corpus_store"] if "larger than the corpus" in message else [])


def test_a_store_of_another_tokenizer_is_refused_before_training(files, bert_dir, tmp_path):
    import shutil

    from art_jax.data.tokenizers import train_wordpiece

    other = str(tmp_path / "other")  # the same BERT with another vocabulary
    shutil.copytree(bert_dir, other)
    tokenizer = train_wordpiece(["a zebra played the xylophone near Kyoto in 1920"], 64)
    tokenizer.save_pretrained(other)
    assert tokenizer("T0", "Ada Lovelace")["input_ids"] != load_tokenizer(bert_dir)("T0", "Ada Lovelace")["input_ids"]
    make_trainer(_config(files, other), str(tmp_path / "first")).checkpoints.close()
    with pytest.raises(UserError, match=r"data.corpus_store: .* tokens differ from retriever.checkpoint's"):
        make_trainer(_config(files, bert_dir, **{"data.corpus_store": str(tmp_path / "first" / "corpus_store")}),
                     str(tmp_path / "run"))


def test_a_cadence_of_zero_means_never(files, bert_dir, tmp_path, capsys):
    """Every `train.*_every` at 0 in one run: evaluated before and after training only, one
    checkpoint (the last step's), a progress line at the end only, one index (step 0's)."""
    workdir = tmp_path / "run"
    off = {f"train.{name}_every": 0 for name in ("eval", "checkpoint", "log", "refresh")}
    result = make_trainer(_config(files, bert_dir, **off, **{"train.steps": 4}), str(workdir)).run()
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    out = capsys.readouterr().out
    assert result["before"] and [row["step"] for row in rows if "top1" in row] == [4]
    assert Checkpoints(str(workdir), read_only=True).steps() == [4]
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["4/4"]
    assert [row["index_staleness"] for row in rows] == [0, 1, 2, 3]
    assert os.listdir(workdir / "index") == ["v000000"]


def test_a_two_dimensional_mesh_and_an_fsdp_state_train_as_the_replicated_run(files, bert_dir, tmp_path):
    """8 devices as data=4 x model=2 (batches over `data`, the index over all 8) with the train
    state split over every device (FSDP): the same losses and gradient norms as the replicated
    data=8 run, and after the refresh at step 2 (the split passage tower gathered to embed the
    corpus) the same index, to its float16 rounding. (No later step is compared: float16
    rounding of the last bits may swap near-tied passages in a top-4 of this tiny random BERT.)
    The T5 teacher split over `model` is tests/test_scorer.py's; here the trainer's is checked
    to be split over its mesh."""
    # (no dev questions: the evaluations would add nothing here; step 2's index is the run's final one)
    settings = {"train.steps": 2, "train.refresh_every": 2, "train.checkpoint_every": 0, "train.best_metric": "",
                "data.dev_questions": ""}
    plain = make_trainer(_config(files, bert_dir, **settings, **{"mesh.model": 1, "mesh.fsdp": "off"}),
                         str(tmp_path / "plain"))
    split = make_trainer(_config(files, bert_dir, **settings, **{"mesh.model": 2, "mesh.fsdp": "on"}),
                         str(tmp_path / "split"))
    assert dict(split.mesh.shape) == {"data": 4, "model": 2} and not split.layout.memory  # CPU: no figure
    # FSDP: parameters and AdamW moments split 8 ways (the moments made so, never whole on one device)
    for part in (split.state.params, split.state.opt_state):
        assert any(("data", "model") in tuple(x.sharding.spec) for x in jax.tree.leaves(part))
    assert all(x.sharding.spec == P() for x in jax.tree.leaves(plain.state))
    assert split.method.params is None  # the loaded copy let go
    plain.run(), split.run()
    assert len({shard.index[0].start for shard in split.index.index.blocks[0].addressable_shards}) == 8
    read = lambda run: [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]  # noqa: E731
    for a, b in zip(read("plain")[:2], read("split")[:2], strict=True):
        assert a["teacher_entropy"] < 1.35  # an informative teacher: not uniform over the K = 4 (log 4 = 1.386)
        for name in ("loss", "teacher_entropy", "student_entropy", "grad_norm"):
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    plain_index, split_index = (IndexVersion.open(str(tmp_path / run / "index" / version_name(1)))
                                for run in ("plain", "split"))
    np.testing.assert_allclose(split_index.read(0, split_index.count).astype(np.float32),
                               plain_index.read(0, plain_index.count).astype(np.float32), rtol=2e-3, atol=2e-3)


def test_the_trainers_t5_teacher_is_split_over_model(files, bert_dir, t5_v11_dir, tmp_path):
    trainer = make_trainer(_config(files, bert_dir, **{"scorer.kind": "t5", "scorer.checkpoint": t5_v11_dir,
                                                       "mesh.model": 2}), str(tmp_path / "run"))
    params = jax.tree.leaves(nnx.state(trainer.method.teacher.model))
    assert all(x.sharding.mesh == trainer.mesh for x in params)
    assert any("model" in tuple(x.sharding.spec) for x in params)
