"""Exact top-K search: art_jax's sharded search vs faiss-cpu IndexFlatIP on the same
random data in one process, beside the bare matmul of the same shapes and the floor
max(bytes read / measured bandwidth, FLOPs / measured matmul peak).

    python benchmarks/search.py                          # N=1M, d=768, B=64, K=100; float32 and bfloat16
    python benchmarks/search.py --scaling 250000 500000 1000000 2000000

The matmul peak is measured on a square matmul of the index dtype; bandwidth on a
reduction over an array of the index's size. ``--scaling`` prints the time per N (linear
means a flat ns/row column) and the compiled scratch memory of one block step, which
depends on B x rows-per-device only. On a GPU it also prints the achieved bandwidth
against a measured device copy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from art_jax.core.sharding import make_mesh  # noqa: E402
from art_jax.retrieval import search as search_module  # noqa: E402
from art_jax.retrieval.search import ShardedIndex  # noqa: E402


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def random_data(n: int, dim: int, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 1 << 18):  # in pieces: the generator's temporaries stay small
        x[start:start + (1 << 18)] = rng.standard_normal((min(1 << 18, n - start), dim), np.float32)
    return x, rng.standard_normal((batch, dim)).astype(np.float32)


def matmul_peak(dtype, repeats: int) -> float:
    """FLOP/s of a 2048^3 matmul in ``dtype`` with float32 accumulation."""
    a = jnp.ones((2048, 2048), dtype)
    f = jax.jit(lambda a: lax.dot(a, a, preferred_element_type=jnp.float32))
    return 2 * 2048 ** 3 / best_time(lambda: f(a), repeats)


def read_bandwidth(array: jax.Array, repeats: int) -> float:
    """Bytes/s of a reduction that reads every element once."""
    f = jax.jit(lambda x: jnp.sum(x, axis=0, dtype=jnp.float32))
    return array.nbytes / best_time(lambda: f(array), repeats)


def copy_bandwidth(array: jax.Array, repeats: int) -> float:
    """Bytes/s moved by a device copy (read + write)."""
    f = jax.jit(lambda x: x + jnp.ones((), x.dtype))
    return 2 * array.nbytes / best_time(lambda: f(array), repeats)


def block_scratch_bytes(index: ShardedIndex, batch: int, k: int) -> int:
    """Compiled temporary memory of one block step (per device)."""
    step = search_module._block_step(index.mesh, k, False)
    q = jnp.zeros((batch, index.blocks[0].shape[1]), index.dtype)
    best = search_module._empty_candidates(index.mesh, batch, k)()
    compiled = step.lower(q, index.blocks[0], *best, np.int32(0), np.int32(index.count)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def compare(x, q, k, dtype_name, repeats, rows_per_device, faiss_time):
    dtype = jnp.dtype(dtype_name)
    mesh = make_mesh()
    index = ShardedIndex.from_array(x.astype(dtype), mesh, rows_per_device=rows_per_device)
    ours = best_time(lambda: index.search(q, k), repeats)
    flat = jax.device_put(x.astype(dtype))
    qd = jnp.asarray(q, dtype)
    bare = jax.jit(lambda q, x: lax.dot_general(q, x, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    matmul = best_time(lambda: bare(qd, flat), repeats)
    peak = matmul_peak(dtype, repeats)
    bandwidth = read_bandwidth(flat, repeats)
    flops = 2 * x.shape[0] * x.shape[1] * len(q)
    floor = max(flat.nbytes / bandwidth, flops / peak)
    print(f"{dtype_name:>8}: art_jax {ours * 1e3:8.1f} ms | faiss IndexFlatIP (float32) {faiss_time * 1e3:8.1f} ms"
          f" -> {faiss_time / ours:5.2f}x faiss")
    print(f"{'':>8}  bare matmul {matmul * 1e3:8.1f} ms -> search adds {100 * (ours / matmul - 1):+5.1f}% "
          f"(top-k, merging, sharding, padding)")
    print(f"{'':>8}  floor {floor * 1e3:8.1f} ms = max({flat.nbytes / 1e9:.2f} GB / {bandwidth / 1e9:.1f} GB/s, "
          f"{flops / 1e9:.1f} GFLOP / {peak / 1e12:.2f} TFLOP/s) -> art_jax at {100 * floor / ours:4.1f}% of it")
    if jax.default_backend() == "gpu":
        copy = copy_bandwidth(flat, repeats)
        print(f"{'':>8}  achieved {flat.nbytes / ours / 1e9:.0f} GB/s vs device copy {copy / 1e9:.0f} GB/s "
              f"({100 * flat.nbytes / ours / copy:.0f}%)")
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows-per-device", type=int, help="block size (default: the library's)")
    parser.add_argument("--scaling", type=int, nargs="*", help="time vs these N instead of the comparison")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s); "
          f"d={args.dim} B={args.batch} K={args.k}")

    if args.scaling:
        for dtype_name in args.dtypes:
            for n in args.scaling:
                x, q = random_data(n, args.dim, args.batch)
                index = ShardedIndex.from_array(x.astype(dtype_name, copy=False), make_mesh(),
                                               rows_per_device=args.rows_per_device)
                del x
                t = best_time(lambda: index.search(q, args.k), args.repeats)
                print(f"{dtype_name:>8} N={n:>9,}: {t * 1e3:8.1f} ms  {t / n * 1e9:6.2f} ns/row  "
                      f"{len(index.blocks)} block(s) of {index.block_rows:,} rows; "
                      f"scratch per block step {block_scratch_bytes(index, args.batch, args.k) / 2**20:.1f} MiB")
                del index
        return

    import faiss

    x, q = random_data(args.n, args.dim, args.batch)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    faiss_time = best_time(lambda: flat.search(q, args.k), args.repeats)
    want = flat.search(q, args.k)[1]
    for dtype_name in args.dtypes:
        index = compare(x, q, args.k, dtype_name, args.repeats, args.rows_per_device, faiss_time)
        if dtype_name == "float32":
            agree = np.mean(index.search(q, args.k)[1] == want)
            print(f"{'':>8}  same top-{args.k} rows as faiss: {100 * agree:.2f}%")


if __name__ == "__main__":
    main()
