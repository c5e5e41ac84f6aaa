"""`art-jax selfcheck`: prove an install works, offline, in well under a minute.

Builds tiny random BERT and T5 checkpoints with their own tokenizers, writes them as
Hugging Face folders, loads them back through the real loaders, then embeds, searches
by inner product and scores with the ART teacher prompt on every local device.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid

import jax
import numpy as np

from art_jax.core.sharding import make_mesh
from art_jax.data.tokenizers import train_unigram, train_wordpiece
from art_jax.models.bert import Bert, BertConfig
from art_jax.models.hf import export, init_module
from art_jax.models.t5 import T5, T5Config
from art_jax.retrieval.encoder import DualEncoder
from art_jax.teachers.t5 import T5Scorer

PASSAGES = [
    ("Aurora Station", "Aurora Station is a research base on the ice shelf, founded in 1961 by glaciologists."),
    ("Copper Vale", "Copper Vale is a mining town whose river turns green every spring."),
    ("Lumen Orchestra", "The Lumen Orchestra plays only music written by its own percussionists."),
    ("Tessel Bridge", "Tessel Bridge crosses the Marrow estuary and opened to trains in 1894."),
]
QUESTIONS = ["who founded aurora station?", "which river turns green?", "when did tessel bridge open?",
             "what music does the lumen orchestra play?"]


def run(storage_url: str | None = None) -> dict:
    """``storage_url``: also check that outputs can be written there (``check_storage``)."""
    start = time.perf_counter()
    texts = [f"{t} {x}" for t, x in PASSAGES] + QUESTIONS
    mesh = make_mesh()
    print(f"art_jax selfcheck: jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s)")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_wordpiece(texts, 200)
        cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64, max_position_embeddings=128)
        bert_dir = export(init_module(Bert, cfg, seed=0), tokenizer, os.path.join(tmp, "bert"))
        t5_cfg = T5Config(vocab_size=len(t5_tokenizer := train_unigram(texts, 120)), d_model=32, d_kv=8,
                          d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, gated=True,
                          activation="gelu_new", untied_lm_head=True, scale_decoder_outputs=False)
        t5_dir = export(init_module(T5, t5_cfg, seed=1), t5_tokenizer, os.path.join(tmp, "t5"))
        encoder = DualEncoder.from_pretrained(bert_dir, mesh=mesh)
        scorer = T5Scorer.from_pretrained(t5_dir, mesh=mesh)
    titles, bodies = zip(*PASSAGES)
    q = np.asarray(encoder.embed_questions(QUESTIONS))
    p = np.asarray(encoder.embed_passages(titles, bodies))
    stored = check_storage(storage_url, encoder, p) if storage_url else True
    top = np.argsort(-(q @ p.T), axis=1)[:, 0]
    scores = scorer.score([titles[i] for i in top], [bodies[i] for i in top], QUESTIONS)
    for question, i, s in zip(QUESTIONS, top, scores):
        print(f"  {question!r:45} -> {titles[i]!r:18} teacher log-prob {s:7.3f}")
    ok = bool(np.all(np.isfinite(scores)) and np.all(scores < 0) and q.shape == (len(QUESTIONS), 32) and stored)
    print(f"selfcheck {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.1f}s "
          "(random tiny models: the pairings are arbitrary, the plumbing is real)")
    return {"ok": ok, "scores": scores}


def check_storage(url: str, encoder: DualEncoder, embeddings: np.ndarray) -> bool:
    """Write into a scratch folder under ``url`` what a run writes (a file replaced whole,
    appended metrics, a Hugging Face export, an index version, an Orbax checkpoint), read
    each back, compare, and delete the folder: bucket access and permissions, checked in
    seconds rather than at a long run's first save."""
    from art_jax.core import storage
    from art_jax.core.checkpoints import Checkpoints
    from art_jax.core.remote import drop_copy
    from art_jax.retrieval.index import IndexBuilder, IndexPlan, IndexVersion

    scratch = f"{url.rstrip('/')}/art_jax-selfcheck-{uuid.uuid4().hex[:8]}"
    print(f"  storage: writing {scratch}")
    checks = {}
    try:
        storage.write_text(f"{scratch}/config.json", '{"a": 1}')
        storage.write_text(f"{scratch}/config.json", '{"a": 2}')
        checks["file replaced whole"] = storage.read_text(f"{scratch}/config.json") == '{"a": 2}'

        rows = storage.AppendFile(f"{scratch}/metrics.jsonl")
        for step in (1, 2):
            rows.write(f'{{"step": {step}}}\n'.encode())
        rows.close()
        checks["metrics appended"] = storage.read_text(f"{scratch}/metrics.jsonl").count("step") == 2

        export(encoder.passage, encoder.tokenizer, f"{scratch}/bert")
        reloaded = DualEncoder.from_pretrained(f"{scratch}/bert")
        again = np.asarray(reloaded.embed_passages(*zip(*PASSAGES)))
        checks["Hugging Face export"] = bool(np.allclose(again, embeddings, atol=1e-5))

        plan = IndexPlan(count=len(embeddings), dim=embeddings.shape[1], dtype="float16", chunk_rows=2,
                         corpus="selfcheck", checkpoint=f"{scratch}/bert")
        builder = IndexBuilder(f"{scratch}/index", 0, plan).open(create=True)
        for chunk in range(plan.num_chunks):
            builder.write_chunk(chunk, embeddings[slice(*plan.chunk_range(chunk))].astype(np.float16))
        builder.publish(np.arange(len(embeddings)))
        index = IndexVersion.open(f"{scratch}/index")
        checks["index version"] = bool(np.array_equal(index.read(0, index.count),
                                                      embeddings.astype(np.float16)))

        checkpoints = Checkpoints(scratch, every=1, keep=1)
        state = {"w": jax.numpy.asarray(embeddings)}
        checkpoints.save(1, state, {"step": 1}, force=True)
        checkpoints.close()
        restored, record = Checkpoints(scratch, read_only=True).restore(1, state)
        checks["Orbax checkpoint"] = bool(np.array_equal(restored["w"], embeddings)) and record["step"] == 1
    finally:
        storage.rmtree(scratch)
        drop_copy(f"{scratch}/bert")
    for name, passed in checks.items():
        print(f"  storage: {name:22} {'ok' if passed else 'WRONG'}")
    return len(checks) == 5 and all(checks.values())
