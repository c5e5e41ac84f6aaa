"""Fusion-in-Decoder alone (Izacard & Grave, EACL 2021; the baseline of 001 and 004): a T5-base reader
on fixed retrieval results, K = 100 passages of 250 tokens ("question: q title: t context: p"),
batch 64, 10k steps at lr 1e-4 (FiD's constant rate; here linear decay, no warmup), answers of at
most 50 tokens, one gold answer drawn per example and epoch, dev EM every 500 steps (the best kept).

    art-jax search --retriever RETRIEVER --index INDEX --questions data/nq-train.qa.csv --out train.json --topk 100
    art-jax train --config=configs/fid.py --workdir=DIR \
        --config.data.train_results=train.json --config.data.dev_results=dev.json
"""

from art_jax.config import default_config


def get_config():
    cfg = default_config()
    cfg.method = "fid"
    cfg.reader.checkpoint = "t5-base"
    cfg.reader.max_input_tokens = 250
    cfg.data.train_results = "train.json"
    cfg.data.dev_results = "dev.json"
    cfg.train.batch_size, cfg.train.steps, cfg.train.topk = 64, 10000, 100
    cfg.train.learning_rate, cfg.train.warmup_fraction, cfg.train.weight_decay = 1e-4, 0.0, 0.01
    cfg.train.eval_every = cfg.train.checkpoint_every = 500
    cfg.train.best_metric = "em"
    # what fits 16 A100 40GB (`art-jax train --dry-run`: 15.7 GB a device; 46.5 in one micro-batch):
    # remat, and one question a device per micro-batch (fewer devices: raise it)
    cfg.reader.remat = True
    cfg.train.accumulation = 4
    return cfg
