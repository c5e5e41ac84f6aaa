"""EMDR2 as Singh et al. (NeurIPS 2021, paper 004, section 3 and Table 7) train it on NQ, TriviaQA and
WebQuestions: a T5-base reader and BERT-base towers end to end, K = 50 passages of 512 tokens (a short
passage goes on with the next ones of its article), Adam lr 2e-5 with 1% warmup and linear decay,
weight decay 0.1, dropout 0.1, batch 64 for 10 epochs (WebQ: 16 for 20), checkpoint and dev EM every
500 steps (the best kept), the index refreshed every 500 steps beside the trainer (`art-jax refresh`).
The retriever starts from masked-salient-span pre-training (004: ICT, then MSS; or MSS + DPR).

    art-jax train --config=configs/emdr2.py:nq --workdir=DIR \
        --config.retriever.checkpoint=mss_retriever/ --config.data.corpus_store=STORE
    art-jax refresh --workdir=DIR            # on a second group of devices

EMDR2's own reader was a T5 pre-trained with BERT's lower-case vocabulary reading
`[CLS] q [SEP] title [SEP] passage [SEP]` (``reader.input_format=emdr2``); with Hugging Face's t5-base
(SentencePiece) the preset reads FiD's format. ``train.marginalise``: "sequence" is the paper's
equation 6 (the default; see README), "token" the reference code's per-token marginal.
"""

from art_jax.config import default_config
from art_jax.core.errors import UserError

# question files under data/ (DPR's names), batch, epochs
DATASETS = {"nq": ("nq", 64, 10), "trivia": ("trivia", 64, 10), "webq": ("webq", 16, 20)}


def get_config(arg="nq"):
    if arg not in DATASETS:
        raise UserError(f"configs/emdr2.py: unknown dataset {arg!r}; one of {', '.join(DATASETS)}")
    files, batch, epochs = DATASETS[arg]
    cfg = default_config()
    cfg.method = "emdr2"
    cfg.retriever.checkpoint = "mss_retriever/"  # art-jax convert --megatron (EMDR2's MSS release) or configs/mss.py
    cfg.reader.checkpoint = "t5-base"
    cfg.reader.max_input_tokens = 512
    cfg.reader.pad_with_following = True
    cfg.reader.max_answer_tokens = 50
    cfg.data.corpus_store = "data/wikipedia_store"
    cfg.data.train_questions = f"data/{files}-train.qa.csv"
    cfg.data.dev_questions = f"data/{files}-dev.qa.csv"
    cfg.train.batch_size, cfg.train.epochs, cfg.train.topk = batch, epochs, 50
    cfg.train.learning_rate, cfg.train.warmup_fraction, cfg.train.weight_decay = 2e-5, 0.01, 0.1
    cfg.train.refresh_mode = "async"
    cfg.train.refresh_every = cfg.train.eval_every = cfg.train.checkpoint_every = 500
    cfg.train.best_metric = "em"
    cfg.train.eval_topk = (1, 5, 20, 50)
    # what fits 16 A100 40GB (`art-jax train --dry-run`: 29.4 GB a device; 74.9 in one micro-batch):
    # remat in both models, and one question a device per micro-batch (fewer devices: raise it)
    cfg.reader.remat = cfg.retriever.remat = True
    cfg.train.accumulation = batch // 16
    return cfg
