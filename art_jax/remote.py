"""Inputs that live in object storage (gs://...): a local copy, so that memory maps and the
ordinary file readers work on them.

The copy mirrors the URL under ``$ART_JAX_CACHE`` (default ~/.cache/art_jax), e.g.
gs://bucket/nq/train.qa.csv -> ~/.cache/art_jax/gs/bucket/nq/train.qa.csv, so messages that
name it still say which object they mean. It is fetched again when the object's size or
modification time changes. tf.io.gfile reads the URLs (seqio needs TensorFlow anyway).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile

from art_jax.errors import UserError

_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.+)$")


def is_remote(path: str) -> bool:
    return bool(_URL.match(path))


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("ART_JAX_CACHE", "~/.cache/art_jax"))


def local_copy(path: str) -> str:
    """``path`` itself when local; else the cached local copy of the remote file or folder."""
    match = _URL.match(path)
    if not match:
        return path
    gfile = _gfile()
    if not gfile.exists(path):
        raise UserError(f"not found: {path}")
    url = path.rstrip("/")
    target = os.path.join(cache_root(), match.group(1), match.group(2).rstrip("/"))
    stamp = json.dumps(_stamp(gfile, url))
    stamp_path = target + ".stamp"
    if os.path.exists(target) and _read(stamp_path) == stamp:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.fetching-", dir=os.path.dirname(target))
    try:
        fetched = os.path.join(staging, "copy")
        if gfile.isdir(url):
            for name, _, _ in _files(gfile, url):
                os.makedirs(os.path.dirname(os.path.join(fetched, name)), exist_ok=True)
                gfile.copy(f"{url}/{name}", os.path.join(fetched, name), overwrite=True)
            os.makedirs(fetched, exist_ok=True)  # an empty folder is still a folder
        else:
            gfile.copy(url, fetched, overwrite=True)
        _install(fetched, target, staging)
        with open(stamp_path + ".tmp", "w") as f:
            f.write(stamp)
        os.replace(stamp_path + ".tmp", stamp_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _install(fetched: str, target: str, staging: str) -> None:
    """Replace ``target`` by ``fetched``; another process of the job may be doing the same."""
    if os.path.isdir(target):
        os.rename(target, os.path.join(staging, "old"))
    elif os.path.exists(target):
        os.remove(target)
    try:
        os.replace(fetched, target)
    except OSError:  # a folder another process put there first: the same object, keep theirs
        if not os.path.isdir(target):
            raise


def _files(gfile, url: str):
    """(relative name, size, mtime) of every file under the folder ``url``."""
    for root, _, names in gfile.walk(url):
        for name in names:
            stat = gfile.stat(f"{root}/{name}")
            yield f"{root}/{name}"[len(url) + 1:], stat.length, stat.mtime_nsec


def _stamp(gfile, url: str):
    if gfile.isdir(url):
        return sorted(_files(gfile, url))
    stat = gfile.stat(url)
    return [stat.length, stat.mtime_nsec]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _gfile():
    return tensorflow().io.gfile


@functools.cache
def tensorflow():
    """TensorFlow for host-side work only (seqio's engine, gs:// reads); imported late, since
    most commands do not need it."""
    import tensorflow as tf

    # a TensorFlow that saw the GPUs would reserve their memory beside JAX (set once: TensorFlow
    # refuses to change it after its runtime started)
    tf.config.set_visible_devices([], "GPU")
    return tf
