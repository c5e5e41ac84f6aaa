"""Masked-salient-span pre-training (MSS: REALM; Sachan et al. ACL 2021, paper 001; EMDR2, paper 004
section 3.2, appendix C, Table 6): retriever and reader trained end to end to fill in the masked
salient span of sentences of the evidence, the retriever starting from ICT; the initialisation that
ART's NQ runs, EMDR2 and 001 start from.

    art-jax prepare-salient-spans --corpus STORE --out SPANS       # launch/local.sh N ... for N processes
    art-jax train --config=configs/mss.py --workdir=DIR --config.retriever.checkpoint=ict_retriever/ \
        --config.data.corpus_store=STORE --config.data.salient_spans=SPANS
    art-jax refresh --workdir=DIR                                   # on a second group of devices

``emdr2`` (the default): 004's objective (equation 6) at Table 6's values: batch 64, 82,000 steps, Adam
with lr 2e-5, 5% warmup and linear decay, weight decay 0.1, clipping 1.0, the index refreshed
asynchronously every 500 steps; K = 50 and 512-token reader inputs as its fine-tuning (Table 6 gives no
K for MSS). 004 masks 15% of the entity tokens (`prepare-salient-spans --masking entity-tokens`), REALM
and 001 one span (the default). ``individual_topk``: 001's objective, K = 8 (its reader reads one
passage per pass) and otherwise the same values (001 states none for MSS). Dev: NQ's questions (what
004's Table 8 reports after MSS: top-5); ``data.salient_dev`` holds out masked sentences instead.

``demo`` (``demo,individual_topk``; ``demo,smoke`` a few steps): the generated world with every fact
stated in two passages, its masked sentences tagged by spaCy, a tiny BERT given 8 steps of ICT (unless
a retriever.checkpoint is given), a tiny T5 given 400 steps of filling the sentences in from their own
passages (as the papers' pre-trained T5 can), then both trained with EMDR2 (K = 8) to fill them in from
other passages; it ends with `dev EM a% -> b%, top-5 c% -> d%` on held-out masked sentences, each
sentence's own passage kept out (measured: top-5 19.5% -> 37.5%).
"""

from art_jax.config import default_config, demo_config
from art_jax.core.errors import UserError

METHODS = {"emdr2": 50, "individual_topk": 8}  # method: K


def get_config(arg="emdr2"):
    parts = arg.split(",")
    demo, smoke = "demo" in parts, "smoke" in parts
    methods = [p for p in parts if p not in ("demo", "smoke")] or ["emdr2"]
    if len(methods) != 1 or methods[0] not in METHODS or (smoke and not demo):
        raise UserError(f"configs/mss.py: unknown {arg!r}; one of {', '.join(METHODS)}, or demo[,METHOD][,smoke]")
    method = methods[0]
    return _demo(method, smoke) if demo else _paper(method)


def _paper(method):
    cfg = default_config()
    cfg.method = method
    cfg.retriever.checkpoint = "ict_retriever/"  # configs/ict.py's export
    cfg.reader.checkpoint = "t5-base"
    cfg.reader.max_input_tokens = 512
    cfg.reader.max_answer_tokens = 32
    cfg.data.corpus_store = "data/wikipedia_store"
    cfg.data.salient_spans = "data/wikipedia_spans"
    cfg.data.dev_questions = "data/nq-dev.qa.csv"
    cfg.train.batch_size, cfg.train.steps, cfg.train.topk = 64, 82_000, METHODS[method]
    cfg.train.learning_rate, cfg.train.warmup_fraction, cfg.train.weight_decay = 2e-5, 0.05, 0.1
    cfg.train.refresh_mode = "async"
    cfg.train.refresh_every = cfg.train.eval_every = 500
    cfg.train.checkpoint_every = 500
    cfg.train.best_metric = "top5"  # the retriever is what MSS makes
    cfg.train.eval_topk = (1, 5, 20)
    return cfg


def _demo(method, smoke):
    cfg = demo_config()
    cfg.method = method
    cfg.demo.restate = cfg.demo.salient_spans = True
    # a briefly pre-trained retriever (top-5 19.5%; after 150 steps of ICT 39%, what MSS reaches on this world)
    # and a reader that fills spans in from a passage, as the papers' pre-trained T5
    cfg.demo.pretraining_method, cfg.demo.retriever_pretraining = "ict", 8
    cfg.demo.reader_pretraining = 400
    cfg.data.salient_dev = 200
    cfg.reader.input_format = "fid"
    cfg.reader.max_input_tokens = 64  # a demo passage and its masked sentence
    cfg.reader.max_answer_tokens = 8
    cfg.reader.eval_batch_size = 32
    cfg.retriever.question_max_length = 32  # a masked sentence, not a short question
    cfg.train.batch_size = 16
    cfg.train.learning_rate = 1e-3
    cfg.train.topk, cfg.train.steps = 8, 200
    cfg.train.refresh_every = 25
    cfg.train.eval_topk = (5,)
    cfg.train.eval_every = cfg.train.checkpoint_every = cfg.train.steps // 4
    cfg.train.best_metric = "top5"
    if smoke:
        cfg.train.steps = cfg.train.refresh_every = cfg.train.eval_every = cfg.train.checkpoint_every = 4
        cfg.demo.retriever_pretraining, cfg.demo.reader_pretraining = 4, 2
    return cfg
