"""The metric writer: TensorBoard event files that TensorFlow's own reader (CRCs checked)
reads back as logged, metrics.jsonl beside them, nothing from processes other than 0."""

import json
import os

import jax
import numpy as np
import pytest

from art_jax.training.metrics import MetricWriter, crc32c, tag


def _events(workdir):
    """Every Event of WORKDIR/tensorboard/, files in name order (as TensorBoard reads them)."""
    import tensorflow as tf  # the oracle; the package never imports it

    folder = os.path.join(workdir, "tensorboard")
    return [tf.compat.v1.Event.FromString(record.numpy()) for name in sorted(os.listdir(folder))
            for record in tf.data.TFRecordDataset(os.path.join(folder, name))]


def _scalars(events):
    """{(tag, step): value} of the summaries; a (tag, step) logged twice is an error."""
    scalars = {}
    for event in events:
        for value in event.summary.value:
            assert (value.tag, event.step) not in scalars, (value.tag, event.step)
            scalars[value.tag, event.step] = value.simple_value
    return scalars


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _metrics(step):
    # values float32 cannot hold exactly, a count, a time, and a value beyond float32's range
    return {"loss": 0.1 * step, "teacher_entropy": 1.3, "student_entropy": 1.0 / 3, "argmax_agreement": 0.625,
            "grad_norm": 1e40 if step == 3 else 2.5, "learning_rate": 2e-5 * step, "skipped": 0.0,
            "time_search": 0.0123, "time_scorer": 0.5, "time_update": 0.25, "index_staleness": step - 1}


def test_crc32c_is_castagnoli():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720, B.4)


def test_tensorflow_reads_back_what_was_logged(tmp_path, capsys):
    workdir = str(tmp_path)
    writer = MetricWriter(workdir, total_steps=4, log_every=2)
    writer.evaluation(0, {"top1": 0.1, "top5": 0.3}, "before training")
    for step in range(1, 5):
        writer.step(step, _metrics(step), {"top1": 0.2, "top5": 0.7} if step in (2, 4) else {})
    writer.close()

    events = _events(workdir)
    assert events[0].file_version == "brain.Event:2"
    logged = {("dev/top1", 0): 0.1, ("dev/top5", 0): 0.3}
    for step in range(1, 5):
        logged.update({(tag(name), step): value for name, value in _metrics(step).items()})
        if step in (2, 4):
            logged.update({("dev/top1", step): 0.2, ("dev/top5", step): 0.7})
    scalars = _scalars(events)
    assert scalars.keys() == logged.keys()
    with np.errstate(over="ignore"):  # 1e40 -> inf
        for key, value in logged.items():
            assert scalars[key] == np.float32(value), key
    assert {"train/loss", "time/search", "dev/top5"} <= {name for name, _ in scalars}
    assert [row["step"] for row in _rows(workdir)] == [1, 2, 3, 4]
    assert _rows(workdir)[3] == {"step": 4, **_metrics(4), "top1": 0.2, "top5": 0.7}

    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["2/4", "4/4"]
    assert "search 12ms scorer 500ms update 250ms | ETA 0s" in out
    assert "dev top-k accuracy at step 0 (before training)" in out and "at step 4 (after training)" in out

    # TensorFlow checks the CRCs: a flipped bit in a record is refused
    import tensorflow as tf

    path = os.path.join(workdir, "tensorboard", os.listdir(os.path.join(workdir, "tensorboard"))[0])
    data = bytearray(open(path, "rb").read())
    data[-8] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(tf.errors.DataLossError, match="corrupted record"):
        _events(workdir)


def test_a_resumed_writer_appends_and_drops_the_steps_it_redoes(tmp_path):
    workdir = str(tmp_path)
    first = MetricWriter(workdir, total_steps=4)
    for step in range(1, 4):
        first.step(step, _metrics(step), {})
    first.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "lo')  # killed in the middle of a line

    resumed = MetricWriter(workdir, total_steps=4, start=2)  # the checkpoint was at step 2
    for step in (3, 4):
        resumed.step(step, _metrics(step + 10), {})
    resumed.close()
    rows = _rows(workdir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] == 0.2 and rows[2]["loss"] == pytest.approx(1.3)

    # TensorBoard's restart marker: on a second SessionLog START, at step 2, it drops the events
    # logged before it at steps >= 2
    events = _events(workdir)
    starts = [i for i, e in enumerate(events) if e.session_log.status == e.session_log.START]
    assert [events[i].step for i in starts] == [0, 2]
    assert [e.step for e in events[starts[1]:] if e.HasField("summary")] == [3, 4]
    assert [e.step for e in events[:starts[1]] if e.HasField("summary")] == [1, 2, 3]


def test_other_processes_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = MetricWriter(str(tmp_path), total_steps=1)
    writer.evaluation(0, {"top1": 0.5}, "before training")
    writer.step(1, _metrics(1), {"top1": 0.5})
    writer.close()
    assert os.listdir(tmp_path) == [] and capsys.readouterr().out == ""


def test_a_training_run_logs_the_jsonl_metrics_to_tensorboard(demo_run):
    """The shortened demo (100 steps, a line per step, dev accuracy at step 100): every
    metrics.jsonl value is in the event file at its step, and the evaluation before training at 0."""
    workdir, _ = demo_run
    rows = _rows(workdir)
    assert [row["step"] for row in rows] == list(range(1, 101))
    assert {"loss", "teacher_entropy", "student_entropy", "argmax_agreement", "grad_norm", "learning_rate",
            "skipped", "time_search", "time_scorer", "time_update", "index_staleness"} <= rows[0].keys()
    assert "top5" in rows[99] and not any("top5" in row for row in rows[:99])

    logged = {(tag(name), row["step"]): value for row in rows for name, value in row.items() if name != "step"}
    scalars = _scalars(_events(workdir))
    before = {key for key in scalars if key[1] == 0}
    assert before == {(f"dev/top{k}", 0) for k in (1, 5, 20)}  # the evaluation before training
    assert scalars.keys() - before == logged.keys()
    for key, value in logged.items():
        assert scalars[key] == np.float32(value), key
