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
from art_jax.core.errors import UserError
from art_jax.evaluation.answers import format_metrics, format_table, parse_metric


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


def is_eval_metric(name: str) -> bool:
    try:
        parse_metric(name)
        return True
    except UserError:
        return False


def tag(name: str) -> str:
    """TensorBoard groups scalars by the tag's prefix: dev metrics, step times, the rest."""
    if is_eval_metric(name):
        return f"dev/{name}"
    if name.startswith("time_"):
        return f"time/{name.removeprefix('time_')}"
    return f"train/{name}"


class MetricWriter:
    """Process 0 writes, the others only train: ``step`` once per training step,
    ``evaluation`` for one outside the steps (before training)."""

    def __init__(self, workdir: str, total_steps: int, *, start: int = 0, log_every: int = 1,
                 labels: dict[str, str] | None = None):
        """``log_every``: a progress line every that many steps (0: none but at evaluations and
        the end); ``labels``: short names for the progress line (the method's)."""
        self.total_steps, self.start, self.log_every = total_steps, start, log_every
        self.labels = labels or {}
        self.active = is_lead()
        if not self.active:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        # the interrupted run's steps past its checkpoint are redone
        kept = _rows_up_to(storage.read_bytes(path), start) if storage.isfile(path) else b""
        self.jsonl = storage.AppendFile(path, initial=kept)
        self.events = EventFile(os.path.join(workdir, "tensorboard"), start=start)
        self.started = time.perf_counter()

    def step(self, step: int, metrics: dict[str, float], evaluation: dict[str, float]) -> None:
        """One training step's metrics (whatever names the method returns) and the dev metrics
        of an evaluation after it (empty when there was none)."""
        if not self.active:
            return
        row = {"step": step, **metrics, **evaluation}
        self.jsonl.write((json.dumps(row) + "\n").encode())
        self.jsonl.flush()
        self.events.scalars(step, {tag(name): value for name, value in row.items() if name != "step"})
        if (self.log_every and step % self.log_every == 0) or evaluation or step == self.total_steps:
            print(self._line(step, metrics), flush=True)
        self._table(step, evaluation, "after training" if step == self.total_steps else "")

    def _line(self, step: int, metrics: dict[str, float]) -> str:
        eta = (time.perf_counter() - self.started) / (step - self.start) * (self.total_steps - step)
        values = " ".join(f"{self.labels.get(name, name)} {_short(value)}" for name, value in metrics.items()
                          if name != "loss" and not name.startswith("time_"))
        times = " ".join(f"{name.removeprefix('time_')} {value * 1e3:.0f}ms"
                         for name, value in metrics.items() if name.startswith("time_"))
        return f"step {step}/{self.total_steps} loss {metrics['loss']:.4f} {values} | {times} | ETA {eta:.0f}s"

    def evaluation(self, step: int, evaluation: dict[str, float], title: str) -> None:
        if self.active and evaluation:
            self.events.scalars(step, {tag(name): v for name, v in evaluation.items()})
            self._table(step, evaluation, title)

    @staticmethod
    def _table(step: int, evaluation: dict[str, float], title: str) -> None:
        if not evaluation:
            return
        kinds = {parse_metric(name) for name in evaluation}
        if all(kind == "top" for kind, _ in kinds):
            heading = f"dev top-k accuracy at step {step}"
            table = format_table({k: evaluation[f"top{k}"] for _, k in kinds})
        else:
            heading, table = f"dev metrics at step {step}", format_metrics(evaluation)
        print(heading + (f" ({title})" if title else "") + "\n" + table, flush=True)

    def sync(self) -> None:
        """Store every row written so far now (in a gs:// workdir: upload, whatever the interval)."""
        if self.active:
            self.jsonl.flush(force=True)
            self.events.sync()

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.events.close()


def _short(value: float) -> str:
    """A metric for the progress line: integers as such, else 4 significant digits."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e6 else f"{value:.4g}"


def _rows_up_to(jsonl: bytes, step: int) -> bytes:
    # a row cut short by the kill is dropped too
    lines = jsonl.decode("utf-8").splitlines(keepends=True)
    return "".join(line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step).encode()
