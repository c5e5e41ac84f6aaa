"""ART on NQ-Open as in the paper: BERT-base towers, T0-3B teacher, batch 64, K=32,
10 epochs, AdamW 2e-5, index refresh / evaluation / checkpoint every 500 steps.

    art-jax train --config=configs/art_nq_base.py --workdir=DIR \
        --config.data.corpus_store=STORE --config.data.train_questions=nq-train.qa.csv \
        --config.data.dev_questions=nq-dev.qa.csv

The store comes from `art-jax prepare-corpus --corpus psgs_w100.tsv --retriever
bert-base-uncased --scorer bigscience/T0_3B`. The other datasets and the 11B teacher:
`--config=configs/art_nq_base.py:DATASET[,TEACHER]` with DATASET in nq, trivia, squad,
webq, msmarco and TEACHER t0-3b (default) or t5-xxl-lm-adapt (see art_jax/config.py).
"""

from art_jax.config import paper_config


def get_config(arg="nq"):
    return paper_config(*arg.split(","))
