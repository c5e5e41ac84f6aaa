"""Pair pre-training at PAQ's scale: memory does not grow with the number of pairs.

    python benchmarks/pair_store.py --pairs 10000000 --steps 300
    python benchmarks/pair_store.py --pairs 1000000 --steps 300

Writes N synthetic pairs straight into a pair store, without tokenizing: the columns are
generated with numpy and written through ``data/build.py``'s ``RaggedWriter`` (questions of
20-60 random token ids, a positive and 0-3 hard negatives as rows of a small corpus store made
by prepare-corpus from generated text), meta.json by ``data/pairs.write_meta``. Then it builds
the ``pairs`` training method over it (a tiny random BERT: the towers are not what is measured)
and reads batches as training does, ``step_examples`` + ``tokens`` for consecutive steps at
global batch 512 (1 hard negative), and prints the anonymous memory of the process (RssAnon
in /proc/self/status; RSS would also count the pages of the memory-mapped columns, which the
kernel drops at will) at start, after opening and after the steps, and batches/s. The store
is deleted afterwards (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np


def memory() -> dict[str, float]:
    """RssAnon and RssFile of this process, MiB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
    return {name: int(value.split()[0]) / 1024 for name, value in fields.items()}


def report(label: str) -> float:
    m = memory()
    print(f"{label:<28} RssAnon {m['RssAnon']:8.1f} MiB   (RssFile {m['RssFile']:8.1f} MiB: mapped pages)", flush=True)
    return m["RssAnon"]


def make_model(folder: str):
    """A tiny random BERT and its WordPiece tokenizer, trained on generated text."""
    from art_jax.data.tokenizers import train_wordpiece
    from art_jax.models.bert import Bert, BertConfig
    from art_jax.models.hf import export, init_module

    words = [f"w{i}" for i in range(500)]
    tokenizer = train_wordpiece([" ".join(words[i:i + 20]) for i in range(0, 500, 5)], 2000)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                        max_position_embeddings=256)
    export(init_module(Bert, config, seed=0), tokenizer, folder)
    return folder


def write_corpus(path: str, passages: int, rng: np.random.Generator) -> None:
    words = np.array([f"w{i}" for i in range(500)])
    with open(path, "w") as f:
        f.write("id\ttext\ttitle\n")
        f.writelines(f"{i + 1}\t{' '.join(rng.choice(words, 40))}\tT{i}\n" for i in range(passages))


def write_pairs(folder: str, count: int, corpus_rows: int, tokenizer, rng: np.random.Generator,
                block: int = 1 << 20) -> str:
    """``count`` pairs of random tokens referring to corpus rows, written column by column."""
    from art_jax.data.build import RaggedWriter
    from art_jax.data.corpus import token_dtype

    dtype = token_dtype(len(tokenizer))
    os.makedirs(folder)
    writers = {name: RaggedWriter(folder, name, dt) for name, dt in
               (("question", dtype), ("passage", dtype), ("positive", np.int64), ("negatives", np.int64))}
    probe = "w1 w2 w3 w4 w5"
    for start in range(0, count, block):
        n = min(block, count - start)
        lengths = rng.integers(20, 61, n)
        values = rng.integers(5, len(tokenizer), int(lengths.sum()), dtype=np.int64).astype(dtype)
        ends = np.cumsum(lengths)
        values[ends - lengths] = tokenizer.cls_token_id
        values[ends - 1] = tokenizer.sep_token_id
        if start == 0:  # the first question is real text: training tokenizes it again to check the tokenizer
            first = np.asarray(tokenizer(probe)["input_ids"], dtype)
            values = np.concatenate([first, values[lengths[0]:]])
            lengths[0] = len(first)
        writers["question"].append_flat(values, lengths)
        writers["positive"].append_flat(rng.integers(0, corpus_rows, n), np.ones(n, np.int64))
        negatives = rng.integers(0, 4, n)
        writers["negatives"].append_flat(rng.integers(0, corpus_rows, int(negatives.sum())), negatives)
    for writer in writers.values():
        writer.close()
        os.remove(os.path.join(folder, f"{writer.name}.ends"))  # (what a resumable build keeps)
    return probe


