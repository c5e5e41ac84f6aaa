"""The embedded default: ART on a generated world, offline, in minutes on 2 CPU cores.

`art-jax train --config=configs/demo.py --workdir=/tmp/art-demo` generates a small
corpus of made-up entities with questions and answers, a WordPiece tokenizer and a tiny
random BERT, and trains it with a Dirichlet query-likelihood teacher (no weights).
"""

from art_jax.config import art_demo_config
from art_jax.core.errors import UserError


def get_config(arg=None):
    if arg not in (None, "smoke"):
        raise UserError(f"configs/demo.py: unknown {arg!r}; smoke, or none")
    cfg = art_demo_config()
    if arg == "smoke":  # a quick look: a few steps
        cfg.train.steps = 10
        cfg.train.refresh_every = 5
        cfg.train.eval_every = 10
    return cfg
