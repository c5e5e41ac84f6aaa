"""The embedded default: ART on a generated world, offline, in minutes on 2 CPU cores.

`art-jax train --config=configs/demo.py --workdir=/tmp/art-demo` generates a small
corpus of made-up entities with questions and answers, a WordPiece tokenizer and a tiny
random BERT, and trains it with a Dirichlet query-likelihood teacher (no weights).
"""

from art_jax.config import default_config


def get_config(arg=None):
    cfg = default_config()
    cfg.demo.enabled = True
    cfg.data.dataset = "demo"
    # a tiny random BERT: dropout noise on it stalls the bootstrap from random to matching names
    cfg.demo.dropout = 0.0
    cfg.scorer.kind = "query_likelihood"
    cfg.scorer.scale = 20.0  # the mean over ~10 question tokens becomes a sum, and sharper: a decisive teacher
    # A random tiny BERT knows no words: with one shared tower a question and its passage map
    # the entity's name the same way from the start (what a pretrained init gives both towers in
    # the paper). Two separate random towers drift apart and never find the gold passages.
    cfg.retriever.shared_towers = True
    cfg.retriever.question_max_length = 16
    cfg.retriever.passage_max_length = 64
    cfg.retriever.train_passage_max_length = 64
    cfg.index.chunk_rows = 512
    cfg.index.embed_batch_size = 64
    cfg.index.progress = False
    cfg.train.batch_size = 32
    cfg.train.topk = 32
    cfg.train.steps = 400
    # post-LN towers need a long warmup at this rate
    cfg.train.learning_rate = 3e-3
    cfg.train.warmup_fraction = 0.1
    cfg.train.refresh_every = 25
    cfg.train.eval_every = 100
    cfg.train.log_every = 25
    cfg.train.checkpoint_every = 100
    cfg.train.eval_topk = (1, 5, 20)
    if arg == "smoke":  # a quick look: a few steps
        cfg.train.steps = 10
        cfg.train.refresh_every = 5
        cfg.train.eval_every = 10
    return cfg
