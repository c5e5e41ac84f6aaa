"""Outputs at a URL: the storage operations on TensorFlow's in-memory filesystem (ram://,
through tf.io.gfile like gs://), and whole jobs with file:// URLs, which run the URL code
(tf.io.gfile, no folder renames, markers written last, uploads from local staging) on
local disk, where the results can be compared with a local-path run's. Orbax is the
exception: it takes gs:// itself, and a file:// workdir's checkpoints as local paths."""

import json
import os

import numpy as np
import pytest
import tensorstore as ts

from art_jax import cli
from art_jax.core import storage
from art_jax.methods import make_trainer
from art_jax.retrieval.index import IndexVersion, _embeddings_spec
from art_jax.training.loop import Trainer
from art_jax.training.metrics import MetricWriter
from tests.test_train import _config, _params

gfile = storage.gfile()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ART_JAX_CACHE", str(tmp_path / "cache"))


_serial = iter(range(10 ** 6))


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
    """A fresh folder: a local path, or a ram:// URL (ram:// outlives a test: a new name each)."""
    return str(tmp_path / "root") if request.param == "local" else f"ram://bucket/t{next(_serial)}"


def test_files_and_folders(root):
    path = f"{root}/a/b.json"
    assert not storage.exists(path) and storage.listdir(root) == []
    storage.write_text(path, "old")
    storage.write_text(path, "new")  # replaced whole (ram:// itself would append)
    assert storage.read_text(path) == "new" and storage.isfile(path) and not storage.isdir(path)
    assert storage.isdir(f"{root}/a") and not storage.isfile(f"{root}/a")
    storage.makedirs(f"{root}/a/c")
    storage.touch(f"{root}/a/c/marker")
    assert storage.isfile(f"{root}/a/c/marker") and storage.read_bytes(f"{root}/a/c/marker") == b""
    assert sorted(storage.listdir(f"{root}/a")) == ["b.json", "c"]
    storage.remove(path)
    storage.remove(path)  # a missing file is fine
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(path)
    storage.rmtree(root)
    storage.rmtree(root)
    assert not storage.exists(root)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(root, monkeypatch):
    path = f"{root}/out.json"
    storage.write_text(path, "complete")
    with pytest.raises(RuntimeError), storage.writing(path) as local:
        with open(local, "w") as f:
            f.write("half")
        raise RuntimeError("killed while writing")
    assert storage.read_text(path) == "complete" and storage.listdir(root) == ["out.json"]

    def fail(*args, **kwargs):
        raise RuntimeError("killed while publishing")

    monkeypatch.setattr(os, "replace", fail)  # the last step: a rename locally, an upload's rename for ram://
    monkeypatch.setattr(gfile, "rename", fail)
    with pytest.raises(RuntimeError, match="publishing"):
        storage.write_text(path, "new")
    monkeypatch.undo()
    assert storage.read_text(path) == "complete" and storage.listdir(root) == ["out.json"]


def test_appends_reach_a_url_at_most_every_upload_interval_and_at_close(monkeypatch):
    url = f"ram://bucket/t{next(_serial)}/metrics.jsonl"
    storage.write_text(url, "row 0\n")
    clock = [0.0]
    monkeypatch.setattr(storage.time, "monotonic", lambda: clock[0])
    appended = storage.AppendFile(url, upload_seconds=30)  # seeded from the object
    appended.write(b"row 1\n")
    appended.flush()
    assert storage.read_text(url) == "row 0\n"  # not yet: uploads are whole files
    clock[0] = 31.0
    appended.write(b"row 2\n")
    appended.flush()
    assert storage.read_text(url) == "row 0\nrow 1\nrow 2\n"
    appended.write(b"row 3\n")
    appended.close()
    assert storage.read_text(url) == "row 0\nrow 1\nrow 2\nrow 3\n"
    restarted = storage.AppendFile(url, initial=b"row 0\n")  # a resumed run drops the redone rows
    restarted.write(b"row 1 again\n")
    restarted.close()
    assert storage.read_text(url) == "row 0\nrow 1 again\n"


def test_a_folder_is_published_with_its_marker_last(tmp_path, monkeypatch):
    url = f"ram://bucket/t{next(_serial)}/store"
    storage.write_text(f"{url}/stale.bin", "from the old store")
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    for name in ("meta.json", "a.bin", "sub/z.bin"):
        (staging / name).write_text(name)
    uploaded = []
    real_upload = storage._upload
    monkeypatch.setattr(storage, "_upload", lambda local, dest: (uploaded.append(dest), real_upload(local, dest)))
    storage.publish_folder(str(staging), url, marker="meta.json")
    assert uploaded[-1] == f"{url}/meta.json" and len(uploaded) == 3
    assert sorted(storage.listdir(url)) == ["a.bin", "meta.json", "sub"]  # the old folder is gone
    assert storage.read_text(f"{url}/sub/z.bin") == "sub/z.bin"


