"""`art-jax embed`: a prepared corpus through the passage tower into an index version.

Each process embeds its share of the index chunks (chunk c goes to process c mod P)
on its local devices, data parallel. Within a chunk, passages are taken in order of
length so each batch pads little; batches are dispatched asynchronously, two in
flight, so gathering the next batch's tokens on the host overlaps device compute.
Finished chunks are recorded, so a killed job rerun with the same arguments redoes
only the chunks that were not written.
"""

from __future__ import annotations

import collections
import functools

import jax
import numpy as np

from art_jax.core import storage
from art_jax.core.batching import round_up
from art_jax.core.distributed import barrier, is_lead, lead_value
from art_jax.core.errors import UserError
from art_jax.core.progress import progress_bar
from art_jax.core.sharding import batch_sharding, local_replica, make_mesh
from art_jax.data.corpus import CorpusStore
from art_jax.models.bert import Bert
from art_jax.retrieval.encoder import load_tower
from art_jax.retrieval.index import DTYPES, IndexBuilder, IndexPlan, is_index_folder, published_versions


def embed_corpus(tower: Bert, store: CorpusStore, index_dir: str, *, checkpoint: str, step: int | None = None,
                 version: int | None = None, dtype: str = "float16", max_length: int = 256,
                 chunk_rows: int = 8192, batch_size: int = 128, length_multiple: int = 32,
                 progress: bool = True) -> str:
    """Build (or resume) one index version of ``store`` and publish it; returns its folder.
    ``version`` defaults to the one after the newest published, so rerunning a killed job
    finds its own unfinished build."""
    if dtype not in DTYPES:
        raise UserError(f"embed: dtype {dtype!r} is not one of {DTYPES}")
    storage.check_replaceable(index_dir, "an index folder (no vNNNNNN version in it)", is_index_folder)
    if version is None:
        version = lead_value((published_versions(index_dir) or [-1])[-1] + 1)  # one view for all processes
    plan = IndexPlan(count=len(store), dim=tower.config.embedding_dim, dtype=dtype, chunk_rows=chunk_rows,
                     corpus=store.path, checkpoint=checkpoint, step=step, max_length=max_length)
    builder = IndexBuilder(index_dir, version, plan)
    lead = is_lead()
    if lead:
        builder.open(create=True)
    barrier("art_jax.embed.open")
    if not lead:
        builder.open(create=False)
    done = builder.done_chunks()
    mine = [c for c in range(plan.num_chunks) if c % jax.process_count() == jax.process_index()]
    todo = [c for c in mine if c not in done]
    total = sum(plan.chunk_size(c) for c in mine)
    left = sum(plan.chunk_size(c) for c in todo)
    mesh = make_mesh(devices=jax.local_devices())
    tower = local_replica(tower, mesh)  # the trainer's tower spans every process's devices
    batch_size = round_up(batch_size, mesh.shape["data"])
    with progress_bar(total=total, initial=total - left, unit="passage", desc=f"embed v{version}",
              disable=not progress) as bar:
        for chunk, embeddings in _embed_chunks(tower, store, plan, todo, mesh, batch_size, length_multiple):
            builder.write_chunk(chunk, embeddings)
            bar.update(len(embeddings))
    barrier("art_jax.embed.written")
    if lead:
        builder.publish(store.ids)
    barrier("art_jax.embed.published")
    return builder.folder


def _embed_chunks(tower, store, plan, chunks, mesh, batch_size, length_multiple):
    """Yields (chunk, embeddings in row order) as chunks complete, keeping the device busy
    across chunk boundaries."""
    sharding = batch_sharding(mesh, 2)
    on_one_cpu = mesh.size == 1 and mesh.devices.flat[0].platform == "cpu"
    in_flight = collections.deque()
    buffers = {}

    def batches():
        for chunk in chunks:
            start, stop = plan.chunk_range(chunk)
            rows = start + np.argsort(store.retriever.lengths(np.arange(start, stop)), kind="stable")
            buffers[chunk] = [np.empty((stop - start, plan.dim), plan.dtype), stop - start]
            for i in range(0, len(rows), batch_size):
                yield chunk, rows[i:i + batch_size]

    for chunk, rows in batches():
        padded = np.concatenate([rows, np.repeat(rows[:1], batch_size - len(rows))])  # fixed batch shape
        tokens = store.retriever_tokens(padded, plan.max_length, multiple=length_multiple)
        ids, mask = (jax.device_put(a, sharding) for a in (tokens.ids, tokens.mask))
        slices = batch_size // slice_rows(batch_size, ids.shape[1]) if on_one_cpu else 1
        in_flight.append((chunk, rows, _embed_as(tower, ids, mask, plan.dtype, slices)))
        if len(in_flight) > 2:
            yield from _collect(in_flight.popleft(), plan, buffers)
    while in_flight:
        yield from _collect(in_flight.popleft(), plan, buffers)


def _collect(job, plan, buffers):
    chunk, rows, result = job
    buffer = buffers[chunk]
    buffer[0][rows - plan.chunk_range(chunk)[0]] = np.asarray(result)[:len(rows)]
    buffer[1] -= len(rows)
    if buffer[1] == 0:
        yield chunk, buffers.pop(chunk)[0]


# XLA:CPU materialises every layer's attention scores for the whole batch ([B, H, L, L] float32,
# 400 MB at B = 128, L = 256) and streams them through memory several times; slices of rows of
# at most this many tokens keep each layer's intermediates in cache: 1.4x (L = 64) to 1.7x (L = 256)
# faster for all-MiniLM-L6-v2 on this CPU. Accelerators keep the whole batch.
CPU_SLICE_TOKENS = 1024


def slice_rows(batch_size: int, length: int) -> int:
    """The most rows of ``length`` tokens, at most CPU_SLICE_TOKENS in all (one at least), that
    divide the batch."""
    most = max(1, CPU_SLICE_TOKENS // length)
    return max(rows for rows in range(1, most + 1) if batch_size % rows == 0)


@functools.partial(jax.jit, static_argnames=("dtype", "slices"))
def _embed_as(tower, ids, mask, dtype, slices: int = 1):
    """[CLS] embeddings of the batch cast to ``dtype`` on device (half the bytes to bring back),
    computed ``slices`` rows-slices at a time."""
    if slices == 1:
        return tower.embed_cls(ids, mask).astype(dtype)
    rows, length = ids.shape
    cls = jax.lax.map(lambda x: tower.embed_cls(*x), (ids.reshape(slices, rows // slices, length),
                                                      mask.reshape(slices, rows // slices, length)))
    return cls.reshape(rows, -1).astype(dtype)


def load_passage_tower(spec: str, *, step: int | None = None, best: bool = False) -> tuple[Bert, int | None]:
    """The passage tower a retriever argument names (a Hugging Face checkpoint, an export folder
    or a training run; see ``retriever_kind``), replicated on this process's devices, and the max
    length it records (None when it records none)."""
    return load_tower(spec, "passage", mesh=make_mesh(devices=jax.local_devices()), step=step, best=best)
