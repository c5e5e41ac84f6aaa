"""Where art_jax writes: a local path or a URL (gs://bucket/..., or file:///... to rehearse the
URL code on local disk), through the same few operations.

Local paths use os. URLs use tf.io.gfile; object stores have no atomic folder rename and no
append, so:
- a file is written to a local temporary file, then uploaded: on GCS as one object that
  appears whole when the upload completes (TensorFlow stages it under /tmp first, so /tmp
  needs room for the largest file); elsewhere beside its destination under a hidden name,
  then renamed over it. Readers see the old file or the new one, never half of either;
- a folder is published by a marker file written last (an index version's meta.json);
- an appended file (metrics) is kept locally and uploaded whole from time to time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

from art_jax.core.errors import UserError

_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.+)$")


def is_remote(path: str) -> bool:
    return bool(_URL.match(path))


def split_url(path: str) -> tuple[str, str]:
    """(scheme, rest) of a URL."""
    match = _URL.match(path)
    return match.group(1), match.group(2)


@functools.cache
def tensorflow():
    """TensorFlow for host-side work only (seqio's engine, URL reads and writes); imported
    late, since most commands do not need it."""
    import tensorflow as tf

    # a TensorFlow that saw the GPUs would reserve their memory beside JAX (set once: TensorFlow
    # refuses to change it after its runtime started)
    tf.config.set_visible_devices([], "GPU")
    return tf


def gfile():
    return tensorflow().io.gfile


def filesystem(url: str):
    """tf.io.gfile, once it is known to handle ``url``'s scheme."""
    g = gfile()
    scheme, _ = split_url(url)
    if scheme not in g.get_registered_schemes():
        known = ", ".join(f"{s}://" for s in g.get_registered_schemes() if s)
        raise UserError(f"{url}: no filesystem for {scheme}:// here (tf.io.gfile knows {known})")
    return g


def exists(path: str) -> bool:
    return filesystem(path).exists(path) if is_remote(path) else os.path.exists(path)


def isfile(path: str) -> bool:
    if is_remote(path):
        return filesystem(path).exists(path) and not gfile().isdir(path)
    return os.path.isfile(path)


def isdir(path: str) -> bool:
    return filesystem(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Names in the folder ``path``; none when it does not exist."""
    if not isdir(path):
        return []
    names = gfile().listdir(path) if is_remote(path) else os.listdir(path)
    return [name.rstrip("/") for name in names]


def makedirs(path: str) -> None:
    if is_remote(path):
        filesystem(path).makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Delete a file; a missing one is fine."""
    if is_remote(path):
        if filesystem(path).exists(path):
            gfile().remove(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def rmtree(path: str) -> None:
    """Delete a folder and all it holds; a missing one is fine."""
    if is_remote(path):
        if filesystem(path).exists(path):
            gfile().rmtree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def read_bytes(path: str) -> bytes:
    """The file's contents; FileNotFoundError when it is missing."""
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    if not filesystem(path).exists(path):
        raise FileNotFoundError(path)
    with gfile().GFile(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private files; published results get the usual permissions
FILE_MODE = 0o666 & ~_umask()
FOLDER_MODE = 0o777 & ~_umask()


def _check_parent(path: str, label: str) -> None:
    """A local ``path`` whose nearest existing ancestor is a file could never be created."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{label}: {parent} is a file, not a folder")


def check_file_target(path: str, flag: str = "") -> None:
    """Refuse an output file that cannot be written: ``path`` is a folder, or a file stands
    where one of its folders should be (a URL has no such cases to see). ``flag`` names the
    option in the message."""
    if is_remote(path):
        return
    label = f"{flag} {path}" if flag else path
    if os.path.isdir(path):
        raise UserError(f"{label}: is a folder, expected a file")
    _check_parent(path, label)


# in a URL folder while publish_folder uploads it: a half-uploaded output, ours to replace
PUBLISHING = ".art_jax-publishing"


def check_replaceable(out: str, kind: str, is_kind: Callable[[str], bool]) -> None:
    """Refuse, before any work, an output folder ``out`` that this job must not replace or
    write into: it may be missing, an empty folder, or a folder ``is_kind`` recognises by its
    own marker files. Anything else (a checkpoint, a home folder, a file) is kept: publishing
    deletes the old folder whole. ``kind`` says what was expected, e.g. "a corpus store (no
    meta.json of a store)"."""
    if not is_remote(out):
        _check_parent(out, out)
    if not exists(out) or (isdir(out) and not listdir(out)):
        return
    if not isdir(out) or not (is_kind(out) or exists(os.path.join(out, PUBLISHING))):
        raise UserError(f"{out}: exists and is not {kind}; refusing to replace it")


@contextlib.contextmanager
def writing(path: str) -> Iterator[str]:
    """A local file to write ``path``'s new contents into; on leaving the block without an
    error it replaces ``path`` as a whole (else it is dropped and ``path`` is untouched)."""
    remote = is_remote(path)
    folder = tempfile.gettempdir() if remote else os.path.dirname(os.path.abspath(path))
    if not remote:
        check_file_target(path)
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    os.close(fd)
    try:
        yield tmp
        if remote:
            _upload(tmp, path)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _upload(local: str, url: str) -> None:
    g = filesystem(url)
    g.makedirs(os.path.dirname(url))
    if split_url(url)[0] == "gs":  # one object, created whole when its upload completes
        g.copy(local, url, overwrite=True)
        return
    # elsewhere (file://, ram://) a copy writes into the destination as it goes: copy beside it,
    # then rename (the hidden name matches no reader's pattern, e.g. TensorBoard's "tfevents")
    hidden = f"{os.path.dirname(url)}/.upload-{uuid.uuid4().hex}"
    try:
        g.copy(local, hidden, overwrite=True)
        g.rename(hidden, url, overwrite=True)
    finally:
        if g.exists(hidden):
            g.remove(hidden)


def write_bytes(path: str, data: bytes) -> None:
    with writing(path) as local, open(local, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def touch(path: str) -> None:
    """An empty file, created directly: a marker has no contents to see half of."""
    if is_remote(path):
        with filesystem(path).GFile(path, "wb") as f:
            f.write(b"")  # GFile creates the file at its first write
    else:
        open(path, "wb").close()


def upload_tree(local: str, url: str, *, last: str | None = None) -> None:
    """Copy the local folder ``local`` to ``url``; the file named ``last`` (a publish marker)
    goes after every other."""
    files = sorted(os.path.relpath(os.path.join(root, name), local)
                   for root, _, names in os.walk(local) for name in names)
    for name in sorted(files, key=lambda n: n == last):
        _upload(os.path.join(local, name), f"{url.rstrip('/')}/{name}")


def download_tree(url: str, local: str) -> None:
    """Copy the folder ``url`` (every file under it) to the local folder ``local``."""
    g = filesystem(url)
    os.makedirs(local, exist_ok=True)  # an empty folder is still a folder
    for root, _, names in g.walk(url):
        for name in names:
            source = os.path.join(root, name)  # (object stores list sub-folders as "name/")
            target = os.path.join(local, source[len(url.rstrip("/")) + 1:])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            g.copy(source, target, overwrite=True)


def publish_folder(staging: str, out: str, *, marker: str) -> None:
    """Put the finished local folder ``staging`` at ``out``, replacing what was there. Local:
    renamed into place (``staging`` is consumed); a reader sees the old folder or the new one
    (or, between two renames, none). URL: the old folder is deleted, marker first, then
    ``staging`` uploaded with the file ``marker``, by which readers know the folder is
    complete, last (``staging`` stays); a kill in between leaves no folder to take for
    complete, and a reader must not copy the folder while it is replaced."""
    if is_remote(out):
        remove(f"{out.rstrip('/')}/{marker}")  # no reader takes the old folder for complete from here on
        rmtree(out)
        # a kill from here on leaves a folder of ours that the next run may replace (check_replaceable)
        makedirs(out)
        touch(f"{out.rstrip('/')}/{PUBLISHING}")
        upload_tree(staging, out, last=marker)
        remove(f"{out.rstrip('/')}/{PUBLISHING}")
        return
    os.chmod(staging, FOLDER_MODE)  # mkdtemp made it private
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(os.path.abspath(out)))
        os.rename(out, os.path.join(old, "replaced"))
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


class AppendFile:
    """A file that grows by appends: ``write`` appends, ``flush`` makes it visible. Local: an
    ordinary append. URL: a local copy (seeded from the object) uploaded whole by ``flush``
    at most every ``upload_seconds``, and by ``close``."""

    def __init__(self, path: str, *, upload_seconds: float = 30.0, initial: bytes | None = None):
        """``initial``: the contents to start from (the existing file when None)."""
        self.path, self.upload_seconds = path, upload_seconds
        self.remote = is_remote(path)
        if self.remote:
            if initial is None:
                initial = read_bytes(path) if exists(path) else b""
            fd, self.local = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.")
            os.close(fd)
            self._uploaded = time.monotonic()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.local = path
            if initial is not None:
                write_bytes(path, initial)
        self.file = open(self.local, "ab")  # noqa: SIM115 - for the writer's life
        if self.remote:
            self.file.write(initial)
            self.flush(force=True)

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def flush(self, *, force: bool = False) -> None:
        """``force``: upload now, however recent the last upload."""
        self.file.flush()
        if self.remote and (force or time.monotonic() - self._uploaded >= self.upload_seconds):
            _upload(self.local, self.path)
            self._uploaded = time.monotonic()

    def close(self) -> None:
        self.flush(force=True)
        self.file.close()
        if self.remote:
            os.remove(self.local)
