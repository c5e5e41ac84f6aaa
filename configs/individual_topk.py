"""Individual top-K and Joint top-K as Sachan et al. (ACL 2021, paper 001, sections 3.1-3.2, 5.4-6)
train them on NQ and TriviaQA: a T5-base reader with BERT-base towers initialised from ICT + MSS +
supervised DPR ("the previous best setting").

Our copy of the paper lacks its appendix A (hyperparameters); the values below are this project's
choice, stated here: the family's Adam lr 2e-5 with 1% warmup and linear decay, weight decay 0.1,
batch 64, 10 epochs, dev EM every 500 steps (the best kept), FiD's input format at 250 tokens.
K: Individual top-K reads one passage per reader pass and its accuracy can fall as K grows (the
paper's Figure 4): K = 8. Joint top-K improves with more passages (Figure 5): K = 50, the passage
tower frozen as in the paper; lambda starts at K (``reader.joint_lambda`` = 0 means K: a passage with
twice the uniform 1/K of the retriever's mass gets +1 on its cross-attention logits; the paper is
silent on its start).

    art-jax train --config=configs/individual_topk.py:nq --workdir=DIR \
        --config.retriever.checkpoint=dpr_retriever/ --config.data.corpus_store=STORE
    art-jax train --config=configs/individual_topk.py:nq,joint --workdir=DIR ...
"""

from art_jax.config import default_config
from art_jax.core.errors import UserError

DATASETS = {"nq": "nq", "trivia": "trivia"}
METHODS = {"individual": ("individual_topk", 8), "joint": ("joint_topk", 50)}


def get_config(arg="nq"):
    dataset, _, variant = arg.partition(",")
    variant = variant or "individual"
    if dataset not in DATASETS or variant not in METHODS:
        raise UserError(f"configs/individual_topk.py: unknown {arg!r}; DATASET[,VARIANT] with DATASET one of "
                        f"{', '.join(DATASETS)}, VARIANT one of {', '.join(METHODS)}")
    method, topk = METHODS[variant]
    cfg = default_config()
    cfg.method = method
    cfg.retriever.checkpoint = "dpr_retriever/"  # ICT + MSS + supervised DPR (001's initialisation)
    cfg.reader.checkpoint = "t5-base"
    cfg.data.corpus_store = "data/wikipedia_store"
    cfg.data.train_questions = f"data/{DATASETS[dataset]}-train.qa.csv"
    cfg.data.dev_questions = f"data/{DATASETS[dataset]}-dev.qa.csv"
    cfg.train.batch_size, cfg.train.epochs, cfg.train.topk = 64, 10, topk
    cfg.train.learning_rate, cfg.train.warmup_fraction, cfg.train.weight_decay = 2e-5, 0.01, 0.1
    cfg.train.refresh_mode = "async"
    cfg.train.refresh_every = cfg.train.eval_every = cfg.train.checkpoint_every = 500
    if method == "joint_topk":  # the passage tower is frozen: the index never goes stale
        cfg.train.refresh_mode, cfg.train.refresh_every = "sync", 0
    cfg.train.best_metric = "em"
    cfg.train.eval_topk = (1, 5, 20)
    # remat in both models: 16.3 GB (individual) and 29.8 GB (joint) a device on 16 A100 40GB (`--dry-run`)
    cfg.reader.remat = cfg.retriever.remat = True
    return cfg
