"""One process of a 2-process x 2-CPU-device job (run by the tests).

usage: python -m tests.multiprocess_worker PORT PROCESS_ID search INDEX QUERIES.npy OUT.npz
       python -m tests.multiprocess_worker PORT PROCESS_ID embed CHECKPOINT STORE INDEX
       python -m tests.multiprocess_worker PORT PROCESS_ID read T5 ITEMS.json OUT.json
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


def read(checkpoint, items_path, out_path):
    """A reader's dev EM and F1 (``methods.reading.reading_metrics``) of the questions, passages and
    answers in ITEMS.json, each process decoding its share; process 0 writes them."""
    import json

    from art_jax.evaluation.predict import Retrieved
    from art_jax.methods.reading import reading_metrics
    from art_jax.models.hf import load_t5, load_tokenizer
    from art_jax.models.reader_folder import ReaderSettings

    with open(items_path) as f:
        items = json.load(f)
    settings = ReaderSettings(max_input_tokens=24, max_answer_tokens=4)
    metrics = reading_metrics(load_t5(checkpoint), load_tokenizer(checkpoint), settings,
                              [Retrieved(q["question"], [tuple(p) for p in q["passages"]]) for q in items],
                              [q["answers"] for q in items], topk=2, batch_size=2)
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            json.dump(metrics, f)


def main(port, process_id, job, *args):
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id),
                               initialization_timeout=120)
    {"search": search, "embed": embed, "read": read}[job](*args)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
