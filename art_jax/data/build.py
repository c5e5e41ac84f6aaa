"""One output folder (a corpus store, a pair store) built in chunks by every process of a job,
staged beside where it goes, resumable, and published whole: what ``prepare-corpus`` and
``prepare-pairs`` share.

- Staging: ``.NAME.building-HOST-PID-XXXX`` beside the output (a URL's: beside its cached
  copy, kept as that copy), or in a multi-process job writing to a shared folder
  ``.NAME.building-job``, with one ``part-P`` folder per process. When the output goes to
  a URL the processes share no folder: the others' parts reach process 0 through
  ``.NAME.parts`` beside the output.
- Chunks: the builder's input is a sequence of chunks (its batches). Every process reads
  every chunk (so all meet the same bad input and stop together); chunk c is tokenized and
  written by process ``c % processes``, into its part's ragged columns (``RaggedWriter``),
  the tokenizing of one chunk overlapping the reading of the next. Process 0 merges the
  parts' columns in chunk order.
- Resume: every ``CHECKPOINT_SECONDS`` a part's columns are synced to disk and their sizes
  recorded with the chunks done (``build-state.json``). A build killed on this machine (its
  process gone) is taken up by the next build of the same output from the same input and
  options (``build-key.json`` says which): its columns are cut back to the last record and
  the chunks after it are written. Other dead builds' folders of this host are removed.
- Publish: process 0 adds its own files (meta.json last), and ``storage.publish_folder``
  renames the folder into place (a URL's is uploaded, its marker last).

A bad-input error (``UserError``) removes the staging: the input has to change, and a build
of another input cannot take it up. Any other failure (an interrupt, a full disk, a crash)
leaves it for the rerun; a kill leaves it anyway.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Self

import jax
import numpy as np

from art_jax.core import storage
from art_jax.core.distributed import barrier, is_lead
from art_jax.core.errors import UserError
from art_jax.core.remote import keep_as_copy, staging_parent

# staging folders carry the host and pid of their builder: only a build of this machine whose
# process is gone is known to be dead (a shared disk may hold other machines' live builds)
HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())
CHECKPOINT_SECONDS = 30.0  # how often a build records how far it got (tests set 0: every chunk)
KEY_FILE, STATE_FILE = "build-key.json", "build-state.json"
_ENDS = ".ends"  # NAME.ends: a column's row ends (int64) as they are appended, for resume
_COPY_ROWS = 1 << 22


# ---------------------------------------------------------------- ragged columns

class RaggedWriter:
    """Append side of a ragged column: values in ``NAME.bin``, ``close`` writes
    ``NAME.offsets.npy`` ([rows + 1] int64). Row ends also go to ``NAME.ends`` as rows are
    appended, so the column can be cut back to a ``state()`` and appended to again."""

    def __init__(self, folder: str, name: str, dtype, state: dict | None = None):
        self.folder, self.name, self.dtype = folder, name, np.dtype(dtype)
        data, ends = self._path(".bin"), self._path(_ENDS)
        if state is None:
            self.end = self.rows = 0
            self.file, self.ends = open(data, "wb"), open(ends, "wb")  # noqa: SIM115 - closed by close()
        else:  # resume: what was appended after the state is dropped
            self.end, self.rows = int(state["values"]), int(state["rows"])
            self.file, self.ends = open(data, "r+b"), open(ends, "r+b")  # noqa: SIM115 - closed by close()
            for f, size in ((self.file, self.end * self.dtype.itemsize), (self.ends, self.rows * 8)):
                f.truncate(size)
                f.seek(size)

    def _path(self, suffix: str) -> str:
        return os.path.join(self.folder, self.name + suffix)

    def append(self, rows: Sequence[Sequence[int]] | Sequence[bytes]) -> None:
        lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        if self.dtype == np.uint8:
            self.file.write(b"".join(rows))
        elif len(rows):
            self.file.write(np.concatenate([np.asarray(r, self.dtype) for r in rows]).tobytes())
        self._advance(lengths)

    def append_flat(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Rows given as their concatenation and lengths."""
        self.file.write(np.asarray(values, self.dtype).tobytes())
        self._advance(np.asarray(lengths, np.int64))

    def _advance(self, lengths: np.ndarray) -> None:
        ends = self.end + np.cumsum(lengths, dtype=np.int64)
        self.ends.write(ends.tobytes())
        self.rows += len(lengths)
        self.end = int(ends[-1]) if len(ends) else self.end

    def state(self) -> dict:
        return {"values": self.end, "rows": self.rows, "dtype": self.dtype.name}

    def sync(self) -> None:
        for f in (self.file, self.ends):
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Writes the offsets (again, when a resumed build closes a column a second time)."""
        for f in (self.file, self.ends):
            if not f.closed:
                f.close()
        offsets = np.lib.format.open_memmap(self._path(".offsets.npy"), mode="w+", dtype=np.int64,
                                            shape=(self.rows + 1,))
        offsets[0] = 0
        if self.rows:
            ends = np.memmap(self._path(_ENDS), np.int64, "r", shape=(self.rows,))
            for start in range(0, self.rows, _COPY_ROWS):
                offsets[1 + start:1 + start + _COPY_ROWS] = ends[start:start + _COPY_ROWS]
            del ends
        offsets.flush()
        del offsets


class Ragged:
    """Read side: ``data[offsets[i]:offsets[i + 1]]`` is row i; both memory-mapped."""

    def __init__(self, folder: str, name: str, dtype):
        self.offsets = np.load(os.path.join(folder, f"{name}.offsets.npy"), mmap_mode="r")
        path = os.path.join(folder, f"{name}.bin")
        # an empty file cannot be mapped; one dummy element keeps gather's indexing valid
        self.data = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(1, dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self, rows=None) -> np.ndarray:
        rows = np.arange(len(self.offsets) - 1) if rows is None else np.asarray(rows, np.int64)
        return np.asarray(self.offsets[rows + 1] - self.offsets[rows])

    def row(self, i: int) -> np.ndarray:
        return np.asarray(self.data[self.offsets[i]:self.offsets[i + 1]])

    def gather(self, rows, length: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Rows cut/padded to ``length``: values [R, length] and true lengths [R]."""
        rows = np.asarray(rows, np.int64)
        starts = np.asarray(self.offsets[rows])
        lengths = np.minimum(np.asarray(self.offsets[rows + 1]) - starts, length)
        return self._window(starts, lengths, length, pad), lengths

    def cut(self, rows, max_length: int, *, pad: int, keep: str = "start", first: int | None = None,
            last: int | None = None, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token rows re-cut to ``max_length`` as a tokenizer's truncation would have cut them
        (a row is ``[first] ... [last]``): a longer row keeps its start and ends in ``last``
        (``keep="start"``: right truncation) or keeps its end and begins with ``first``
        (``keep="end"``: left truncation). int32 values [R, width] (default ``max_length``;
        narrower only when no row is cut) padded with ``pad``, and the lengths [R]."""
        rows = np.asarray(rows, np.int64)
        starts = np.asarray(self.offsets[rows])
        full = np.asarray(self.offsets[rows + 1]) - starts
        lengths = np.minimum(full, max_length)
        cut = np.flatnonzero(full > max_length)
        if keep == "end":
            starts = starts.copy()
            starts[cut] += full[cut] - max_length
        values = self._window(starts, lengths, width or max_length, pad).astype(np.int32)
        if cut.size:  # then the width is max_length
            if keep == "end":
                values[cut, 0] = first
            else:
                values[cut, max_length - 1] = last
        return values, lengths

    def _window(self, starts: np.ndarray, lengths: np.ndarray, width: int, pad: int) -> np.ndarray:
        positions = np.arange(width)
        valid = positions[None, :] < lengths[:, None]
        return np.where(valid, self.data[np.where(valid, starts[:, None] + positions, 0)], pad)


def read_meta(path: str) -> dict | None:
    """The folder ``path``'s meta.json (a store's record of what it holds), or None when it has no
    readable one: how each store kind recognises its own folders."""
    try:
        meta = json.loads(storage.read_text(os.path.join(path, "meta.json")))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


# ---------------------------------------------------------------- the build

class Build:
    """One staged build of the folder ``out`` (a context manager)::

        with Build(out, "prepare_corpus", kind=..., is_kind=..., key=...) as build:
            title = build.writer("title", np.uint8)
            build.run(batches, tokenize, write)       # write appends to the writers
            if build.finish():                        # process 0: the merged columns are in build.staging
                ...                                   # its own files, meta.json last
                build.publish("meta.json")

    ``kind``/``is_kind``: what ``out`` may already hold (``storage.check_replaceable``);
    ``key``: what the output is made from (inputs with their sizes and times, options), JSON;
    only a staging of the same key is resumed. ``name`` names the barriers."""

    def __init__(self, out: str, name: str, *, kind: str, is_kind: Callable[[str], bool], key: dict):
        self.out, self.name = out.rstrip("/"), name
        storage.check_replaceable(self.out, kind, is_kind)
        self.processes, self.me, self.lead = jax.process_count(), jax.process_index(), is_lead()
        self.shared = self.processes > 1 and not storage.is_remote(self.out)
        base = os.path.basename(self.out)
        self.parts_url = f"{os.path.dirname(self.out)}/.{base}.parts"
        parent = staging_parent(self.out)
        key = json.loads(json.dumps({**key, "processes": self.processes}))
        if self.shared:  # one folder of the job's: process 0 keeps it only for the same build
            self.staging = os.path.join(parent, f".{base}.building-job")
            if self.lead and _read_json(os.path.join(self.staging, KEY_FILE)) != key:
                shutil.rmtree(self.staging, ignore_errors=True)
                os.makedirs(self.staging)
                _write_json(os.path.join(self.staging, KEY_FILE), key)
        else:
            key["process"] = self.me
            self.staging = _claim_staging(parent, base, key, reap=self.processes == 1)
            _write_json(os.path.join(self.staging, KEY_FILE), key)
        if self.processes > 1:
            if self.lead and not self.shared:  # a failed run's parts must not mix in
                storage.rmtree(self.parts_url)
            barrier(f"art_jax.{name}.staging")
        self.folder = self.staging if self.processes == 1 else os.path.join(self.staging, f"part-{self.me}")
        os.makedirs(self.folder, exist_ok=True)
        state = _resumable_state(self.folder)
        self.resumed = state or {"done": 0, "columns": {}, "chunks": []}
        self.done = self.resumed["done"]  # chunks before this one were handled by the build resumed
        self.chunks: list = list(self.resumed["chunks"])  # [chunk number, {column: rows}] this part wrote
        self.writers: dict[str, RaggedWriter] = {}
        self.merged: list[str] = []  # the columns written chunk by chunk (the others: process 0's own)

    # ------------------------------------------------------------------ writing
    def writer(self, name: str, dtype, *, merged: bool = True) -> RaggedWriter:
        """A column of the output. ``merged``: written by ``write`` chunk by chunk, in every
        part; else process 0's own column (written by ``every`` for every chunk), kept as it is."""
        self.writers[name] = RaggedWriter(self.folder, name, dtype, self.resumed["columns"].get(name))
        if merged:
            self.merged.append(name)
        return self.writers[name]

    def run(self, chunks: Iterable, tokenize: Callable, write: Callable,
            every: Callable[[object, bool], None] | None = None) -> int:
        """Each chunk of ``chunks`` goes, on every process, through ``every(chunk, done)``
        (``done``: written by the build this one resumed); this process's chunks that are not
        done through ``tokenize`` (in a thread, overlapping the reading of the next chunk), then
        ``write`` (in chunk order; it appends to this build's merged writers). Returns the
        number of chunks."""
        synced, count = time.monotonic(), 0
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = None
            for number, chunk in enumerate(chunks):
                count = number + 1
                done = number < self.done
                if every is not None:
                    every(chunk, done)
                if not done and number % self.processes == self.me:
                    job = (number, pool.submit(tokenize, chunk))
                    if pending is not None:
                        self._write(pending, write)
                    pending = job
                if not done and time.monotonic() - synced >= CHECKPOINT_SECONDS:
                    if pending is not None:
                        self._write(pending, write)
                        pending = None
                    self._checkpoint(count)
                    synced = time.monotonic()
            if pending is not None:
                self._write(pending, write)
        if count > self.done:
            self._checkpoint(count)
        return count

    def _write(self, job, write: Callable) -> None:
        number, future = job
        before = {name: self.writers[name].rows for name in self.merged}
        write(future.result())
        self.chunks.append([number, {name: self.writers[name].rows - rows for name, rows in before.items()}])

    def _checkpoint(self, done: int) -> None:
        for writer in self.writers.values():
            writer.sync()
        self.done = done
        _write_json(os.path.join(self.folder, STATE_FILE), {
            "done": done, "columns": {name: w.state() for name, w in self.writers.items()}, "chunks": self.chunks})

    # ------------------------------------------------------------------ finishing
    def finish(self) -> bool:
        """Closes the columns and, in a multi-process job, merges the parts: True on process 0,
        whose ``staging`` then holds every column; the others are done."""
        for writer in self.writers.values():
            writer.close()
        if self.processes > 1:
            if not self.shared and not self.lead:
                _drop_bookkeeping(self.folder, keep_state=True)
                storage.upload_tree(self.folder, f"{self.parts_url}/part-{self.me}")
            barrier(f"art_jax.{self.name}.parts")
            if not self.lead:
                return False
            if not self.shared:
                for part in range(1, self.processes):
                    storage.download_tree(f"{self.parts_url}/part-{part}", os.path.join(self.staging, f"part-{part}"))
                storage.rmtree(self.parts_url)
            for name in set(self.writers) - set(self.merged):  # process 0's own columns, kept as the output's
                for suffix in (".bin", ".offsets.npy"):
                    os.replace(os.path.join(self.folder, name + suffix), os.path.join(self.staging, name + suffix))
            self._merge()
        _drop_bookkeeping(self.staging)
        return True

    def _merge(self) -> None:
        """The parts' merged columns into ``staging`` in chunk order; the parts are removed."""
        parts = [os.path.join(self.staging, f"part-{p}") for p in range(self.processes)]
        records = sorted((number, p, rows) for p, part in enumerate(parts)
                         for number, rows in _read_json(os.path.join(part, STATE_FILE))["chunks"])
        if [r[0] for r in records] != list(range(len(records))):
            raise RuntimeError(f"{self.staging}: the parts do not hold every chunk once")
        for name in self.merged:
            _merge_column(parts, name, self.writers[name].dtype, self.staging, records)
        # the parts' memory maps closed with _merge_column's frame: NFS would keep mapped files
        for part in parts:
            shutil.rmtree(part)

    def publish(self, marker: str) -> None:
        """Process 0: ``staging`` becomes ``out``, the file ``marker`` (written last) saying it is whole."""
        storage.publish_folder(self.staging, self.out, marker=marker)
        if storage.is_remote(self.out):
            keep_as_copy(self.staging, self.out)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            if self.lead or not self.shared:
                shutil.rmtree(self.staging, ignore_errors=True)  # (published: renamed away, or a URL's copy)
            barrier(f"art_jax.{self.name}.published")
            return
        for writer in self.writers.values():
            for f in (writer.file, writer.ends):
                f.close()
        if isinstance(error, UserError):  # bad input: nothing to resume
            shutil.rmtree(self.staging if self.lead or not self.shared else self.folder, ignore_errors=True)
            if self.processes > 1 and not self.shared and self.lead:
                storage.rmtree(self.parts_url)


