"""The reader family on the generated world of the ART demo, offline, on 2 CPU cores.

`art-jax train --config=configs/reader_demo.py --workdir=/tmp/reader-demo` trains a tiny random
T5 reader (Fusion-in-Decoder) together with the ART demo's tiny random BERT retriever with
EMDR2's objective; `:individual_topk` and `:joint_topk` train them with Sachan et al.'s two
objectives, `:fid` the reader alone on BM25's top passages. It ends with one line,
`dev EM a% -> b%, top-5 c% -> d%` (`fid`: EM alone).
"""

from art_jax.config import demo_config

METHODS = ("emdr2", "individual_topk", "joint_topk", "fid")


def get_config(arg="emdr2"):
    method, _, size = arg.partition(",")
    if method not in METHODS:
        raise ValueError(f"reader_demo: {method!r} is not one of {', '.join(METHODS)}")
    cfg = demo_config()
    cfg.method = method
    cfg.reader.input_format = "fid"
    cfg.reader.max_input_tokens = 40  # a demo passage and its question
    cfg.reader.max_answer_tokens = 8
    cfg.reader.dropout = 0.0  # as the towers': a tiny random model learns faster without
    cfg.reader.eval_batch_size = 32
    cfg.train.topk = 8
    cfg.train.batch_size = 16
    cfg.train.learning_rate = 1e-3
    cfg.train.steps = 400
    cfg.train.refresh_every = cfg.train.eval_every = cfg.train.checkpoint_every = 100
    cfg.train.best_metric = "em"
    cfg.demo.xp_init = ""
    cfg.demo.xp_split_punct = True
    cfg.demo.xp_layers = 0
    cfg.demo.xp_heads = 0
    cfg.demo.xp_buckets = 32
    if size == "smoke":  # a quick look: a few steps
        cfg.train.steps = cfg.train.refresh_every = cfg.train.eval_every = cfg.train.checkpoint_every = 4
    return cfg
