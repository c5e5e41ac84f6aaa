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
    from art_jax.core.distributed import barrier, is_lead
    from art_jax.models.hf import export, load_bert, load_tokenizer

    if is_lead():  # one writer of the folder in a multi-process job
        export(load_bert(args.retriever), load_tokenizer(args.retriever), args.out)
    barrier("art_jax.export")
    print(f"wrote {args.out}")


def _prepare_corpus(args) -> None:
    from art_jax.data.corpus import TokenizerSpec, prepare_corpus
    from art_jax.models.hf import load_tokenizer

    scorer = TokenizerSpec(args.scorer, args.scorer_max_length) if args.scorer else None
    store = prepare_corpus(args.corpus, args.out, load_tokenizer(args.retriever),
                           TokenizerSpec(args.retriever, args.retriever_max_length),
                           load_tokenizer(args.scorer) if args.scorer else None, scorer,
                           batch_size=args.batch_size, skip_bad_rows=args.skip_bad_rows)
    print(f"wrote {args.out}: {len(store)} passages, {store.meta['skipped_rows']} bad row(s) skipped")


def _embed(args) -> None:
    from art_jax.data.corpus import CorpusStore
    from art_jax.retrieval.embed import embed_corpus, load_passage_tower

    store = CorpusStore(args.corpus)
    path = embed_corpus(load_passage_tower(args.retriever), store, args.out, checkpoint=args.retriever,
                        version=args.version, dtype=args.dtype, max_length=args.max_length,
                        chunk_rows=args.chunk_rows, batch_size=args.batch_size)
    print(f"published {path}")


def _search(args) -> None:
    import json

    from art_jax.core.sharding import make_mesh
    from art_jax.data.questions import read_questions
    from art_jax.evaluation.answers import format_table
    from art_jax.jobs.search import search_file
    from art_jax.retrieval.encoder import DualEncoder
    from art_jax.retrieval.index import IndexVersion
    from art_jax.retrieval.results import open_corpus_for
    from art_jax.retrieval.search import ShardedIndex

    questions = read_questions(args.questions)
    version = IndexVersion.open(args.index)
    store = open_corpus_for(version, args.corpus)
    index = ShardedIndex.from_version(version, make_mesh(), rows_per_device=args.rows_per_device)
    encoder = DualEncoder.from_pretrained(args.retriever, shared=True)
    encoder.question_max_length = args.max_length
    accuracy = search_file(encoder, version, index, store, questions, args.out, args.topk,
                           batch_size=args.batch_size, match=args.match)
    print(f"wrote {args.out}: {len(questions)} questions x top-{args.topk} from {version.path}")
    print(format_table(accuracy))
    print(json.dumps({"top_k": {str(k): a for k, a in accuracy.items()}}))


def _evaluate(args) -> None:
    import json

    from art_jax.evaluation.answers import evaluate_file, format_table

    report = evaluate_file(args.results, args.match, args.topk, args.annotated_out)
    print(format_table({int(k): a for k, a in report["top_k"].items()}))
    print(json.dumps(report))


def _train(args) -> None:
    from art_jax.config import load_config
    from art_jax.core.distributed import is_lead
    from art_jax.train import Trainer

    cfg = load_config(args.config, args.overrides)
    if cfg.demo.enabled:
        from art_jax.data.demo import prepare_demo

        prepare_demo(cfg, args.workdir)
    result = Trainer(cfg, args.workdir).run()
    if result["before"] and is_lead():
        gains = ", ".join(f"top-{k} {100 * result['before'][k]:.1f}% -> {100 * result['after'][k]:.1f}%"
                          for k in sorted(result["after"]))
        print(f"dev accuracy: {gains}")


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

    p = add_command("export", help="write a retriever tower as a Hugging Face BERT folder")
    p.add_argument("--retriever", required=True, help="checkpoint of the tower (Hugging Face folder or hub id)")
    p.add_argument("--out", required=True, help="output folder (replaced whole; a gs:// one is deleted, then uploaded)")
    p.set_defaults(run=_export)

    p = add_command("prepare-corpus", help="stream an evidence TSV/JSONL into a pre-tokenized store")
    p.add_argument("--corpus", required=True, help="DPR evidence TSV (id, text, title) or JSONL")
    p.add_argument("--retriever", required=True, help="retriever checkpoint whose tokenizer to use")
    p.add_argument("--scorer", help="scorer (T5/T0) checkpoint whose tokenizer to use, for training")
    p.add_argument("--out", required=True, help="store folder (replaced whole; a gs:// one is deleted, then uploaded)")
    p.add_argument("--retriever-max-length", type=int, default=512,
                   help="tokens kept per passage (indexing re-cuts to 256, training re-embeds at 512)")
    p.add_argument("--scorer-max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--skip-bad-rows", action="store_true", help="count and report bad rows instead of failing")
    p.set_defaults(run=_prepare_corpus)

    p = add_command("embed", help="embed a prepared corpus into a new index version")
    p.add_argument("--retriever", required=True, help="checkpoint of the passage tower")
    p.add_argument("--corpus", required=True, help="corpus store from prepare-corpus")
    p.add_argument("--out", required=True, help="index folder; the version is published inside it")
    p.add_argument("--version", type=int, help="version number (default: the one after the newest)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--chunk-rows", type=int, default=8192, help="rows per written (and resumable) chunk")
    p.set_defaults(run=_embed)

    p = add_command("search", help="exact top-K retrieval for a question file -> DPR-format results")
    p.add_argument("--retriever", required=True, help="checkpoint of the question tower")
    p.add_argument("--index", required=True, help="index folder (newest version) or one version folder")
    p.add_argument("--questions", required=True, help="TSV question<TAB>[answers], DPR JSON or JSONL")
    p.add_argument("--out", required=True)
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--corpus", help="corpus store (default: the one recorded in the index)")
    p.add_argument("--match", default="string", choices=("string", "regex"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256, help="question tokens")
    p.add_argument("--rows-per-device", type=int, help="index rows each device scores per block")
    p.set_defaults(run=_search)

    p = add_command("evaluate", help="top-K accuracy of DPR-format results (DPR's answer matching)")
    p.add_argument("--results", required=True)
    p.add_argument("--match", default="string", choices=("string", "regex"))
    p.add_argument("--topk", type=int, nargs="+", default=[1, 5, 20, 50, 100])
    p.add_argument("--annotated-out", help="write the results with has_answer recomputed")
    p.set_defaults(run=_evaluate)

    p = add_command("train", help="train the dual encoder with ART (configs/*.py)")
    p.add_argument("--config", required=True, help="config file defining get_config(), optionally FILE.py:ARG")
    p.add_argument("--workdir", required=True, help="checkpoints, indexes, metrics and the resolved config")
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


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train` takes ml_collections-style overrides: --config.train.steps=100
    unknown = [a for a in extra if args.command != "train" or not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = extra
    try:
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
