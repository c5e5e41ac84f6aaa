"""The reader family on the generated world of the ART demo, offline, on 2 CPU cores.

`art-jax train --config=configs/reader_demo.py --workdir=/tmp/reader-demo` trains a tiny random
T5 reader (Fusion-in-Decoder) together with the demo's tiny BERT retriever with Joint top-K's
objective (Sachan et al. 2021), the method of the family that learns this world fastest;
`:individual_topk` and `:emdr2` train them with the other two objectives, `:fid` the reader alone
on BM25's top passages. It ends with one line, `dev EM a% -> b%, top-5 c% -> d%` (`fid`: EM alone).

As the papers start their retriever from unsupervised pre-training, the end-to-end methods start
theirs from 150 steps (emdr2: 300) of the ART demo on their world (questions alone;
``demo.retriever_pretraining``): a random retriever brings the answer's passage to too few
questions for a random reader to learn reading, and both collapse. The reader learns to read from
the initialisation the demo gives it (a copying cross-attention, jobs/demo.py ``_prepare_reader``).
"""

from art_jax.config import demo_config
from art_jax.core.errors import UserError

METHODS = ("joint_topk", "individual_topk", "emdr2", "fid")


def get_config(arg="joint_topk"):
    method, _, size = arg.partition(",")
    if method not in METHODS or size not in ("", "smoke"):
        raise UserError(f"configs/reader_demo.py: unknown {arg!r}; METHOD[,smoke] with METHOD one of "
                        f"{', '.join(METHODS)}")
    cfg = demo_config()
    cfg.method = method
    cfg.reader.input_format = "fid"
    cfg.reader.max_input_tokens = 40  # a demo passage and its question (at most 39 tokens)
    cfg.reader.max_answer_tokens = 8
    cfg.reader.eval_batch_size = 32
    cfg.train.batch_size = 16
    cfg.train.learning_rate = 1e-3
    cfg.train.refresh_every = 25  # 400 passages: a refresh costs about a step
    cfg.train.eval_topk = (5,)
    if method == "fid":  # BM25's top 8: the question's two passages and six of others with its kind of fact
        cfg.reader.dropout = 0.0
        cfg.train.topk, cfg.train.steps = 8, 1000
    else:
        # The pre-trained retriever's top 4: the question's two passages and two of names that look
        # alike (shared name pieces), which the reader must tell apart. Without dropout it learns the
        # training answers by heart and dev EM falls after ~500 steps.
        cfg.demo.retriever_pretraining = 150
        cfg.reader.dropout = 0.1
        cfg.train.topk, cfg.train.steps = 4, 900
    if method == "emdr2":  # measured over seeds: with 200 people its reader learns the answers by heart at
        # 18-26% dev EM; 1,920 training questions about 400 people take it further, given a retriever pre-trained
        # longer and at a lower rate (at 3e-3 the ART demo collapses on some seeds of the larger world), and a
        # long warmup (at 10%, the random reader's early answer likelihoods cost the retriever a tenth of its top-5)
        cfg.demo.entities = 400
        cfg.demo.retriever_pretraining, cfg.demo.pretraining_learning_rate = 300, 2e-3
        cfg.train.steps, cfg.train.warmup_fraction = 1800, 0.3
    if method == "joint_topk":  # it trains the question tower and freezes the passage tower: two towers
        cfg.retriever.shared_towers = False
    cfg.train.eval_every = cfg.train.checkpoint_every = cfg.train.steps // (6 if method == "emdr2" else 4)
    cfg.train.best_metric = "em"
    if size == "smoke":  # a quick look: a few steps
        cfg.train.steps = cfg.train.refresh_every = cfg.train.eval_every = cfg.train.checkpoint_every = 4
        cfg.demo.retriever_pretraining = min(cfg.demo.retriever_pretraining, 4)
    return cfg
