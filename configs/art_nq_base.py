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

from art_jax.config import PAPER_DATASETS, TEACHERS, paper_config
from art_jax.core.errors import UserError


def get_config(arg="nq"):
    dataset, _, teacher = arg.partition(",")
    if dataset not in PAPER_DATASETS or teacher not in ("", *TEACHERS):
        raise UserError(f"configs/art_nq_base.py: unknown {arg!r}; DATASET[,TEACHER] with DATASET one of "
                        f"{', '.join(PAPER_DATASETS)} and TEACHER one of {', '.join(TEACHERS)}")
    return paper_config(dataset, *([teacher] if teacher else []))