def _merge_column(parts: list[str], name: str, dtype, staging: str, records: list) -> None:
    sources = [Ragged(part, name, dtype) for part in parts]
    merged = RaggedWriter(staging, name, dtype)
    next_row = [0] * len(parts)
    for _, part, rows in records:
        size = rows[name]
        offsets = np.asarray(sources[part].offsets[next_row[part]:next_row[part] + size + 1])
        merged.append_flat(sources[part].data[offsets[0]:offsets[-1]], np.diff(offsets))
        next_row[part] += size
    merged.close()


# ---------------------------------------------------------------- staging folders

def _claim_staging(parent: str, name: str, key: dict, *, reap: bool) -> str:
    """A new staging folder ``.{name}.building-HOST-PID-*`` of this process, holding the
    staging of a dead build of this host with the same ``key`` when there is one (taken over
    by a rename, so two reruns cannot both take it). With ``reap`` the other dead builds'
    folders are removed (a multi-process job clears its own ``.building-job`` folder)."""
    mine = tempfile.mkdtemp(prefix=f".{name}.building-{HOST}-{os.getpid()}-", dir=parent)
    building = re.compile(rf"\.{re.escape(name)}\.building-{HOST}-(\d+)-.*")
    claimed = False
    for entry in sorted(os.listdir(parent)):
        match = building.fullmatch(entry)
        path = os.path.join(parent, entry)
        if not match or path == mine or _alive(int(match.group(1))):
            continue
        if not claimed and _read_json(os.path.join(path, KEY_FILE)) == key:
            try:
                os.rename(path, mine)  # onto our empty folder: atomic
            except OSError:  # another build took it first
                continue
            claimed = True
        elif reap:
            shutil.rmtree(path, ignore_errors=True)
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's
        return True
    return True


def _resumable_state(folder: str) -> dict | None:
    """The state a dead build recorded in ``folder``, if its columns still hold what it says;
    else None, and the folder is emptied (a build starts it afresh)."""
    state = _read_json(os.path.join(folder, STATE_FILE))
    if state is not None:
        try:
            for name, column in state["columns"].items():
                itemsize = np.dtype(column["dtype"]).itemsize
                if (os.path.getsize(os.path.join(folder, f"{name}.bin")) < column["values"] * itemsize
                        or os.path.getsize(os.path.join(folder, name + _ENDS)) < column["rows"] * 8):
                    raise ValueError(name)
            return state
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for entry in os.listdir(folder):
        if entry != KEY_FILE:
            path = os.path.join(folder, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return None


def _drop_bookkeeping(folder: str, *, keep_state: bool = False) -> None:
    """What only a build needs (the key, the resume state, the row ends) out of ``folder``."""
    for entry in os.listdir(folder):
        if entry.endswith((_ENDS, ".tmp")) or entry == KEY_FILE or (entry == STATE_FILE and not keep_state):
            os.remove(os.path.join(folder, entry))


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value) -> None:
    """Replaces ``path`` whole (a kill leaves the old file or the new one)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
