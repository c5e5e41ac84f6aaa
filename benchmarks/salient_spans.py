"""Tagging time of `art-jax prepare-salient-spans` (spaCy's small English pipeline, NER only, and the
date pattern) on Wikipedia-sized passages, as 1 process and as P processes of one job
(launch/local.sh), and what that makes of DPR Wikipedia's 21M passages.

    python benchmarks/salient_spans.py                       # 2000 passages, 1 and 2 processes
    python benchmarks/salient_spans.py --passages 5000 --processes 1 2 4

The passages are the demo world's sentences (made-up people, places and years: a named entity or
date in every sentence, as Wikipedia's are dense with them) drawn into passages of about 100 words,
DPR's passage length. Each run is its own process group; its wall time includes start-up, and the
store's meta.json records each process's own tagging rate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WIKIPEDIA = 21_015_324


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from art_jax.data.demo_world import make_world
    from art_jax.data.tokenizers import train_wordpiece

    world = make_world(seed=0, entities=2000, restate=True)
    sentences = [s.strip() + "." for _, _, text in world.passages for s in text.split(". ") if s.strip(". ")]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as scratch:
        corpus = os.path.join(scratch, "corpus.jsonl")
        words = 0
        with open(corpus, "w") as f:
            for i in range(args.passages):
                passage = []
                while sum(len(s.split()) for s in passage) < 100:
                    passage.append(rng.choice(sentences))
                words += sum(len(s.split()) for s in passage)
                f.write(json.dumps({"id": i + 1, "title": f"P{i}", "text": " ".join(passage)}) + "\n")
        bert = os.path.join(scratch, "bert")
        train_wordpiece(sentences[:5000], 2000).save_pretrained(bert)
        store = os.path.join(scratch, "store")
        subprocess.run([sys.executable, "-m", "art_jax", "prepare-corpus", "--corpus", corpus, "--retriever", bert,
                        "--out", store], check=True, capture_output=True, cwd=ROOT)
        print(f"{args.passages} passages of {words / args.passages:.0f} words")
        for processes in args.processes:
            out = os.path.join(scratch, f"spans{processes}")
            command = ["prepare-salient-spans", "--corpus", store, "--out", out, "--chunk-passages", "100"]
            env = dict(os.environ, ART_JAX=f"{sys.executable} -m art_jax", ART_JAX_LOCAL_DEVICES="1")
            start = time.perf_counter()
            subprocess.run([os.path.join(ROOT, "launch", "local.sh"), str(processes), *command] if processes > 1
                           else [sys.executable, "-m", "art_jax", *command], check=True, capture_output=True,
                           cwd=ROOT, env=env)
            wall = time.perf_counter() - start
            with open(os.path.join(out, "meta.json")) as f:
                meta = json.load(f)
            rate = meta["passages_per_second_per_process"]
            print(f"{processes} process(es): {wall:.1f} s wall ({args.passages / wall:.0f} passages/s), "
                  f"{rate:.0f} passages/s per process tagging, {meta['examples']} examples; "
                  f"21M passages: {WIKIPEDIA / rate / processes / 3600:.1f} h at this rate")


if __name__ == "__main__":
    main()
