"""DPR-PAQ pre-training (Oguz et al. 2022): the contrastive loss over the global batch on tens of
millions of PAQ pairs with mined hard negatives, read from a pair store, model selection by MRR
over an in-memory proxy corpus of the dev examples' positives and hard negatives.

    art-jax prepare-pairs --pairs paq.jsonl --retriever bert-base-uncased --corpus STORE --out PAIRS
    art-jax train --config=configs/paq.py --workdir=DIR --config.data.pairs=PAIRS \
        --config.data.corpus_store=STORE --config.data.dev_examples=biencoder-nq-dev.json

`--config=configs/paq.py:ENCODER` with ENCODER bert-base (default), bert-large, roberta-base,
roberta-large: Table 6's learning rate and per-GPU batch on their 64 GPUs (the global batch is
64 x that), up to 10 epochs, Adam with a triangular schedule (linear warmup, linear decay).
BERT towers are separate with [CLS] as the representation; RoBERTa towers are shared, with a
linear projection of the same size and a LayerNorm on the first token (retriever.projection).
One hard negative per pair (their PAQ negatives were mined with a DPR checkpoint: art-jax mine
--method dense). Dialogue queries: `--config.retriever.question_truncation=left` keeps the end.
"""

from art_jax.config import default_config
from art_jax.core.errors import UserError

# Hugging Face checkpoint, learning rate, batch per GPU (Table 6), RoBERTa's head and shared towers
ENCODERS = {
    "bert-base": ("bert-base-uncased", 2.5e-5, 32, False),
    "bert-large": ("bert-large-uncased", 1e-5, 12, False),
    "roberta-base": ("roberta-base", 2e-5, 40, True),
    "roberta-large": ("roberta-large", 1e-5, 12, True),
}
GPUS = 64


def get_config(arg="bert-base"):
    if arg not in ENCODERS:
        raise UserError(f"configs/paq.py: unknown encoder {arg!r}; one of {', '.join(ENCODERS)}")
    checkpoint, learning_rate, per_gpu, roberta = ENCODERS[arg]
    cfg = default_config()
    cfg.method = "pairs"
    cfg.retriever.checkpoint = checkpoint
    cfg.retriever.shared_towers = cfg.retriever.projection = roberta
    # the paper fit its 32 GB V100s with half precision and sharded gradients; here remat: per device
    # at the per-GPU batch (`--dry-run`, 8 devices of 32 GB) 8.2 (bert-base), 15.4 (bert-large), 8.0
    # (roberta-base) and 10.7 GB (roberta-large); without it 31.4, 37.8, 37.6 and 34.2: all but one past 32
    cfg.retriever.remat = True
    cfg.retriever.question_max_length = 64
    cfg.retriever.passage_max_length = cfg.retriever.train_passage_max_length = 256
    cfg.data.pairs = "data/paq_pairs"
    cfg.data.corpus_store = "data/wikipedia_store"
    cfg.data.dev_examples = "data/biencoder-nq-dev.json"
    cfg.train.batch_size, cfg.train.epochs, cfg.train.hard_negatives = GPUS * per_gpu, 10, 1
    cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.warmup_fraction = learning_rate, 0.0, 0.01
    cfg.train.eval_topk = (1, 5, 20, 100)
    cfg.train.best_metric = "mrr"
    cfg.train.eval_every = cfg.train.checkpoint_every = 5000
    return cfg
