"""Inverse Cloze Task pre-training of both towers from the evidence alone, with the values
of the EMDR2 paper's Table 6 (Sachan et al. 2021b): global batch 4096, 100,000 steps, lr 1e-4,
warmup 1% of the steps, weight decay 0.01; BERT-base towers, score scaling, in-batch negatives.

    art-jax train --config=configs/ict.py --workdir=DIR --config.data.corpus_store=STORE

The store: `art-jax prepare-corpus --corpus psgs_w100.tsv --retriever bert-base-uncased`.
A pseudo-query is one sentence (spaCy's sentencizer), cut at 64 tokens; its context is the
passage without it (kept in 10% of the examples), at 256 tokens. `:demo` (`:demo,smoke`) trains the
offline demos' tiny BERT on their generated world (the MSS demo's retriever pre-training).
"""

from art_jax.config import default_config, ict_demo_config
from art_jax.core.errors import UserError


def get_config(arg=None):
    if arg not in (None, "demo", "demo,smoke"):
        raise UserError(f"configs/ict.py: unknown {arg!r}; demo, demo,smoke, or none")
    if arg in ("demo", "demo,smoke"):  # the generated world of the offline demos (150 steps; smoke: 10)
        cfg = ict_demo_config()
        if arg == "demo,smoke":
            cfg.train.steps = cfg.train.eval_every = cfg.train.checkpoint_every = 10
        return cfg
    cfg = default_config()
    cfg.method = "ict"
    cfg.retriever.checkpoint = "bert-base-uncased"
    cfg.retriever.passage_max_length = cfg.retriever.train_passage_max_length = 256
    cfg.data.corpus_store = "data/wikipedia_store"
    cfg.train.batch_size, cfg.train.steps, cfg.train.hard_negatives = 4096, 100_000, 0
    cfg.train.learning_rate, cfg.train.warmup_fraction, cfg.train.weight_decay = 1e-4, 0.01, 0.01
    cfg.train.best_metric = ""  # no labels: nothing to select by (set data.dev_questions to evaluate)
    cfg.train.eval_every, cfg.train.checkpoint_every = 0, 5000
    return cfg
