"""Supervised DPR as Sachan et al. (2021, section 2.3 and Table 2) train it: BERT-base towers
(separate), score scaling tau = sqrt(768), one hard negative per question, 80 epochs, global
batch 128, Adam lr 2e-5 with linear warmup and decay. Their appendix is not in our copy of the
paper; the rest follows DPR's published NQ/TriviaQA settings (Karpukhin et al. 2020): 1,237
warmup steps, no weight decay, gradient clipping at 2.0, passages cut at 256 tokens.

    art-jax train --config=configs/dpr_nq.py --workdir=DIR \
        --config.data.train_examples=biencoder-nq-train.json \
        --config.data.corpus_store=STORE --config.data.dev_questions=nq-dev.qa.csv

`--config=configs/dpr_nq.py:VARIANT`: nq (default), trivia (TriviaQA's files, the same
settings), nq-dpr (DPR's own recipe: no score scaling, 40 epochs).
"""

from art_jax.config import default_config
from art_jax.core.errors import UserError

# (training examples, dev questions, epochs, score scaling); train sizes after dropping examples
# without a positive: NQ 58,880, TriviaQA 60,413 (DPR's biencoder files)
VARIANTS = {
    "nq": ("data/biencoder-nq-train.json", "data/nq-dev.qa.csv", 80, True, 58880),
    "trivia": ("data/biencoder-trivia-train.json", "data/trivia-dev.qa.csv", 80, True, 60413),
    "nq-dpr": ("data/biencoder-nq-train.json", "data/nq-dev.qa.csv", 40, False, 58880),
}


def get_config(arg="nq"):
    if arg not in VARIANTS:
        raise UserError(f"configs/dpr_nq.py: unknown variant {arg!r}; one of {', '.join(VARIANTS)}")
    examples, dev, epochs, scaling, size = VARIANTS[arg]
    cfg = default_config()
    cfg.method = "dpr"
    cfg.retriever.checkpoint = "bert-base-uncased"
    cfg.retriever.passage_max_length = cfg.retriever.train_passage_max_length = 256
    cfg.data.train_examples = examples
    cfg.data.dev_questions = dev
    cfg.data.corpus_store = "data/wikipedia_store"  # art-jax prepare-corpus --corpus psgs_w100.tsv ...
    cfg.train.batch_size, cfg.train.epochs, cfg.train.hard_negatives = 128, epochs, 1
    cfg.train.score_scaling = scaling
    cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.clip_norm = 2e-5, 0.0, 2.0
    steps = epochs * (size // cfg.train.batch_size)
    cfg.train.warmup_fraction = 1237 / steps  # DPR's 1,237 warmup steps
    # evaluation re-embeds the 21M passages: every 10 epochs, the best top-20 kept
    cfg.train.eval_every = cfg.train.checkpoint_every = 10 * (size // cfg.train.batch_size)
    cfg.train.eval_topk = (1, 5, 20, 100)
    return cfg
