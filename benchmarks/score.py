"""Teacher scoring throughput: art_jax vs transformers (PyTorch) on the same checkpoint
and the same pairs, in one process. Prints pairs/s and the ratio.

    python benchmarks/score.py                 # t5-small-sized v1.1 model, 512 pairs
    python benchmarks/score.py --size tiny     # a quick look
    python benchmarks/score.py --paper-shape bigscience/T0_3B --dtype bfloat16 --batch-size 64 \
        --peak-tflops 989                      # T0-3B's forward alone: MFU (a GPU)

Both sides start from strings and include tokenization; both compute float32 on CPU
(``--dtype bfloat16`` times art_jax's default teacher precision as an extra line).
The peer is timed twice: in input order and sorted by length (art_jax sorts), and the
ratio is taken against the faster of the two. It also prints the achieved FLOP rate of
one fixed-shape scorer forward (best of ``--repeats``; FLOPs the matrix products of its jaxpr,
``benchmarks/flops.py``) and, given ``--peak-tflops`` (the chip's dense peak for the dtype,
e.g. 989 for bf16 on an H100 SXM), its MFU. ``--paper-shape`` times that forward alone at a
paper model's shapes (``art_jax/models/shapes.py``), random weights, no peer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.threads import add_threads_flag, pin_cpus  # noqa: E402

SIZES = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
}


def make_pairs(count: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Passages of 40-120 words and questions of 6-14 words from a fixed word list."""
    from tests.hf_fixtures import CORPUS

    words = " ".join(CORPUS).replace(".", "").split()
    rng = np.random.default_rng(seed)
    pick = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    titles = [pick(rng.integers(1, 4)) for _ in range(count)]
    texts = [pick(rng.integers(40, 120)) + "." for _ in range(count)]
    questions = [pick(rng.integers(6, 14)) + "?" for _ in range(count)]
    return titles, texts, questions


