"""Materialise the offline demo: a generated world, a tokenizer trained on it and a tiny
random BERT (and for the DPR demo, its training examples mined with BM25), written once into
WORKDIR/demo; the config is pointed at them."""

from __future__ import annotations

import os

from art_jax.core import storage
from art_jax.core.distributed import barrier, is_lead
from art_jax.data.demo_world import make_world, write_world
from art_jax.data.tokenizers import train_wordpiece
from art_jax.models.bert import Bert, BertConfig
from art_jax.models.hf import export, init_module


def prepare_demo(cfg, workdir: str) -> None:
    folder = os.path.join(workdir, "demo")
    bert_dir = os.path.join(folder, "bert")
    paths = {name: os.path.join(folder, file) for name, file in
             (("corpus", "corpus.tsv"), ("train", "train.jsonl"), ("dev", "dev.jsonl"))}
    # process 0 writes; config.json of the BERT is written last: the demo is complete
    if is_lead() and not storage.isfile(os.path.join(bert_dir, "config.json")):
        world = make_world(seed=cfg.seed, entities=cfg.demo.entities)
        write_world(world, folder)
        texts = [f"{title} {text}" for _, title, text in world.passages] + [q.question for q in world.train]
        tokenizer = train_wordpiece(texts, cfg.demo.vocab_size)
        bert = BertConfig(vocab_size=len(tokenizer), hidden_size=cfg.demo.hidden_size, num_layers=cfg.demo.layers,
                          num_heads=cfg.demo.heads, intermediate_size=4 * cfg.demo.hidden_size,
                          max_position_embeddings=max(128, cfg.retriever.train_passage_max_length),
                          # BERT's 0.02 leaves a tiny random [CLS] almost blind to its input
                          initializer_range=cfg.demo.initializer_range,
                          hidden_dropout=cfg.demo.dropout, attention_dropout=cfg.demo.dropout)
        export(init_module(Bert, bert, seed=cfg.seed), tokenizer, bert_dir)
    examples = os.path.join(folder, "train-bm25.json")
    if cfg.method == "dpr" and is_lead() and not storage.isfile(examples):
        from art_jax.data.questions import read_questions
        from art_jax.jobs.mine import mine_bm25

        # what `art-jax mine --method bm25` writes: positives and hard negatives by distant supervision
        stats = mine_bm25(paths["corpus"], read_questions(paths["train"]), examples, depth=20,
                          hard_negatives=cfg.train.hard_negatives, progress=False)
        print(stats.summary(examples))
    barrier("art_jax.demo")
    if cfg.method == "dpr":
        cfg.data.train_examples = examples
    cfg.retriever.checkpoint = bert_dir
    cfg.data.corpus = paths["corpus"]
    cfg.data.train_questions = paths["train"]
    cfg.data.dev_questions = paths["dev"]