def test_a_gcs_index_goes_to_tensorstores_gcs_driver_under_the_names_gfile_uses():
    spec = ts.Spec(_embeddings_spec("gs://bucket/runs/n%20q/index/v000003")).to_json()
    assert spec["kvstore"] == {"driver": "gcs", "bucket": "bucket", "path": "runs/n%20q/index/v000003/embeddings/"}
    assert ts.Spec(_embeddings_spec("file:///data/index/v000000")).to_json()["kvstore"] == {
        "driver": "file", "path": "/data/index/v000000/embeddings/"}
    from art_jax.core.checkpoints import orbax_path
    from art_jax.core.errors import UserError

    with pytest.raises(UserError, match=r"ram://bucket/index/v000000: an index is written to a local path, gs://"):
        _embeddings_spec("ram://bucket/index/v000000")
    with pytest.raises(UserError, match=r"ram://bucket/run/checkpoints: checkpoints are written to a local path"):
        orbax_path("ram://bucket/run/checkpoints")
    assert orbax_path("gs://bucket/run/checkpoints") == "gs://bucket/run/checkpoints"
    assert orbax_path("file:///data/run/checkpoints") == "/data/run/checkpoints"


def test_metrics_in_a_url_workdir_resume_like_local_ones(tmp_path):
    for workdir in (str(tmp_path / "local"), f"ram://bucket/t{next(_serial)}"):
        for start, stop in ((0, 5), (3, 6)):  # killed after step 5, resumed from the checkpoint at 3
            writer = MetricWriter(workdir, 6, start=start, log_every=100)
            for step in range(start + 1, stop + 1):
                writer.step(step, {"loss": float(step), "teacher_entropy": 0.0, "student_entropy": 0.0,
                                   "argmax_agreement": 0.0, "grad_norm": 0.0, "learning_rate": 0.0,
                                   "skipped": 0.0, "index_staleness": 0}, {})
            writer.close()
        rows = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
        assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6], workdir
        events = storage.listdir(f"{workdir}/tensorboard")
        assert events and all(storage.read_bytes(f"{workdir}/tensorboard/{name}") for name in events)


def test_metrics_uploaded_at_a_checkpoint_survive_a_kill():
    """Rows reach a URL every 30 s, and at each checkpoint: a run killed (no close) keeps the
    rows up to its checkpoint, so the resumed run has every step."""
    workdir = f"ram://bucket/t{next(_serial)}"
    metrics = {"loss": 1.0, "teacher_entropy": 0.0, "student_entropy": 0.0, "argmax_agreement": 0.0,
               "grad_norm": 0.0, "learning_rate": 0.0, "skipped": 0.0, "index_staleness": 0}
    killed = MetricWriter(workdir, 6, log_every=100)
    for step in (1, 2, 3):
        killed.step(step, metrics, {})
    killed.sync()  # the trainer's checkpoint at step 3
    killed.step(4, metrics, {})  # then killed: no close
    resumed = MetricWriter(workdir, 6, start=3, log_every=100)
    for step in (4, 5, 6):
        resumed.step(step, metrics, {})
    resumed.close()
    rows = [json.loads(line)["step"] for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]


