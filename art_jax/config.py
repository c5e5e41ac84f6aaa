"""ml_collections configs: ``--config=FILE.py[:ARG]`` plus ``--config.a.b=value`` overrides.

A config file defines ``get_config(arg=None) -> ConfigDict`` (the ml_collections
convention). Overrides are parsed with the type of the value they replace, and an
unknown key is an error naming it; the resolved config is written into the workdir.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os

import ml_collections

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.fileio import read_json


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"art_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: defines no get_config()")
    if arg and not inspect.signature(module.get_config).parameters:
        raise UserError(f"{path}: unknown {arg!r}; this config takes no argument")
    cfg = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
    """``config.a.b=value`` (a leading ``--`` allowed); the value takes the old value's type."""
    key, sep, raw = item.removeprefix("--").partition("=")
    if not sep or not key.startswith("config."):
        raise UserError(f"bad override {item!r}; expected --config.section.key=value")
    *parents, leaf = key.removeprefix("config.").split(".")
    node = cfg
    for name in parents:
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise UserError(f"unknown config key {key!r}")
        node = node[name]
    if leaf not in node:
        raise UserError(f"unknown config key {key!r}")
    node[leaf] = _parse(raw, node[leaf], key)


def _parse(raw: str, old, key: str):
    if isinstance(old, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise UserError(f"{key}: expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    if isinstance(old, str) or old is None:
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise UserError(f"{key}: cannot parse {raw!r} as {type(old).__name__}") from None
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(old)(value)
    if type(value) is not type(old):
        raise UserError(f"{key}: expected {type(old).__name__}, got {raw!r}")
    return value


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into ``workdir``."""
    path = os.path.join(workdir, "config.json")
    if not storage.isfile(path):
        raise UserError(f"{workdir}: not a training workdir (no config.json); "
                        f"`art-jax train --workdir={workdir}` writes it when it starts")
    return ml_collections.ConfigDict(read_json(path))


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    path = os.path.join(workdir, "config.json")
    storage.write_text(path, json.dumps(cfg.to_dict(), indent=1, sort_keys=True, default=str) + "\n")
    return path


def default_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with the paper's NQ values; experiment files change a few."""
    cfg = ml_collections.ConfigDict()
    # the training system (art_jax/methods/): "art"; "dpr", "ict", "pairs" (contrastive); "fid" (the reader
    # alone); "emdr2", "individual_topk", "joint_topk" (reader and retriever end to end)
    cfg.method = "art"
    cfg.seed = 1234
    cfg.retriever = ml_collections.ConfigDict(dict(
        # a Hugging Face BERT or RoBERTa folder/hub id (both towers start from it), an export or a run
        checkpoint="bert-base-uncased",
        shared_towers=False,
        question_max_length=64,
        passage_max_length=256,  # when indexing
        # when a step re-embeds its passages (joint_topk re-embeds none: it reads the index's vectors)
        train_passage_max_length=512,
        # which end of a question longer than question_max_length is cut: "right" keeps its start (BERT's
        # default), "left" its end (a dialogue's latest turns, as DPR-PAQ truncates dialogue contexts)
        question_truncation="right",
        # the towers' compute in training, as the reader's: "bfloat16" computes in bf16 with float32 parameters,
        # softmax and embeddings; remat recomputes each layer's activations in the backward pass
        dtype="float32", remat=False,
        # with remat, what each recomputed layer keeps: "nothing_saveable" (least memory),
        # "dots_with_no_batch_dims_saveable" (its dense layers' outputs), "dots_saveable" (every matmul's)
        remat_policy="nothing_saveable",
        # a Dense + LayerNorm head on [CLS] (DPR-PAQ's RoBERTa towers): True adds a fresh one to a checkpoint
        # without it; a checkpoint that has one keeps it either way
        projection=False,
    ))
    cfg.scorer = ml_collections.ConfigDict(dict(
        kind="t5",  # "t5" (T0 and friends) or "query_likelihood" (no weights needed)
        checkpoint="bigscience/T0_3B",
        dtype="bfloat16",
        batch_size=64,
        mu=50.0,  # query_likelihood: Dirichlet prior
        scale=1.0,  # query_likelihood: multiplies the mean log-likelihood (sharpens the teacher)
        # art: the (question, passage) scores kept in host memory and reused when a question retrieves a passage
        # again (teachers/cache.py), at most this many pairs (250 bytes each), least recently asked dropped; 0: none
        cache=0,
    ))
    cfg.reader = ml_collections.ConfigDict(dict(
        # the methods that train a T5 reader (Fusion-in-Decoder): a Hugging Face T5 folder or hub id, an export
        # with reader/, or a run that trains one
        checkpoint="t5-base",
        # each (question, passage) input: "fid" (question: {question} title: {title} context: {text}), "emdr2"
        # ([CLS] {question} [SEP] {title} [SEP] {text} [SEP], a T5 with BERT's vocabulary) or a template
        input_format="fid",
        max_input_tokens=250,  # per input, its closing token kept (EMDR2: 512)
        max_answer_tokens=50,  # training targets and generated answers
        # EMDR2's option: a passage shorter than max_input_tokens goes on with the next passages of its article
        pad_with_following=False,
        dropout=0.1,
        dtype="float32",  # compute dtype; "bfloat16" computes in bf16 with float32 parameters and softmax
        remat=False,  # recompute each block's activations in the backward pass: K x N tokens per question
        remat_policy="nothing_saveable",  # with remat, what each recomputed block keeps (as retriever.remat_policy)
        eval_batch_size=8,  # dev questions per generation batch (greedy decoding)
        # joint_topk: the starting lambda of lambda * p(z|q) on the cross-attention logits; 0 means K, so that a
        # passage holding twice the uniform 1/K of the retriever's mass gets +1 on its logits
        joint_lambda=0.0,
    ))
    cfg.data = ml_collections.ConfigDict(dict(
        corpus="",  # evidence TSV/JSONL, prepared into WORKDIR/corpus_store when no store is given
        corpus_store="",
        dataset="nq",  # names the seqio Task of the training questions: art_{dataset}
        train_questions="",
        # seqio shards of the training questions, an equal run of them per process (0: one per
        # process). The global batch depends on this, not on the process count: fix it to resume
        # on another number of hosts, or to rehearse a multi-host run in one process
        shards=0,
        dev_questions="",
        # emdr2 / individual_topk / joint_topk: a salient-span store (`art-jax prepare-salient-spans`) to train
        # on instead of data.train_questions: masked sentences of the evidence, their spans the answers
        # (masked-salient-span pre-training); each sentence's own passage is kept out of its top-K
        salient_spans="",
        salient_dev=0,  # examples of data.salient_spans held out of training as the dev questions
        # each masked sentence read with the passage it came from instead of retrieved ones (train.topk=1): span
        # filling from context, what a pre-trained T5 brings; a reader warm-up (one passage: no retriever gradient)
        salient_source_passage=False,
        # dpr: training examples, DPR's training JSON (question, answers, positive_ctxs, hard_negative_ctxs;
        # `art-jax mine` writes it) or Tevatron JSONL (query, positive_passages, negative_passages)
        train_examples="",
        # pairs: a pair store (`art-jax prepare-pairs`): pre-tokenized questions with positive and hard
        # negative passages, inline or rows of the corpus store (DPR-PAQ pre-training)
        pairs="",
        # contrastive methods: dev examples in the same formats; every evaluation reports "mrr", their
        # questions' MRR over a proxy corpus of their positives and up to 50 hard negatives each,
        # embedded in device memory (DPR-PAQ's model selection, no index of the evidence needed)
        dev_examples="",
        # fid: DPR-format retrieval results (art-jax search writes them) of the training and dev questions
        train_results="",
        dev_results="",
        # a published index version (or an index folder: its newest) of the corpus store to train
        # against from step 0, instead of the trainer embedding the corpus before the first step
        initial_index="",
    ))
    # how a run lays out on its devices (training/layout.py): the ('data', 'model') mesh and the train state's sharding
    cfg.mesh = ml_collections.ConfigDict(dict(
        # devices per teacher replica: a T5 teacher's heads, FFN width and vocabulary split over them; 0: the fewest
        # that keep the teacher's share under half a device's memory (1 when that memory is unknown)
        model=0,
        # the train state (parameters, optimizer state) split over every device, gathered where a layer uses it:
        # "on", "off", or "auto": on when the replicated state and the teacher's share would pass half a device
        fsdp="auto",
        # one device's memory in GB; 0: known for A100 40/80 GB, H100, H200 and TPU v4/v5e/v5p/v6e, else the
        # allocator's limit; CPU devices have none unless given (what a dry run sizes an accelerator run with)
        device_memory_gb=0.0,
    ))
    cfg.index = ml_collections.ConfigDict(dict(
        dtype="float16", chunk_rows=8192, embed_batch_size=128, rows_per_device=0, progress=True,
    ))
    cfg.train = ml_collections.ConfigDict(dict(
        batch_size=64, topk=32, epochs=10, steps=0,  # steps > 0 overrides epochs
        learning_rate=2e-5, warmup_fraction=0.01, weight_decay=0.1, clip_norm=1.0,
        # scores q.z / tau: tau = temperature_multiplier x sqrt(hidden) with score_scaling (Sachan et al.
        # 2021), else temperature_multiplier alone (DPR's tau = 1)
        temperature_multiplier=1.0, score_scaling=True,
        # micro-batches per step: ART accumulates gradients over them; contrastive methods keep the whole
        # global batch as negatives with cached gradients (one more forward pass of the towers)
        accumulation=1,
        hard_negatives=1,  # contrastive methods: hard negatives per question beside its positive
        # emdr2: the retriever term's marginal over the top-K, "sequence" (the paper's equation 6: whole
        # answers) or "token" (the reference code's: per answer token)
        marginalise="sequence",
        # a tower left untrained may not be shared with the trained one (retriever.shared_towers=False)
        train_question_tower=True, train_passage_tower=True,
        refresh_every=500, eval_every=500, log_every=10, eval_topk=(1, 5, 20, 50, 100),
        # "sync": the trainer stops and re-embeds the corpus every refresh_every steps; "async": it
        # checkpoints then and goes on, `art-jax refresh --workdir=...` builds the index beside it
        # and the trainer swaps to each published version at a step boundary
        refresh_mode="sync",
        checkpoint_every=500, keep_checkpoints=3,
        # after each evaluation the state is saved to WORKDIR/best/ if this dev metric ("top{k}", k in
        # eval_topk; "em" or "f1" for a reader; "" for none) beat every earlier one; top-20 is what DPR-style
        # work selects by, dev EM what reader work does
        best_metric="top20",
    ))
    # the reader demos' T5 (jobs/demo.py _prepare_reader): width, Hugging Face T5's initialisation scales times
    # reader_init_scale, and the decoder's cross-attention values and outputs the identity (it copies);
    # retriever_pretraining: steps of the ART demo (or of ICT, pretraining_method="ict") on the run's world that give
    # the end-to-end methods their initial retriever (0: the random BERT; a retriever.checkpoint given is used as it
    # is), at pretraining_learning_rate (0: the pretraining demo's own);
    # restate: every fact stated in two passages (demo_world.make_world); salient_spans: train on the masked
    # sentences of the world's passages (art-jax prepare-salient-spans) instead of its questions, the reader
    # first trained reader_pretraining steps to fill them in from their own passages (data.salient_source_passage)
    cfg.demo = ml_collections.ConfigDict(dict(enabled=False, entities=200, vocab_size=1500, hidden_size=64,
                                              layers=2, heads=4, initializer_range=0.15, dropout=0.1,
                                              reader_d_model=64, reader_init_scale=0.25, reader_copy_init=True,
                                              retriever_pretraining=0, pretraining_method="art",
                                              pretraining_learning_rate=0.0, restate=False,
                                              salient_spans=False, reader_pretraining=0))
    return cfg


def demo_config() -> ml_collections.ConfigDict:
    """The offline demos' shared settings (configs/demo.py, configs/dpr_demo.py): the generated
    world, a tiny random BERT, short inputs, a small batch at a high learning rate."""
    cfg = default_config()
    cfg.demo.enabled = True
    cfg.data.dataset = "demo"
    cfg.retriever.checkpoint = ""  # the demo's random BERT, unless one is given
    # a tiny random BERT: dropout noise on it stalls the bootstrap from random to matching names
    cfg.demo.dropout = 0.0
    # A random tiny BERT knows no words: with one shared tower a question and its passage map
    # the entity's name the same way from the start (what a pretrained init gives both towers in
    # the paper). Two separate random towers drift apart and never find the gold passages.
    cfg.retriever.shared_towers = True
    cfg.retriever.question_max_length = 16
    cfg.retriever.passage_max_length = 64
    cfg.retriever.train_passage_max_length = 64
    cfg.index.chunk_rows = 512
    cfg.index.embed_batch_size = 64
    cfg.index.progress = False
    cfg.train.batch_size = 32
    # post-LN towers need a long warmup at this rate
    cfg.train.learning_rate = 3e-3
    cfg.train.warmup_fraction = 0.1
    cfg.train.log_every = 25
    cfg.train.eval_topk = (1, 5, 20)
    return cfg


def art_demo_config() -> ml_collections.ConfigDict:
    """ART on the demo world (configs/demo.py; the reader demos pre-train their retriever with it):
    the Dirichlet query-likelihood teacher, no weights."""
    cfg = demo_config()
    cfg.scorer.kind = "query_likelihood"
    cfg.scorer.scale = 20.0  # the mean over ~10 question tokens becomes a sum, and sharper: a decisive teacher
    cfg.train.topk = 32
    cfg.train.steps = 400
    cfg.train.refresh_every = 25
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 100
    return cfg


def ict_demo_config() -> ml_collections.ConfigDict:
    """ICT on the demo world (configs/ict.py:demo; the MSS demo pre-trains its retriever with it): a
    passage's sentence finds the rest of its passage among the batch's."""
    cfg = demo_config()
    cfg.method = "ict"
    cfg.train.hard_negatives = 0
    cfg.train.steps = 150
    cfg.train.eval_every = cfg.train.checkpoint_every = 50
    return cfg


# The paper's per-dataset settings (art-recipe: examples/zero-shot-retriever-training): question
# files under data/ (DPR's names), global batch, top-K, epochs.
PAPER_DATASETS = {
    "nq": ("nq", 64, 32, 10),
    "trivia": ("trivia", 64, 32, 10),
    "squad": ("squad1", 64, 32, 10),
    "webq": ("webq", 16, 32, 20),
    "msmarco": ("msmarco", 512, 4, 10),  # the msmarco branch uses K=4 (the paper's text says 8)
}
TEACHERS = {
    "t0-3b": ("bigscience/T0_3B", 500),
    "t5-xxl-lm-adapt": ("google/t5-xxl-lm-adapt", 1000),  # the 11B teacher: batch 32, K=16, intervals 1000
}


def paper_config(dataset: str, teacher: str = "t0-3b") -> ml_collections.ConfigDict:
    """ART as the paper trains it on ``dataset`` with ``teacher``: BERT-base towers, AdamW 2e-5,
    refresh / evaluation / checkpoint at the teacher's interval."""
    if dataset not in PAPER_DATASETS or teacher not in TEACHERS:
        raise UserError(f"unknown dataset {dataset!r} or teacher {teacher!r}; "
                        f"datasets {sorted(PAPER_DATASETS)}, teachers {sorted(TEACHERS)}")
    files, batch, topk, epochs = PAPER_DATASETS[dataset]
    checkpoint, interval = TEACHERS[teacher]
    cfg = default_config()
    cfg.scorer.checkpoint = checkpoint
    cfg.data.corpus_store = "data/wikipedia_store"  # art-jax prepare-corpus --corpus psgs_w100.tsv ...
    cfg.data.dataset = dataset
    cfg.data.train_questions = f"data/{files}-train.qa.csv"
    cfg.data.dev_questions = f"data/{files}-dev.qa.csv"
    cfg.train.batch_size, cfg.train.topk, cfg.train.epochs = batch, topk, epochs
    if teacher == "t5-xxl-lm-adapt":
        cfg.train.batch_size, cfg.train.topk = 32, 16
    cfg.train.refresh_every = cfg.train.eval_every = cfg.train.checkpoint_every = interval
    # the reference trains the towers in fp16 with Megatron's activation checkpointing: bf16 compute and per-layer
    # remat are what fit 64 x 32 passages of 512 tokens (`art-jax train --dry-run` on 16 A100 40GB)
    cfg.retriever.dtype, cfg.retriever.remat = "bfloat16", True
    return cfg
