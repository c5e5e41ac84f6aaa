"""One process of a 2-process x 2-CPU-device job (run by the tests).

usage: python -m tests.multiprocess_worker PORT PROCESS_ID search INDEX QUERIES.npy OUT.npz
       python -m tests.multiprocess_worker PORT PROCESS_ID embed CHECKPOINT STORE INDEX
"""

import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def search(index_dir, queries_path, out_path):
    import numpy as np

    from art_jax.core.sharding import make_mesh
    from art_jax.retrieval.index import IndexVersion
    from art_jax.retrieval.search import ShardedIndex

    index = ShardedIndex.from_version(IndexVersion.open(index_dir), make_mesh(), rows_per_device=16)
    scores, rows = index.search(np.load(queries_path), 30)
    np.savez(out_path, scores=scores, rows=rows, global_devices=jax.device_count(),
             local_devices=jax.local_device_count())


def embed(checkpoint, store, index_dir):
    from art_jax.data.corpus import CorpusStore
    from art_jax.retrieval.embed import embed_corpus, load_passage_tower

    embed_corpus(load_passage_tower(checkpoint)[0], CorpusStore(store), index_dir, checkpoint=checkpoint,
                 chunk_rows=48, batch_size=16, max_length=40, progress=False)


def main(port, process_id, job, *args):
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id),
                               initialization_timeout=120)
    {"search": search, "embed": embed}[job](*args)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
