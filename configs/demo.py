"""The embedded default: ART on a generated world, offline, in minutes on 2 CPU cores.

`art-jax train --config=configs/demo.py --workdir=/tmp/art-demo` generates a small
corpus of made-up entities with questions and answers, a WordPiece tokenizer and a tiny
random BERT, and trains it with a Dirichlet query-likelihood teacher (no weights).
"""

from art_jax.config import demo_config


def get_config(arg=None):
    cfg = demo_config()
    cfg.scorer.kind = "query_likelihood"
    cfg.scorer.scale = 20.0  # the mean over ~10 question tokens becomes a sum, and sharper: a decisive teacher
    cfg.train.topk = 32
    cfg.train.steps = 400
    cfg.train.refresh_every = 25
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 100
    if arg == "smoke":  # a quick look: a few steps
        cfg.train.steps = 10
        cfg.train.refresh_every = 5
        cfg.train.eval_every = 10
    return cfg