def write(args) -> None:
    """The model, the corpus store and the pair store, into ``args.dir``."""
    from art_jax.data.corpus import CorpusStore, TokenizerSpec, prepare_corpus
    from art_jax.data.pairs import corpus_fingerprint, write_meta
    from art_jax.models.hf import load_tokenizer

    needed = args.pairs * (40 * 2 + 8 * 3 + 1.5 * 8) * 1.1  # questions, offsets, references
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir))).free
    if free < 2 * needed:
        raise SystemExit(f"{args.dir}: {free / 2**30:.1f} GiB free, the store needs about {needed / 2**30:.1f} GiB")
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    rng = np.random.default_rng(0)
    bert = make_model(os.path.join(args.dir, "bert"))
    tokenizer = load_tokenizer(bert)
    write_corpus(os.path.join(args.dir, "corpus.tsv"), args.corpus_passages, rng)
    corpus = prepare_corpus(os.path.join(args.dir, "corpus.tsv"), os.path.join(args.dir, "corpus"), tokenizer,
                            TokenizerSpec(bert, 256), progress=False)
    began = time.perf_counter()
    pairs = os.path.join(args.dir, "pairs")
    probe = write_pairs(pairs, args.pairs, len(corpus), tokenizer, rng)
    corpus_meta = {"path": corpus.path, "count": len(corpus), "ids": corpus.id_kind,
                   "fingerprint": corpus_fingerprint(CorpusStore(corpus.path))}
    write_meta(pairs, tokenizer, bert, sources=["synthetic"], corpus=corpus_meta,
               probe={"question": probe, "passage": None}, question_max_length=64,
               question_truncation="right", passage_max_length=256)
    size = sum(os.path.getsize(os.path.join(pairs, n)) for n in os.listdir(pairs))
    print(f"wrote {args.pairs:,} pairs in {time.perf_counter() - began:.1f}s: {size / 2**30:.2f} GiB on disk",
          flush=True)


def read(args) -> None:
    """In a process of its own: the method over the store, and its batches for ``args.steps`` steps."""
    import jax

    from art_jax.config import apply_override, default_config
    from art_jax.core.sharding import make_mesh
    from art_jax.methods.pairs import Pairs

    start = report("start (jax, art_jax imported)")
    cfg = default_config()
    for key, value in {"method": "pairs", "data.pairs": os.path.join(args.dir, "pairs"),
                       "data.corpus_store": os.path.join(args.dir, "corpus"),
                       "retriever.checkpoint": os.path.join(args.dir, "bert"), "retriever.question_max_length": 64,
                       "retriever.train_passage_max_length": 128, "train.batch_size": args.batch_size,
                       "train.hard_negatives": 1, "train.best_metric": ""}.items():
        apply_override(cfg, f"config.{key}={value}")
    Pairs.check_config(cfg)
    method = Pairs(cfg, os.path.join(args.dir, "run"), make_mesh())
    opened = report("after opening (method built)")
    pairs = method.num_examples
    epoch, indices = method.step_examples(0)
    method.tokens(indices, epoch)  # first touch
    began = time.perf_counter()
    for step in range(1, args.steps + 1):
        epoch, indices = method.step_examples(step)
        q, p = method.tokens(indices, epoch)
        if step == 10:
            report("after 10 steps")
    elapsed = time.perf_counter() - began
    assert q.ids.shape == (args.batch_size, 64) and p.ids.shape == (2 * args.batch_size, 128)
    end = report(f"after {args.steps} steps")
    print(f"{pairs:,} pairs, {jax.device_count()} device(s): {args.steps / elapsed:.1f} batches/s "
          f"({args.batch_size} pairs + {2 * args.batch_size} passages each); RssAnon: start {start:.0f} MiB, "
          f"opening +{opened - start:.1f} MiB, {args.steps} steps +{end - opened:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--corpus-passages", type=int, default=20_000)
    parser.add_argument("--dir", default="/tmp/art_jax_pair_store_benchmark")
    parser.add_argument("--keep", action="store_true", help="keep the store (default: deleted at the end)")
    parser.add_argument("--read", action="store_true", help="only read the store already in --dir (what the "
                        "benchmark runs in a fresh process after writing it)")
    args = parser.parse_args()
    if args.read:
        read(args)
        return
    try:
        write(args)
        # a fresh process: its memory is the reader's alone, not what writing the store left allocated
        subprocess.run([sys.executable, os.path.abspath(__file__), "--read", f"--dir={args.dir}",
                        f"--steps={args.steps}", f"--batch-size={args.batch_size}"], check=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
