"""`art-jax <command>`: argument parsing only; each command calls one library stage."""

from __future__ import annotations

import argparse
import sys

from art_jax.errors import UserError


def _score(args) -> None:
    from art_jax.scorer import PromptConfig, T5Scorer
    from art_jax.scoring_jobs import rerank_results_file, score_pairs_file
    from art_jax.sharding import make_mesh

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
    from art_jax.models.hf import export, load_bert, load_tokenizer

    tower = load_bert(args.retriever)
    export(tower, load_tokenizer(args.retriever), args.out)
    print(f"wrote {args.out}")


def _selfcheck(args) -> None:
    from art_jax import selfcheck

    if not selfcheck.run()["ok"]:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    from art_jax.scorer import PromptConfig

    parser = argparse.ArgumentParser(prog="art-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("score", help="teacher (T5/T0) scores of passage-question pairs; UPR re-ranking")
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

    p = commands.add_parser("export", help="write a retriever tower as a Hugging Face BERT folder")
    p.add_argument("--retriever", required=True, help="checkpoint of the tower (Hugging Face folder or hub id)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.set_defaults(run=_export)

    p = commands.add_parser("selfcheck", help="prove the install works: tiny random models, end to end")
    p.set_defaults(run=_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as err:
        print(f"art-jax {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
