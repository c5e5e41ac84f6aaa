"""Inputs that live in object storage (gs://...): a local copy, so that memory maps and the
ordinary file readers work on them; and the local staging of folders written there, which
becomes the writer's copy.

The copy mirrors the URL under ``$ART_JAX_CACHE`` (default ~/.cache/art_jax), e.g.
gs://bucket/nq/train.qa.csv -> ~/.cache/art_jax/gs/bucket/nq/train.qa.csv, so messages that
name it still say which object they mean. It is fetched again when the object's size or
modification time changes. tf.io.gfile reads the URLs (seqio needs TensorFlow anyway).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from art_jax.core.errors import UserError
from art_jax.core.storage import download_tree, filesystem, is_remote, read_text, split_url, write_text


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("ART_JAX_CACHE", "~/.cache/art_jax"))


def _cache_path(url: str) -> str:
    scheme, rest = split_url(url)
    return os.path.join(cache_root(), scheme, rest.strip("/"))  # (file:///x: rest is absolute)


def staging_parent(out: str) -> str:
    """Where to build the output ``out`` before publishing it: beside it when local (renamed
    into place), else beside its cached copy (kept as that copy by ``keep_as_copy``)."""
    parent = os.path.dirname(os.path.abspath(out) if not is_remote(out) else _cache_path(out))
    os.makedirs(parent, exist_ok=True)
    return parent


def keep_as_copy(folder: str, url: str) -> None:
    """Make the local ``folder``, just uploaded to ``url``, the cached copy of ``url``: the
    writer need not fetch back what it wrote."""
    target = _cache_path(url)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.keeping-", dir=os.path.dirname(target))
    try:
        _install(folder, target, staging)
        write_text(target + ".stamp", json.dumps(_stamp(filesystem(url), url.rstrip("/"))))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def drop_copy(url: str) -> None:
    """Forget the cached copy of ``url`` (a scratch object that is gone)."""
    target = _cache_path(url)
    shutil.rmtree(target, ignore_errors=True)
    for leftover in (target, target + ".stamp"):
        if os.path.isfile(leftover):
            os.remove(leftover)


def local_copy(path: str) -> str:
    """``path`` itself when local; else the cached local copy of the remote file or folder."""
    if not is_remote(path):
        return path
    gfile = filesystem(path)
    if not gfile.exists(path):
        raise UserError(f"not found: {path}")
    url = path.rstrip("/")
    target = _cache_path(url)
    stamp = json.dumps(_stamp(gfile, url))
    stamp_path = target + ".stamp"
    if os.path.exists(target) and os.path.isfile(stamp_path) and read_text(stamp_path) == stamp:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.fetching-", dir=os.path.dirname(target))
    try:
        fetched = os.path.join(staging, "copy")
        if gfile.isdir(url):
            download_tree(url, fetched)
        else:
            gfile.copy(url, fetched, overwrite=True)
        _install(fetched, target, staging)
        write_text(stamp_path, stamp)
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
            stat = gfile.stat(os.path.join(root, name))
            yield os.path.join(root, name)[len(url) + 1:], stat.length, stat.mtime_nsec


def _stamp(gfile, url: str):
    if gfile.isdir(url):
        return sorted(_files(gfile, url))
    stat = gfile.stat(url)
    return [stat.length, stat.mtime_nsec]

