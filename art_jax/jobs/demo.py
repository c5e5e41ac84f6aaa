"""Materialise the offline demo: a generated world, a tokenizer trained on it and a tiny
random BERT (for the DPR demo, its training examples mined with BM25; for the reader demos, a
tiny random T5 with a SentencePiece-style tokenizer, and for ``fid`` BM25 retrieval results),
written once into WORKDIR/demo; the config is pointed at them."""

from __future__ import annotations

import copy
import os

from art_jax.config import art_demo_config, ict_demo_config
from art_jax.core import storage
from art_jax.core.distributed import barrier, is_lead
from art_jax.core.errors import UserError
from art_jax.data.demo_world import make_world, write_world
from art_jax.data.tokenizers import train_unigram, train_wordpiece
from art_jax.models.bert import Bert, BertConfig
from art_jax.models.hf import export, init_module
from art_jax.models.t5 import T5, T5Config

READER_METHODS = ("fid", "emdr2", "individual_topk", "joint_topk")
PRETRAINING = {"art": art_demo_config, "ict": ict_demo_config}  # demo.pretraining_method


def prepare_demo(cfg, workdir: str) -> None:
    if cfg.demo.pretraining_method not in PRETRAINING:
        raise UserError(f"demo.pretraining_method: {cfg.demo.pretraining_method!r} is not one of "
                        f"{', '.join(PRETRAINING)}")
    if cfg.demo.reader_pretraining and not cfg.demo.salient_spans:
        raise UserError("demo.reader_pretraining trains the reader on the masked sentences of demo.salient_spans, "
                        "which is off")
    folder = os.path.join(workdir, "demo")
    bert_dir = os.path.join(folder, "bert")
    paths = {name: os.path.join(folder, file) for name, file in
             (("corpus", "corpus.tsv"), ("train", "train.jsonl"), ("dev", "dev.jsonl"))}
    # process 0 writes; config.json of the BERT is written last: the demo is complete
    given = cfg.retriever.checkpoint  # a retriever given (another run's export) is trained from as it is
    write_files = is_lead() and not storage.isfile(paths["dev"])
    make_bert = is_lead() and not given and not storage.isfile(os.path.join(bert_dir, "config.json"))
    world = _world(cfg) if write_files or make_bert else None
    if write_files:
        write_world(world, folder)
    if make_bert:
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
    cfg.retriever.checkpoint = given or bert_dir
    cfg.data.corpus = paths["corpus"]
    cfg.data.train_questions = paths["train"]
    cfg.data.dev_questions = paths["dev"]
    if cfg.method in READER_METHODS and cfg.method != "fid" and cfg.demo.retriever_pretraining and not given:
        cfg.retriever.checkpoint = _pretrained_retriever(cfg, folder)
    if cfg.demo.salient_spans:
        _salient_spans(cfg, workdir, folder)
        if cfg.demo.reader_pretraining:
            cfg.reader.checkpoint = _pretrained_reader(cfg, folder)


def _world(cfg):
    return make_world(seed=cfg.seed, entities=cfg.demo.entities, restate=cfg.demo.restate)


def _salient_spans(cfg, workdir: str, folder: str) -> None:
    """The run trains on WORKDIR/demo/spans, the masked sentences of the world's passages (every
    process tags its share), and holds ``data.salient_dev`` of them out as its dev questions."""
    from art_jax.data.span_store import is_span_store, prepare_salient_spans
    from art_jax.methods.common import open_store

    store = open_store(cfg, workdir)  # the corpus store the run trains against, WORKDIR/corpus_store
    spans = os.path.join(folder, "spans")
    if not is_span_store(spans):
        prepare_salient_spans(store.path, spans, progress=False)
    cfg.data.corpus_store, cfg.data.salient_spans = store.path, spans
    cfg.data.train_questions = cfg.data.dev_questions = ""


def _pretrained_retriever(cfg, folder: str) -> str:
    """WORKDIR/demo/retriever: the demo's BERT after ``demo.retriever_pretraining`` steps of the ART
    demo (the training questions alone, no answers): the end-to-end methods' initial retriever, as
    the papers start theirs from unsupervised pre-training (MSS, ICT)."""
    method = cfg.demo.pretraining_method
    pre = PRETRAINING[method]()
    pre.seed, pre.retriever.checkpoint = cfg.seed, cfg.retriever.checkpoint
    pre.demo.entities = cfg.demo.entities  # the run's people and facts (its own world would be the default's)
    pre.train.learning_rate = cfg.demo.pretraining_learning_rate or pre.train.learning_rate
    pre.data.corpus, pre.data.train_questions, pre.data.dev_questions = (
        cfg.data.corpus, cfg.data.train_questions, cfg.data.dev_questions)
    pre.train.steps = pre.train.eval_every = cfg.demo.retriever_pretraining
    return _pretrained(pre, os.path.join(folder, method), os.path.join(folder, "retriever"),
                       f"the retriever's pre-training: {pre.train.steps} steps of the {method.upper()} demo")