def test_a_run_in_a_url_workdir_equals_the_local_run_across_a_preemption(files, bert_dir, tmp_path, monkeypatch):
    """Config, metrics, index versions and checkpoints through the URL code; Orbax gets
    file:// as the local path it names (it takes gs:// URLs itself)."""
    straight = make_trainer(_config(files, bert_dir), str(tmp_path / "straight"))
    straight.run()

    workdir = f"file://{tmp_path / 'url'}"
    first = make_trainer(_config(files, bert_dir), workdir)
    real_step = Trainer.train_step

    def preempt_at_4(self, step):
        metrics = real_step(self, step)
        if step == 3:
            os.kill(os.getpid(), 15)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", preempt_at_4)
    first.run()
    monkeypatch.undo()
    resumed = make_trainer(_config(files, bert_dir), workdir)
    resumed.run()
    assert int(resumed.state.step) == 6
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)

    def losses(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return [(row["step"], row["loss"]) for row in map(json.loads, f)]

    assert losses(tmp_path / "url") == losses(tmp_path / "straight")
    assert sorted(os.listdir(tmp_path / "url" / "index")) == sorted(os.listdir(tmp_path / "straight" / "index"))
    assert IndexVersion.open(f"{workdir}/index").meta["step"] == 6
    assert json.load(open(tmp_path / "url" / "config.json"))["train"]["steps"] == 6
    assert sorted(os.listdir(tmp_path / "url" / "checkpoints")) == ["2", "4", "6"]


def test_the_command_chain_with_url_outputs_equals_local_paths(bert_dir, tmp_path, capsys):
    """prepare-corpus -> embed -> search -> evaluate -> export, every output a URL (ram:// for
    files and stores, file:// for the index, which tensorstore writes), against local paths."""
    from tests.test_index import _write_corpus

    corpus = _write_corpus(tmp_path / "corpus.tsv")
    questions = tmp_path / "questions.tsv"
    questions.write_text("who visited the bridge near paris\t[\"Paris\"]\nwhat did marie curie paint\t[\"castle\"]\n")
    ram = f"ram://bucket/t{next(_serial)}"
    outputs = {"local": {name: str(tmp_path / name) for name in ("store", "index", "results", "annotated", "bert")},
               "url": {"store": f"{ram}/store", "index": f"file://{tmp_path / 'url-index'}",
                       "results": f"{ram}/results.json", "annotated": f"{ram}/annotated.json",
                       "bert": f"{ram}/bert"}}
    reports = {}
    for run, out in outputs.items():
        cli.main(["prepare-corpus", "--corpus", corpus, "--retriever", bert_dir, "--out", out["store"]])
        cli.main(["embed", "--retriever", bert_dir, "--corpus", out["store"], "--out", out["index"],
                  "--chunk-rows", "50", "--batch-size", "8", "--max-length", "64"])
        cli.main(["search", "--retriever", bert_dir, "--index", out["index"], "--questions", str(questions),
                  "--topk", "5", "--out", out["results"]])
        capsys.readouterr()
        cli.main(["evaluate", "--results", out["results"], "--topk", "1", "5", "--annotated-out", out["annotated"]])
        reports[run] = capsys.readouterr().out.strip().splitlines()[-1]
        cli.main(["export", "--retriever", bert_dir, "--out", out["bert"]])
    local, url = outputs["local"], outputs["url"]
    assert reports["url"] == reports["local"]
    assert IndexVersion.open(url["index"]).meta["corpus"] == url["store"]  # recorded by its URL
    for name in ("results", "annotated"):
        assert json.loads(storage.read_text(url[name])) == json.load(open(local[name]))
    assert sorted(storage.listdir(url["store"])) == sorted(os.listdir(local["store"]))
    assert sorted(storage.listdir(url["bert"])) == sorted(os.listdir(local["bert"]))
    got, want = (IndexVersion.open(out["index"]) for out in (url, local))
    np.testing.assert_array_equal(got.read(0, got.count), want.read(0, want.count))
    np.testing.assert_array_equal(got.ids, want.ids)


def test_the_refresher_serves_a_url_workdir(files, bert_dir, tmp_path):
    """An async run in a URL workdir: the refresher reads its config, checkpoints and
    finished.json, and publishes the last checkpoint's index there with its heartbeat."""
    from art_jax.retrieval.refresh import Refresher
    from tests.test_refresh import _async_config

    workdir = f"file://{tmp_path / 'run'}"
    trainer = make_trainer(_async_config(files, bert_dir), workdir)
    trainer.run()  # no refresher yet: trains to the end on the first index
    [published] = Refresher(workdir).run(poll_seconds=0.1)  # leaves once the last checkpoint is indexed
    version = IndexVersion.open(f"{workdir}/index")
    assert version.path == published == f"{workdir}/index/v000001" and version.meta["step"] == 6
    assert json.loads(storage.read_text(f"{workdir}/refresher.json"))["state"] == "exited"
    rows = np.arange(0, len(trainer.method.store), 37)
    tokens = trainer.method.store.retriever_tokens(rows, 32, multiple=32)
    expected = np.asarray(trainer.passage_tower().embed_cls(tokens.ids, tokens.mask))
    got = np.stack([version.read(r, r + 1)[0] for r in rows]).astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-3)


def test_a_url_no_filesystem_handles_is_one_error_naming_it(tmp_path):
    from art_jax.core.errors import UserError

    with pytest.raises(UserError, match=r"s3://bucket/run/config.json: no filesystem for s3:// here .*gs://"):
        storage.write_text("s3://bucket/run/config.json", "{}")


def test_selfcheck_storage_writes_reads_back_and_deletes_a_scratch_folder(tmp_path, capsys):
    from art_jax.jobs import selfcheck

    (tmp_path / "bucket").mkdir()
    assert selfcheck.run(f"file://{tmp_path / 'bucket'}")["ok"]
    out = capsys.readouterr().out
    for check in ("file replaced whole", "metrics appended", "Hugging Face export", "index version",
                  "Orbax checkpoint"):
        assert f"storage: {check}" in out and "WRONG" not in out, out
    assert os.listdir(tmp_path / "bucket") == []  # the scratch folder is gone
    assert not any(files for _, _, files in os.walk(tmp_path / "cache"))  # and so is its cached copy