def torch_scores(model, tokenizer, titles, texts, questions, batch_size: int, sort: bool) -> np.ndarray:
    """The natural transformers implementation of the ART score, with the same prompt."""
    import torch

    from art_jax.data.prompts import PromptBuilder

    builder = PromptBuilder(tokenizer)
    enc, dec = builder.encoder_ids(titles, texts), builder.decoder_ids(questions)
    order = np.argsort([len(r) for r in enc], kind="stable") if sort else np.arange(len(enc))
    out = np.empty(len(enc), np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            e = tokenizer.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
            d = tokenizer.pad({"input_ids": [dec[i] for i in idx]}, return_tensors="pt")
            labels = d["input_ids"].masked_fill(d["attention_mask"] == 0, -100)
            logits = model(input_ids=e["input_ids"], attention_mask=e["attention_mask"], labels=labels).logits
            logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            mask = d["attention_mask"].float()
            out[idx] = ((logp * mask).sum(-1) / mask.sum(-1)).numpy()
    return out


def timed(fn, repeats: int):
    fn()  # warm-up: compilation, allocator, thread pools
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def forward_flop_rate(model, batch: int, enc_len: int, dec_len: int, repeats: int = 10) -> tuple[float, object]:
    """(model FLOP/s, the compiled program's memory analysis) of the jitted scorer forward at
    one shape, FLOPs the matrix products of its jaxpr (benchmarks/flops.py)."""
    import jax

    from art_jax.teachers.t5 import _teacher_scores, teacher_scores
    from benchmarks.flops import matmul_flops

    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    args = (rng.integers(2, vocab, (batch, enc_len), dtype=np.int32), np.ones((batch, enc_len), np.int32),
            rng.integers(2, vocab, (batch, dec_len), dtype=np.int32), np.ones((batch, dec_len), np.int32))
    args = jax.device_put(args)
    compiled = _teacher_scores.lower(model, *args).compile()
    seconds, _ = timed(lambda: jax.block_until_ready(compiled(model, *args)), repeats)
    return matmul_flops(teacher_scores, model, *args) / seconds, compiled.memory_analysis()


def paper_shape(args) -> None:
    """The teacher forward alone at a paper model's shapes (models/shapes.py), random weights in
    ``--dtype`` as ``T5Scorer`` keeps them: no checkpoint, no peer (what MFU needs)."""
    import jax
    from flax import nnx

    from art_jax.models.hf import t5_config_from_hf
    from art_jax.models.shapes import KNOWN_CONFIGS, parameter_bytes
    from art_jax.models.t5 import T5
    from benchmarks.flops import rate_line

    hf = KNOWN_CONFIGS[args.paper_shape]
    cfg = t5_config_from_hf(hf, {}, untied_lm_head=hf.get("tie_word_embeddings", True) is False,
                            dtype=args.dtype, param_dtype=args.dtype)
    with nnx.use_eager_sharding(False):  # one device: no mesh to place the logical axes on
        model = T5(cfg, rngs=nnx.Rngs(0))
    params = parameter_bytes(nnx.state(model, nnx.Param))
    flop_rate, memory = forward_flop_rate(model, args.batch_size, args.encoder_length, args.decoder_length,
                                          args.repeats)
    print(f"{args.paper_shape} ({params / 2 ** 30:.2f} GiB of {args.dtype} parameters), random weights; jax "
          f"{jax.__version__} on {jax.devices()[0].device_kind}; scorer forward at [{args.batch_size} x "
          f"{args.encoder_length} -> {args.decoder_length}]: {rate_line(flop_rate, args.peak_tflops)}; "
          f"XLA:{jax.default_backend().upper()}'s temporaries {memory.temp_size_in_bytes / 2 ** 30:.2f} GiB")


def main() -> None:
    from art_jax.models.shapes import KNOWN_CONFIGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak of the device for --dtype, to print MFU (H100 SXM bf16: 989)")
    parser.add_argument("--paper-shape", choices=sorted(name for name, hf in KNOWN_CONFIGS.items()
                                                        if hf["model_type"] == "t5"),
                        help="time the forward alone at this T5's shapes: random weights, no peer")
    parser.add_argument("--encoder-length", type=int, default=512, help="with --paper-shape")
    parser.add_argument("--decoder-length", type=int, default=32, help="with --paper-shape")
    add_threads_flag(parser)
    args = parser.parse_args()
    cpus = pin_cpus(args.threads)
    if args.paper_shape:
        return paper_shape(args)

    import jax
    import torch
    from transformers import T5ForConditionalGeneration

    from art_jax.teachers.t5 import T5Scorer
    from tests.hf_fixtures import make_t5_checkpoint

    torch.set_num_threads(cpus)
    titles, texts, questions = make_pairs(args.pairs)
    with tempfile.TemporaryDirectory() as folder:
        make_t5_checkpoint(folder, version="1.1", vocab_size=32128, **SIZES[args.size])
        peer = T5ForConditionalGeneration.from_pretrained(folder).eval()
        ours = T5Scorer.from_pretrained(folder, dtype="float32")
        ours_lowp = T5Scorer.from_pretrained(folder, dtype="bfloat16") if args.dtype == "bfloat16" else None
    tokenizer = ours.builder.tokenizer

    print(f"T5 v1.1 '{args.size}' ({SIZES[args.size]}, vocab 32128), {args.pairs} pairs, batch {args.batch_size}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    t_ours, s_ours = timed(lambda: ours.score(titles, texts, questions, batch_size=args.batch_size), args.repeats)
    t_peer, s_peer = timed(lambda: torch_scores(peer, tokenizer, titles, texts, questions, args.batch_size, False),
                           args.repeats)
    t_sorted, s_sorted = timed(lambda: torch_scores(peer, tokenizer, titles, texts, questions, args.batch_size,
                                                    True), args.repeats)
    diff = float(np.max(np.abs(s_ours - s_peer)))
    rate = lambda t: args.pairs / t  # noqa: E731
    print(f"  art_jax float32               {rate(t_ours):9.1f} pairs/s")
    print(f"  transformers, input order     {rate(t_peer):9.1f} pairs/s")
    print(f"  transformers, sorted by length{rate(t_sorted):9.1f} pairs/s")
    print(f"  max |score difference|        {diff:.2e}")
    print(f"ratio art_jax / best transformers: {min(t_peer, t_sorted) / t_ours:.2f}x (goal >= 1.5x on CPU)")
    if ours_lowp is not None:
        t_lowp, _ = timed(lambda: ours_lowp.score(titles, texts, questions, batch_size=args.batch_size),
                          args.repeats)
        print(f"  art_jax bfloat16              {rate(t_lowp):9.1f} pairs/s")
    from benchmarks.flops import rate_line

    flop_rate, _ = forward_flop_rate((ours_lowp or ours).model, args.batch_size, 512, 32)
    print(f"scorer forward at [{args.batch_size} x 512 -> 32], {args.dtype}: {rate_line(flop_rate, args.peak_tflops)}")


if __name__ == "__main__":
    main()
