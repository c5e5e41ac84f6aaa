"""Exact sharded search against numpy brute force and faiss, on 1, 2 and 8 devices and
under 2 processes x 2 devices (jax.distributed on localhost, CPU collectives)."""

import faiss
import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.errors import UserError
from art_jax.core.sharding import make_mesh
from art_jax.retrieval.index import IndexBuilder, IndexPlan, IndexVersion
from art_jax.retrieval.search import ShardedIndex
from tests.multiprocess import run_two_processes


def _data(n, dim=24, batch=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), rng.standard_normal((batch, dim)).astype(np.float32)


def _brute_force(x, q, k):
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, 1), rows


def _mesh(devices, model=1):
    return make_mesh(model=model, devices=jax.devices()[:devices])


@pytest.mark.parametrize("devices", [1, 2, 8, (8, 4)])
@pytest.mark.parametrize("n,rows_per_device", [(1000, None), (1001, 40), (203, 8)])
def test_search_equals_brute_force_and_faiss(devices, n, rows_per_device):
    x, q = _data(n)
    k = 50
    # (8, 4): a 2 x 4 mesh of a teacher split over `model`, the index over all 8 devices
    mesh = _mesh(*devices) if isinstance(devices, tuple) else _mesh(devices)
    index = ShardedIndex.from_array(x, mesh, rows_per_device=rows_per_device)
    assert len({shard.index[0].start for shard in index.blocks[0].addressable_shards}) == mesh.size  # no copies
    assert index.block_rows * len(index.blocks) >= n  # padded to the mesh; several blocks when small
    scores, rows = index.search(q, k)
    want_scores, want_rows = _brute_force(x, q, k)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    faiss_scores, faiss_rows = flat.search(q, k)
    np.testing.assert_array_equal(rows, faiss_rows)
    np.testing.assert_allclose(scores, faiss_scores, rtol=1e-5, atol=1e-5)


def test_padding_rows_are_never_returned():
    # queries anti-aligned with every real row: all real scores are negative, so the zero
    # padding rows (score 0) would win if they were not masked
    x, _ = _data(37, dim=8)
    x = np.abs(x)
    q = -np.ones((3, 8), np.float32)
    index = ShardedIndex.from_array(x, _mesh(8), rows_per_device=8)
    assert index.block_rows * len(index.blocks) > 37
    _, rows = index.search(q, 37)
    assert rows.max() < 37 and all(len(set(r)) == 37 for r in rows)
    np.testing.assert_array_equal(rows, _brute_force(x, q, 37)[1])


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_low_precision_index_is_exact_on_its_own_values(dtype):
    # bf16/f16 inputs, float32 accumulation: the ranking is exact for the stored values
    x, q = _data(500, dim=32)
    x, q = x.astype(dtype), q.astype(dtype)
    _, rows = ShardedIndex.from_array(x, _mesh(8)).search(q, 20)
    want_scores, want_rows = _brute_force(x.astype(np.float32), q.astype(np.float32), 20)
    # ties are possible after rounding: compare the scores of the returned rows
    got = np.take_along_axis(q.astype(np.float64) @ x.astype(np.float64).T, rows, 1)
    np.testing.assert_allclose(got, want_scores, rtol=1e-6)
    assert (rows == want_rows).mean() > 0.95


@pytest.mark.parametrize("devices,dtype", [(1, np.float16), (8, np.float16), ((8, 4), np.float16),
                                          (8, ml_dtypes.bfloat16), (8, np.float32)])
def test_the_vectors_of_rows_are_the_stored_ones(devices, dtype):
    """``vectors``: the stored rows (any block, the last real row, repeats), bitwise in the index's
    dtype, shaped as asked and laid out by the given sharding; none asked, none given."""
    x, _ = _data(203, dim=16)
    x = x.astype(dtype)
    mesh = _mesh(*devices) if isinstance(devices, tuple) else _mesh(devices)
    index = ShardedIndex.from_array(x, mesh, rows_per_device=8)
    assert len(index.blocks) > 1
    rows = np.random.default_rng(1).integers(0, len(x), (8, 5))
    rows[0, :3] = [len(x) - 1, 0, len(x) - 1]
    by_question = NamedSharding(mesh, P("data"))
    got = index.vectors(rows, by_question)
    assert got.shape == (8, 5, 16) and got.dtype == dtype and got.sharding == by_question
    np.testing.assert_array_equal(np.asarray(got), x[rows])
    assert index.vectors(np.zeros((0, 5), np.int64), by_question).shape == (0, 5, 16)
    with pytest.raises(ValueError, match="outside the index's 203"):
        index.vectors(np.array([203]), by_question)
    with pytest.raises(ValueError, match="outside the index's 203"):
        index.vectors(np.array([2**32]), by_question)  # not wrapped to a row


def test_k_larger_than_index_is_an_error():
    x, q = _data(10)
    with pytest.raises(UserError, match="top-k 11 is larger than the index"):
        ShardedIndex.from_array(x, _mesh(2)).search(q, 11)


def _write_version(folder, x, version=0):
    plan = IndexPlan(count=len(x), dim=x.shape[1], dtype="float16", chunk_rows=64, corpus="corpus",
                     checkpoint="test")
    builder = IndexBuilder(str(folder), version, plan).open(create=True)
    for chunk in range(plan.num_chunks):
        builder.write_chunk(chunk, x[slice(*plan.chunk_range(chunk))].astype(np.float16))
    return builder.publish(np.arange(len(x)) + 100)


def test_two_processes_two_devices_each_equal_one_process(tmp_path):
    x, q = _data(301, dim=16, batch=5)
    _write_version(tmp_path / "index", x)
    version = IndexVersion.open(str(tmp_path / "index"))
    single = ShardedIndex.from_version(version, _mesh(4), rows_per_device=16).search(q, 30)
    np.save(tmp_path / "queries.npy", q)
    run_two_processes("search", str(tmp_path / "index"), str(tmp_path / "queries.npy"), str(tmp_path / "out{i}.npz"))
    for i in range(2):
        result = np.load(tmp_path / f"out{i}.npz")
        assert int(result["global_devices"]) == 4 and int(result["local_devices"]) == 2
        np.testing.assert_array_equal(result["rows"], single[1])
        np.testing.assert_allclose(result["scores"], single[0], rtol=1e-6)
    x16 = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(single[1], _brute_force(x16, q.astype(np.float16).astype(np.float32), 30)[1])
