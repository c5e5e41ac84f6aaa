"""Versioned evidence-embedding indexes on disk.

An index folder holds versions ``v000000, v000001, ...``, on local disk or at a URL
(gs://...). A version's folder holds the embeddings as a tensorstore zarr array
[count, dim] (float16 or bfloat16) written chunk by chunk, each finished chunk recorded
by a marker file, then ``ids.npy``, then ``meta.json``: written last, it publishes the
version (object stores cannot rename a folder). Readers open only versions with a
meta.json, so they never see half an index; a killed build resumes from its markers.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import time

import numpy as np
import tensorstore as ts

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.fileio import read_json

INDEX_FORMAT = 1
DTYPES = ("float16", "bfloat16")
_VERSION = re.compile(r"^v(\d{6,})$")


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """What a version will hold; a resumed build must match it exactly."""

    count: int
    dim: int
    dtype: str
    chunk_rows: int
    corpus: str  # the corpus store the rows come from (row r = store row r)
    checkpoint: str  # which retriever produced the embeddings
    step: int | None = None  # training step of that checkpoint, when known
    max_length: int = 256

    @property
    def num_chunks(self) -> int:
        return -(-self.count // self.chunk_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_rows, min(self.count, (chunk + 1) * self.chunk_rows)

    def chunk_size(self, chunk: int) -> int:
        start, stop = self.chunk_range(chunk)
        return stop - start


def version_name(version: int) -> str:
    return f"v{version:06d}"


def version_folder(index_dir: str, version: int) -> str:
    """Where ``version`` is built and, once its meta.json is written, published."""
    return os.path.join(index_dir, version_name(version))


def published_versions(index_dir: str, *, after: int = -1) -> list[int]:
    """Version numbers above ``after`` that are published, oldest first."""
    numbers = sorted(int(m.group(1)) for name in storage.listdir(index_dir) if (m := _VERSION.match(name)))
    return [v for v in numbers if v > after and storage.isfile(os.path.join(version_folder(index_dir, v), "meta.json"))]


def remove_versions_before(index_dir: str, version: int) -> None:
    """Deletes every version folder below ``version``, each unpublished first (its meta.json
    goes), so a kill half-way leaves no version that looks whole."""
    for name in storage.listdir(index_dir):
        if (m := _VERSION.match(name)) and int(m.group(1)) < version:
            folder = os.path.join(index_dir, name)
            if storage.isfile(os.path.join(folder, "meta.json")):
                storage.remove(os.path.join(folder, "meta.json"))
            storage.rmtree(folder)


def is_index_folder(path: str) -> bool:
    """Whether the folder ``path`` holds index versions (published or being built)."""
    return any(_VERSION.match(name) for name in storage.listdir(path))


def resolve_version(path: str) -> str:
    """A published version folder: ``path`` itself, or the newest version inside it."""
    if storage.isfile(os.path.join(path, "meta.json")):
        return path
    versions = published_versions(path)
    if not versions:
        raise UserError(f"{path}: no published index version (build one with art-jax embed)")
    return version_folder(path, versions[-1])


def finished_chunks(folder: str) -> set[int]:
    """The chunks of the build in ``folder`` whose markers are written."""
    return {int(name) for name in storage.listdir(os.path.join(folder, "done")) if name.isdigit()}


def _embeddings_spec(folder: str) -> dict:
    path = os.path.join(folder, "embeddings")
    if not storage.is_remote(path):
        return {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.abspath(path)}}
    # the object names spelled out, as tf.io.gfile writes the version's other files (tensorstore's
    # own URL parsing would decode %xx and stop at ? or #)
    scheme, rest = storage.split_url(path)
    if scheme == "gs":
        bucket, _, key = rest.partition("/")
        return {"driver": "zarr3", "kvstore": {"driver": "gcs", "bucket": bucket, "path": key + "/"}}
    if scheme == "file":
        return {"driver": "zarr3", "kvstore": {"driver": "file", "path": rest}}
    raise UserError(f"{folder}: an index is written to a local path, gs:// or file://, not {scheme}://")


class IndexBuilder:
    """Writes one version chunk by chunk. Several processes may share a build: each
    writes its own chunks (disjoint zarr chunks) and markers; one of them publishes."""

    def __init__(self, index_dir: str, version: int, plan: IndexPlan):
        self.index_dir, self.version, self.plan = index_dir, version, plan
        self.folder = version_folder(index_dir, version)

    def open(self, *, create: bool) -> "IndexBuilder":
        """Start the build, or continue one with the same plan (a different plan starts over).
        With ``create=False`` (processes other than the first) join the build process 0 opened."""
        if storage.isfile(os.path.join(self.folder, "meta.json")):
            raise UserError(f"{self.folder}: this index version is already published")
        plan_path = os.path.join(self.folder, "plan.json")
        if create:
            if storage.isfile(plan_path) and read_json(plan_path) != dataclasses.asdict(self.plan):
                storage.rmtree(self.folder)
            if not storage.isfile(plan_path):
                storage.rmtree(self.folder)
                storage.makedirs(os.path.join(self.folder, "done"))
                ts.open(_embeddings_spec(self.folder), create=True, dtype=getattr(ts, self.plan.dtype),
                        shape=[self.plan.count, self.plan.dim],
                        chunk_layout=ts.ChunkLayout(write_chunk_shape=[self.plan.chunk_rows, self.plan.dim])).result()
                storage.write_text(plan_path, json.dumps(dataclasses.asdict(self.plan), indent=1))
        self.array = ts.open(_embeddings_spec(self.folder)).result()
        return self

    def done_chunks(self) -> set[int]:
        return finished_chunks(self.folder)

    def write_chunk(self, chunk: int, embeddings: np.ndarray) -> None:
        """Store one chunk, then mark it done (the marker comes only after the data is durable)."""
        start, stop = self.plan.chunk_range(chunk)
        if embeddings.shape != (stop - start, self.plan.dim):
            raise ValueError(f"chunk {chunk}: embeddings {embeddings.shape}, expected {(stop - start, self.plan.dim)}")
        self.array[start:stop].write(embeddings).result()
        storage.touch(os.path.join(self.folder, "done", f"{chunk:08d}"))

    def publish(self, ids: np.ndarray) -> str:
        """Write ids, then the metadata that publishes the version."""
        missing = self.plan.num_chunks - len(self.done_chunks())
        if missing:
            raise RuntimeError(f"{self.folder}: {missing} chunk(s) not written yet; cannot publish")
        with storage.writing(os.path.join(self.folder, "ids.npy")) as local, open(local, "wb") as f:
            np.save(f, np.asarray(ids, np.int64), allow_pickle=False)
        meta = {"format": INDEX_FORMAT, **dataclasses.asdict(self.plan), "version": self.version,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        storage.write_text(os.path.join(self.folder, "meta.json"), json.dumps(meta, indent=1))
        return self.folder


@dataclasses.dataclass
class IndexVersion:
    """A published version, opened lazily: rows are read from tensorstore on demand."""

    path: str
    meta: dict
    ids: np.ndarray
    array: ts.TensorStore

    @classmethod
    def open(cls, path: str) -> "IndexVersion":
        path = resolve_version(path)
        meta = read_json(os.path.join(path, "meta.json"))
        if meta.get("format") != INDEX_FORMAT:
            raise UserError(f"{path}: index format {meta.get('format')}, expected {INDEX_FORMAT}")
        ids_path = os.path.join(path, "ids.npy")
        ids = (np.load(io.BytesIO(storage.read_bytes(ids_path))) if storage.is_remote(path) else
               np.load(ids_path, mmap_mode="r"))
        return cls(path, meta, ids, ts.open(_embeddings_spec(path), open=True).result())

    @property
    def count(self) -> int:
        return self.meta["count"]

    @property
    def dim(self) -> int:
        return self.meta["dim"]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop), zero rows past the end (the padding of the last shard)."""
        out = np.zeros((stop - start, self.dim), self.array.dtype.numpy_dtype)
        real = max(0, min(stop, self.count) - start)
        if real:
            out[:real] = self.array[start:start + real].read().result()
        return out
