"""The run's metrics, written by process 0 only: a progress line on stdout, one JSON line
per step in WORKDIR/metrics.jsonl and TensorBoard scalars in WORKDIR/tensorboard/ (in a
gs:// workdir both are uploaded whole every 30 s, at each checkpoint and at the end: GCS
cannot append).

The event files are encoded here (TFRecord framing around hand-written ``Event`` protocol
buffers) rather than through tensorboard or tensorflow: neither is a dependency, and
tensorflow would grab the GPU memory of the trainer it is imported into.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import numpy as np

from art_jax.core import storage
from art_jax.core.distributed import is_lead
from art_jax.evaluation.answers import format_table


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        for _ in range(8):
            byte = (byte >> 1) ^ (0x82F63B78 if byte & 1 else 0)  # Castagnoli, reflected
        table.append(byte)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    # TFRecord masks its CRCs so that a CRC of data that holds CRCs stays well distributed
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


# Protocol buffer wire format: a field is varint(number << 3 | wire type), then its payload.
def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def _message(number: int, payload: bytes) -> bytes:  # wire type 2: length-delimited
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, file_version: str = "", scalars: dict[str, float] | None = None,
          session_start: bool = False) -> bytes:
    """A serialized tensorflow ``Event`` (event.proto): wall_time = 1 (double), step = 2
    (int64), file_version = 3, summary = 5 (Summary.value = 1: tag = 1, simple_value = 2
    (float)), session_log = 7 (SessionLog.status = 1, START = 1)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version:
        out += _message(3, file_version.encode())
    if scalars:
        out += _message(5, b"".join(_message(1, _message(1, name.encode()) + b"\x15" + _float32(value))
                                    for name, value in scalars.items()))
    if session_start:
        out += _message(7, b"\x08\x01")
    return out


def _float32(value: float) -> bytes:
    # beyond float32's range: inf, as TensorFlow logs it (struct's "f" would raise instead)
    with np.errstate(over="ignore"):
        return np.float32(value).tobytes()


class EventFile:
    """An append-only TensorBoard event file; every record is flushed as written, so a kill
    loses at most the record being written (in a URL workdir: since the last upload)."""

    def __init__(self, folder: str, *, start: int = 0):
        self.path = os.path.join(folder, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        # appends: a run restarted within the same second keeps the first file
        self.file = storage.AppendFile(self.path)
        self._write(event(time.time(), 0, file_version="brain.Event:2"))
        # TensorBoard takes every SessionLog START after a run's first as a restart, and drops
        # what was logged at or after its step: the steps a resumed run redoes
        self._write(event(time.time(), start, session_start=True))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(event(time.time(), step, scalars=values))

    def _write(self, data: bytes) -> None:
        self.file.write(tfrecord(data))
        self.file.flush()

    def sync(self) -> None:
        self.file.flush(force=True)

    def close(self) -> None:
        self.file.close()


def tag(name: str) -> str:
    """TensorBoard groups scalars by the tag's prefix: dev accuracy, step times, the rest."""
    if name.startswith("top"):
        return f"dev/{name}"
    if name.startswith("time_"):
        return f"time/{name.removeprefix('time_')}"
    return f"train/{name}"


class MetricWriter:
    """Process 0 writes, the others only train: ``step`` once per training step,
    ``evaluation`` for one outside the steps (before training)."""

    def __init__(self, workdir: str, total_steps: int, *, start: int = 0, log_every: int = 1):
        self.total_steps, self.start, self.log_every = total_steps, start, log_every
        self.active = is_lead()
        if not self.active:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        # the interrupted run's steps past its checkpoint are redone
        kept = _rows_up_to(storage.read_bytes(path), start) if storage.isfile(path) else b""
        self.jsonl = storage.AppendFile(path, initial=kept)
        self.events = EventFile(os.path.join(workdir, "tensorboard"), start=start)
        self.started = time.perf_counter()

    def step(self, step: int, metrics: dict[str, float], accuracy: dict[int, float]) -> None:
        if not self.active:
            return
        row = {"step": step, **metrics, **{f"top{k}": v for k, v in accuracy.items()}}
        self.jsonl.write((json.dumps(row) + "\n").encode())
        self.jsonl.flush()
        self.events.scalars(step, {tag(name): value for name, value in row.items() if name != "step"})
        if step % self.log_every == 0 or accuracy or step == self.total_steps:
            eta = (time.perf_counter() - self.started) / (step - self.start) * (self.total_steps - step)
            times = " ".join(f"{name.removeprefix('time_')} {value * 1e3:.0f}ms"
                             for name, value in metrics.items() if name.startswith("time_"))
            print(f"step {step}/{self.total_steps} loss {metrics['loss']:.4f} "
                  f"H(teacher) {metrics['teacher_entropy']:.3f} H(student) {metrics['student_entropy']:.3f} "
                  f"agree {metrics['argmax_agreement']:.2f} |g| {metrics['grad_norm']:.3f} "
                  f"lr {metrics['learning_rate']:.2e} skipped {int(metrics['skipped'])} "
                  f"staleness {metrics['index_staleness']} | {times} | ETA {eta:.0f}s", flush=True)
        self._table(step, accuracy, "after training" if step == self.total_steps else "")

    def evaluation(self, step: int, accuracy: dict[int, float], title: str) -> None:
        if self.active and accuracy:
            self.events.scalars(step, {tag(f"top{k}"): v for k, v in accuracy.items()})
            self._table(step, accuracy, title)

    @staticmethod
    def _table(step: int, accuracy: dict[int, float], title: str) -> None:
        if accuracy:
            heading = f"dev top-k accuracy at step {step}" + (f" ({title})" if title else "")
            print(heading + "\n" + format_table(accuracy), flush=True)

    def sync(self) -> None:
        """Store every row written so far now (in a gs:// workdir: upload, whatever the interval)."""
        if self.active:
            self.jsonl.flush(force=True)
            self.events.sync()

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.events.close()


def _rows_up_to(jsonl: bytes, step: int) -> bytes:
    # a row cut short by the kill is dropped too
    lines = jsonl.decode("utf-8").splitlines(keepends=True)
    return "".join(line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step).encode()
