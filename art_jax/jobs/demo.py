"""Materialise the offline demo: a generated world, a tokenizer trained on it and a tiny
random BERT (for the DPR demo, its training examples mined with BM25; for the reader demos, a
tiny random T5 with a SentencePiece-style tokenizer, and for ``fid`` BM25 retrieval results),
written once into WORKDIR/demo; the config is pointed at them."""

from __future__ import annotations

import os
import re

from art_jax.core import storage
from art_jax.core.distributed import barrier, is_lead
from art_jax.data.demo_world import make_world, write_world
from art_jax.data.tokenizers import train_unigram, train_wordpiece
from art_jax.models.bert import Bert, BertConfig
from art_jax.models.hf import export, init_module
from art_jax.models.t5 import T5, T5Config

READER_METHODS = ("fid", "emdr2", "individual_topk", "joint_topk")


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
    if cfg.method in READER_METHODS and is_lead():
        _prepare_reader(cfg, folder, paths)
    barrier("art_jax.demo")
    if cfg.method in READER_METHODS:
        cfg.reader.checkpoint = os.path.join(folder, "t5")
    if cfg.method == "fid":
        cfg.data.train_results, cfg.data.dev_results = (os.path.join(folder, f"{split}-bm25-results.json")
                                                        for split in ("train", "dev"))
    if cfg.method == "dpr":
        cfg.data.train_examples = examples
    cfg.retriever.checkpoint = bert_dir
    cfg.data.corpus = paths["corpus"]
    cfg.data.train_questions = paths["train"]
    cfg.data.dev_questions = paths["dev"]


def _prepare_reader(cfg, folder: str, paths: dict[str, str]) -> None:
    """WORKDIR/demo/t5: a tiny random T5 (v1.0 layout) whose tokenizer knows the world's words and
    the input template's; for ``fid``, BM25's top passages of each question as `art-jax search`
    writes results."""
    from art_jax.data.questions import read_questions

    t5_dir = os.path.join(folder, "t5")
    if not storage.isfile(os.path.join(t5_dir, "config.json")):
        world = make_world(seed=cfg.seed, entities=cfg.demo.entities)  # the same world, generated again
        texts = ([f"{title} {text}" for _, title, text in world.passages] + [q.question for q in world.train]
                 + [a for q in world.train for a in q.answers] + ["question: title: context:"] * 50)
        demo = cfg.demo
        if demo.get("xp_split_punct", True):
            texts = [_PUNCTUATION.sub(r"\1 \2", text) for text in texts]
        tokenizer = train_unigram(texts, demo.vocab_size)
        layers = demo.get("xp_layers", 0) or demo.layers
        heads = demo.get("xp_heads", 0) or demo.heads
        t5 = T5Config(vocab_size=len(tokenizer), d_model=demo.reader_d_model, d_kv=demo.reader_d_model // heads,
                      d_ff=4 * demo.reader_d_model, num_layers=layers, num_decoder_layers=layers,
                      num_heads=heads, dropout_rate=cfg.reader.dropout,
                      relative_attention_num_buckets=demo.get("xp_buckets", 32))
        model = init_module(T5, t5, seed=cfg.seed)
        if demo.get("xp_init", ""):
            _t5_init(model, t5, demo.get("xp_init"))
        if demo.get("xp_copy", ""):
            _copy_init(model, demo.get("xp_copy"), demo.get("xp_copy_scale", 1.0))
        if demo.get("xp_tie", ""):
            _tie_qk(model, demo.get("xp_tie"), demo.get("xp_qk_scale", 1.0))
        export(model, tokenizer, t5_dir)
    if cfg.method == "fid":
        from art_jax.jobs.mine import bm25_results

        for split in ("train", "dev"):
            out = os.path.join(folder, f"{split}-bm25-results.json")
            if not storage.isfile(out):
                bm25_results(paths["corpus"], read_questions(paths[split]), out, depth=cfg.train.topk, progress=False)


# a word's closing punctuation, a piece of its own for the reader's tokenizer
_PUNCTUATION = re.compile(r"(\w)([,.?!;])(?=\s|$)")


def _t5_init(model, t5: T5Config, mode: str) -> None:
    """Rescale the N(0, 0.02) kernels to Hugging Face's T5 initialisation (``_init_weights``)."""
    import jax
    from flax import nnx

    d, kv, inner, ff = t5.d_model, t5.d_kv, t5.num_heads * t5.d_kv, t5.d_ff
    target = {"q": (d * kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": inner ** -0.5, "wi": d ** -0.5,
              "wo": ff ** -0.5, "relative_attention_bias": d ** -0.5}
    mult = float(mode) if mode not in ("t5",) else 1.0

    def rescale(path, value):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        for name in names:
            if name in target:
                return value * (target[name] * mult / 0.02)
        return value

    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map_with_path(rescale, state))


def _tie_qk(model, where: str, scale: float) -> None:
    """k := q (times scale for both) in the chosen attentions: identical tokens attend to each other."""
    stacks = {"enc": [model.encoder], "all": [model.encoder, model.decoder], "dec": [model.decoder]}[where]
    for stack in stacks:
        for block in stack.blocks:
            attns = [block.self_attention] + ([block.cross_attention] if hasattr(block, "cross_attention") else [])
            for attn in attns:
                q = attn.q.kernel[...] * scale
                attn.q.kernel.value = q
                attn.k.kernel.value = q


def _copy_init(model, where: str, scale: float) -> None:
    """v := o := identity (times scale) in the chosen attentions: attending to a token copies it."""
    import jax.numpy as jnp

    attns = []
    for part in where.split("+"):
        if part == "cross":
            attns += [b.cross_attention for b in model.decoder.blocks]
        if part == "dself":
            attns += [b.self_attention for b in model.decoder.blocks]
        if part == "eself":
            attns += [b.self_attention for b in model.encoder.blocks]
    for attn in attns:
        eye = jnp.eye(attn.v.kernel.shape[0], attn.v.kernel.shape[1])
        attn.v.kernel.value = eye * scale
        attn.o.kernel.value = eye