def _pretrained_reader(cfg, folder: str) -> str:
    """WORKDIR/demo/reader/reader: the demo's T5 after ``demo.reader_pretraining`` steps of filling in
    the run's masked sentences each from its own passage (``data.salient_source_passage``; no retriever
    gradient), what the papers' pre-trained T5 brings to MSS: a reader whose answer likelihoods tell
    the passages apart, so that the retriever learns from them (measured: from the random T5 MSS
    lowers top-5, from this one it raises it)."""
    pre = copy.deepcopy(cfg)
    pre.data.salient_source_passage, pre.train.topk = True, 1
    pre.train.refresh_every, pre.train.refresh_mode = 0, "sync"  # (its index serves the dev evaluation alone)
    pre.train.best_metric = ""  # no retriever metric to pick by: the last step's reader is the one
    pre.train.steps = pre.train.eval_every = cfg.demo.reader_pretraining
    out = _pretrained(pre, os.path.join(folder, "mss_reader"), os.path.join(folder, "reader"),
                      f"the reader's pre-training: {pre.train.steps} steps filling in masked sentences from their "
                      "own passages")
    return os.path.join(out, "reader")


def _pretrained(pre, run: str, out: str, what: str) -> str:
    """``out``: the export of ``pre`` trained in ``run``-STEPS. Every process trains (the run checkpoints
    every quarter and resumes from there if killed); the export is published whole, then used as is
    (one of another run, or of another step count, is replaced)."""
    from art_jax.methods import make_trainer
    from art_jax.models.export import read_export, reads_as_export
    from art_jax.workdir import export_run

    pre.train.checkpoint_every = max(1, pre.train.steps // 4)
    run = os.path.abspath(f"{run}-{pre.train.steps}")
    if not (reads_as_export(out) and os.path.abspath(read_export(out).get("run", "")) == run):
        if is_lead():
            print(f"{what}, in {run}")
        make_trainer(pre, run).run()
        export_run(run, out)
        barrier(f"art_jax.demo.{os.path.basename(out)}")
    return out


def _prepare_reader(cfg, folder: str, paths: dict[str, str]) -> None:
    """WORKDIR/demo/t5: a tiny random T5 (v1.0 layout) whose tokenizer knows the world's words and
    the input template's; for ``fid``, BM25's top passages of each question as `art-jax search`
    writes results.

    Its tokenizer splits a word's closing punctuation off ("1820," -> "1820" ","), so that every
    answer is a token of its passage, as with SentencePiece: a reader can then copy it. Its
    initialisation (measured on the demo; rescaled and set before export): Hugging Face's T5
    scales (q (d_model d_kv)^-0.5, k, v and wi d_model^-0.5, o (heads d_kv)^-0.5, wo d_ff^-0.5,
    relative biases d_model^-0.5) times ``demo.reader_init_scale``, and with
    ``demo.reader_copy_init`` the decoder's cross-attention values and outputs the identity, so
    that attending to a memory position copies its token: a random T5 must otherwise learn
    copying, which a pretrained one brings (years, ~300 rare tokens, were never copied)."""
    import re

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from art_jax.data.questions import read_questions
    from art_jax.models.layers import INIT_STDDEV

    t5_dir = os.path.join(folder, "t5")
    if not storage.isfile(os.path.join(t5_dir, "config.json")):
        world = _world(cfg)  # the same world, generated again
        texts = ([f"{title} {text}" for _, title, text in world.passages] + [q.question for q in world.train]
                 + [a for q in world.train for a in q.answers] + ["question: title: context:"] * 50)
        closing = re.compile(r"(\w)([,.?!;])(?=\s|$)")  # a word's closing punctuation: a piece of its own
        # T5's sentinels mark the masked spans of the MSS demo's sentences
        tokenizer = train_unigram([closing.sub(r"\1 \2", text) for text in texts], cfg.demo.vocab_size,
                                  sentinels=8 if cfg.demo.salient_spans else 0)
        demo = cfg.demo
        t5 = T5Config(vocab_size=len(tokenizer), d_model=demo.reader_d_model, d_kv=demo.reader_d_model // demo.heads,
                      d_ff=4 * demo.reader_d_model, num_layers=demo.layers, num_decoder_layers=demo.layers,
                      num_heads=demo.heads, dropout_rate=cfg.reader.dropout)
        model = init_module(T5, t5, seed=cfg.seed)
        d, inner = t5.d_model, t5.num_heads * t5.d_kv
        stddev = {"q": (d * t5.d_kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": inner ** -0.5, "wi": d ** -0.5,
                  "wo": t5.d_ff ** -0.5, "relative_attention_bias": d ** -0.5}

        def rescaled(path, value):
            scale = next((stddev[key.key] for key in path if getattr(key, "key", None) in stddev), None)
            return value if scale is None else value * (demo.reader_init_scale * scale / INIT_STDDEV)

        nnx.update(model, jax.tree_util.tree_map_with_path(rescaled, nnx.state(model, nnx.Param)))
        if demo.reader_copy_init:
            for block in model.decoder.blocks:
                attention = block.cross_attention
                attention.v.kernel.value = jnp.eye(d, inner, dtype=attention.v.kernel.value.dtype)
                attention.o.kernel.value = jnp.eye(inner, d, dtype=attention.o.kernel.value.dtype)
        export(model, tokenizer, t5_dir)
    if cfg.method == "fid":
        from art_jax.jobs.mine import bm25_results

        for split in ("train", "dev"):
            out = os.path.join(folder, f"{split}-bm25-results.json")
            if not storage.isfile(out):
                bm25_results(paths["corpus"], read_questions(paths[split]), out, depth=cfg.train.topk, progress=False)
