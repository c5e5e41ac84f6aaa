"""Peak memory and time of building a BM25 index: art_jax's chunked build (art_jax.retrieval.bm25)
beside bm25s's own one-shot build (``BM25.index`` over the same tokenizer), on synthetic passages
of 100 words drawn from a Zipfian vocabulary, and both extrapolated to DPR Wikipedia's 21M.

    python benchmarks/bm25_build.py                                  # chunked at 1M and 2M, bm25s at 250k
    python benchmarks/bm25_build.py --passages 250000 500000 --bm25s 250000

Each build runs in its own process, so its peak RSS (``ru_maxrss``, which also counts the pages of
memory-mapped files the process touched) is its own; a sampling thread also records the peak of
the anonymous (heap) resident memory, what the build really needs, from /proc/self/status.
The baseline (interpreter, numpy, the synthetic vocabulary) is printed and left in both figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

WIKIPEDIA = 21_015_324
# Pyserini's Lucene index of the same corpus (prebuilt "wikipedia-dpr"): 5,345,463 unique terms
# and 1,512,973,270 tokens after analysis (72 a passage; the synthetic passages have 102)
WIKIPEDIA_TERMS = 5_345_463


def rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler(threading.Thread):
    def __init__(self, every: float = 0.05):
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, 0.0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, rss_anon_mib())
            time.sleep(self.every)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak, rss_anon_mib())


def synthetic_passages(n: int, *, vocab: int, zipf: float, words: int, seed: int = 0):
    """``n`` (title, text) pairs: ``words`` words each (2 for a title), ranks drawn from a Zipf law
    over ``vocab`` made-up words (letters only, none of them a stopword)."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"bcdfghjklmnpqrstvwxz", np.uint8)
    codes = np.stack([letters[(np.arange(vocab) // 20 ** i) % 20] for i in range(6)] + [np.full(vocab, ord("a"))], 1)
    # 7 letters, unique (base 20), ending in "a": no stopword, and stems that stay apart
    table = np.ascontiguousarray(codes.astype(np.uint8)).view("S7")[:, 0].astype(str).astype(object)
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** zipf)
    cdf /= cdf[-1]

    def gen():
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            ranks = np.minimum(np.searchsorted(cdf, rng.random((m, words + 2))), vocab - 1)
            picked = table[ranks]
            for row in picked:
                yield " ".join(row[:2]), " ".join(row[2:])
    return gen()


def vocabulary_cost(n: int) -> dict:
    """Heap bytes per word the tokenizer's vocabulary holds (word -> id, word -> stem, stem -> id)."""
    from art_jax.retrieval import bm25

    words = synthetic_passages(1, vocab=n, zipf=1.0, words=1)  # builds the table of n words
    del words
    letters = np.frombuffer(b"bcdfghjklmnpqrstvwxz", np.uint8)
    codes = np.stack([letters[(np.arange(n) // 20 ** i) % 20] for i in range(6)] + [np.full(n, ord("a"))], 1)
    table = np.ascontiguousarray(codes.astype(np.uint8)).view("S7")[:, 0].astype(str)
    texts = [" ".join(table[i:i + 1000]) for i in range(0, n, 1000)]
    del codes, table
    tokenizer = bm25.make_tokenizer()
    before = rss_anon_mib()
    for _ in tokenizer.streaming_tokenize(texts, update_vocab=True, allow_empty=False):
        pass
    grown = rss_anon_mib() - before
    return {"mode": "vocabulary", "words": n, "stems": len(tokenizer.get_vocab_dict()),
            "bytes_per_word": round(grown * 2 ** 20 / n)}


def run_one(mode: str, n: int, args) -> dict:
    from art_jax.retrieval import bm25

    if mode == "vocabulary":
        return vocabulary_cost(n)

    docs = synthetic_passages(n, vocab=args.vocab, zipf=args.zipf, words=args.words)
    baseline = rss_anon_mib()
    baseline_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    folder = tempfile.mkdtemp(prefix="bm25-bench-", dir=args.scratch)
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    if mode == "chunked":
        index = bm25.build_index(docs, os.path.join(folder, "index"), count=n, fingerprint="bench",
                                 chunk_passages=args.chunk_passages, progress=False)
        vocab, entries = index.meta["vocabulary"], index.meta["entries"]
        size = sum(os.path.getsize(os.path.join(index.folder, f)) for f in os.listdir(index.folder))
    else:  # bm25s alone: its tokenizer over the stream, then BM25.index on the whole token lists
        import bm25s

        tokenizer = bm25.make_tokenizer()
        ids = tokenizer.tokenize((f"{t} {x}" for t, x in docs), update_vocab=True, length=n, show_progress=False,
                                 allow_empty=False)
        model = bm25s.BM25(method=bm25.METHOD, k1=bm25.K1, b=bm25.B)
        model.index(bm25s.tokenization.Tokenized(ids=ids, vocab=tokenizer.get_vocab_dict()), show_progress=False)
        vocab, entries = len(tokenizer.get_vocab_dict()), len(model.scores["data"])
        model.save(os.path.join(folder, "index"), show_progress=False)
        size = sum(os.path.getsize(os.path.join(folder, "index", f)) for f in os.listdir(os.path.join(folder, "index")))
    seconds = time.perf_counter() - start
    peak_anon = sampler.stop()
    shutil.rmtree(folder, ignore_errors=True)
    return {"mode": mode, "passages": n, "seconds": round(seconds, 1),
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_anon_mib": round(peak_anon), "baseline_anon_mib": round(baseline),
            "baseline_maxrss_mib": round(baseline_max), "vocabulary": vocab, "entries": entries,
            "index_mib": round(size / 2 ** 20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, nargs="+", default=[1_000_000, 2_000_000],
                        help="corpus sizes for the chunked build")
    parser.add_argument("--bm25s", type=int, nargs="*", default=[250_000],
                        help="corpus sizes for bm25s's own build (none: skip)")
    parser.add_argument("--vocab", type=int, default=2_000_000, help="made-up words the Zipf law ranges over")
    parser.add_argument("--zipf", type=float, default=1.07, help="Zipf exponent")
    parser.add_argument("--words", type=int, default=100, help="words per passage text")
    parser.add_argument("--chunk-passages", type=int, default=1_000_000)
    parser.add_argument("--scratch", default=None, help="folder for the indexes (default: the system's temp)")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args)))
        return
    forwarded = ["--vocab", str(args.vocab), "--zipf", str(args.zipf), "--words", str(args.words),
                 "--chunk-passages", str(args.chunk_passages)] + (["--scratch", args.scratch] if args.scratch else [])
    def one(mode: str, n: int) -> dict:
        out = subprocess.run([sys.executable, __file__, "--one", mode, str(n), *forwarded], check=True,
                             capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        return json.loads(out.stdout.strip().splitlines()[-1])

    vocabulary = one("vocabulary", 1_000_000)
    per_word = vocabulary["bytes_per_word"]
    print(f"vocabulary: {per_word} heap bytes per distinct word (1,000,000 words, {vocabulary['stems']:,d} stems)")
    rows = []
    for mode, sizes in (("chunked", args.passages), ("bm25s", args.bm25s)):
        for n in sizes:
            rows.append(one(mode, n))
            r = rows[-1]
            print(f"{r['mode']:8s} {r['passages']:>10,d} passages: {r['seconds']:7.1f} s, peak RSS "
                  f"{r['ru_maxrss_mib']:6,d} MiB (ru_maxrss), heap peak {r['peak_anon_mib']:6,d} MiB "
                  f"(baseline {r['baseline_anon_mib']} MiB), vocabulary {r['vocabulary']:,d}, "
                  f"{r['entries']:,d} entries, index {r['index_mib']:,.1f} MiB", flush=True)
    for mode in ("chunked", "bm25s"):
        runs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["passages"])
        if not runs:
            continue
        # the vocabulary grows to Wikipedia's (about as many distinct words as stems: an
        # underestimate of the words by the stems' share, which the synthetic words lack)
        vocab_mib = per_word * (WIKIPEDIA_TERMS - runs[-1]["vocabulary"]) / 2 ** 20
        if len(runs) >= 2:  # the rest linear through the two largest runs
            a, b = runs[-2], runs[-1]
            grown = per_word * (b["vocabulary"] - a["vocabulary"]) / 2 ** 20
            slope = (b["ru_maxrss_mib"] - a["ru_maxrss_mib"] - grown) / (b["passages"] - a["passages"])
            heap_slope = (b["peak_anon_mib"] - a["peak_anon_mib"] - grown) / (b["passages"] - a["passages"])
            rss = b["ru_maxrss_mib"] + max(slope, 0) * (WIKIPEDIA - b["passages"]) + vocab_mib
            heap = b["peak_anon_mib"] + max(heap_slope, 0) * (WIKIPEDIA - b["passages"]) + vocab_mib
            how = (f"linear through {a['passages']:,d} and {b['passages']:,d} "
                   f"({slope * 2 ** 20:.0f} bytes a passage), vocabulary {WIKIPEDIA_TERMS:,d}")
        else:  # what is neither the baseline nor the vocabulary proportional to the corpus
            b = runs[-1]
            scale = WIKIPEDIA / b["passages"]
            held = per_word * b["vocabulary"] / 2 ** 20
            rss = b["baseline_maxrss_mib"] + (b["ru_maxrss_mib"] - b["baseline_maxrss_mib"] - held) * scale \
                + held + vocab_mib
            heap = b["baseline_anon_mib"] + (b["peak_anon_mib"] - b["baseline_anon_mib"] - held) * scale + held + vocab_mib
            how = f"proportional from {b['passages']:,d} but for the vocabulary, {WIKIPEDIA_TERMS:,d}"
        seconds = runs[-1]["seconds"] * WIKIPEDIA / runs[-1]["passages"]
        print(f"{mode:8s} extrapolated to {WIKIPEDIA:,d} passages ({how}): peak RSS {rss / 1024:.1f} GiB, heap "
              f"{heap / 1024:.1f} GiB, {seconds / 60:.0f} min, index "
              f"{runs[-1]['index_mib'] * WIKIPEDIA / runs[-1]['passages'] / 1024:.1f} GiB")


if __name__ == "__main__":
    main()
