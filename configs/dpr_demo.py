"""Supervised DPR on the generated world of the ART demo, offline, in about a minute on 2 CPU cores.

`art-jax train --config=configs/dpr_demo.py --workdir=/tmp/dpr-demo` generates the world
(corpus, questions with answers), mines its training examples with BM25 as `art-jax mine`
does (positive: the best-ranked passage holding an answer; hard negative: the best-ranked
one without) into WORKDIR/demo/train-bm25.json, and trains a tiny random BERT on them with
DPR's loss over the whole batch.
"""

from art_jax.config import demo_config
from art_jax.core.errors import UserError


def get_config(arg=None):
    if arg not in (None, "smoke"):
        raise UserError(f"configs/dpr_demo.py: unknown {arg!r}; smoke, or none")
    cfg = demo_config()
    cfg.method = "dpr"
    cfg.train.hard_negatives = 1
    cfg.train.steps = 150
    cfg.train.eval_every = cfg.train.checkpoint_every = 50
    if arg == "smoke":  # a quick look: a few steps
        cfg.train.steps = cfg.train.eval_every = 10
    return cfg
