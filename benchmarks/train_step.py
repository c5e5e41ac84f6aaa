"""The ART train step: art_jax's jitted ``update`` vs a PyTorch peer on the same
checkpoint and the same batch, in one process, then the step time split of the real loop.

    python benchmarks/train_step.py                              # small BERT on CPU, a few minutes
    python benchmarks/train_step.py --hidden 768 --layers 12 --heads 12 --batch 16 \\
        --passage-length 256 --loop-steps 0 --dtype bfloat16 --peak-tflops 989  # BERT-base (a GPU)
    python benchmarks/train_step.py --scorer t5 --t5-size tiny   # the loop with a tiny T5 teacher
    python benchmarks/train_step.py --memory --hidden 768 --layers 12 --heads 12 --batch 64 \\
        --passage-length 256 --dtype bfloat16                    # the update's memory, compiled only

Part 1, the update. Both towers (separate weights) are loaded from one random BERT folder
written by transformers' ``save_pretrained``: art_jax's ``update`` jitted as
``art_jax.training.update.jit_update`` jits it (shardings, state donated) against transformers
``BertModel`` towers in train mode. Both take the same batch: B questions, K rows per
question retrieved from a random corpus of token ids (popular rows drawn more often, so
questions share passages as in real retrieval), the batch's unique rows re-embedded once
(``unique_passages``, U padded as the trainer pads it), and given teacher scores. Both do:
[CLS] embeddings with dropout, student log_softmax over K of q.d / (m sqrt(hidden)),
KL(teacher || student) averaged over B, backward, global-norm clip 1.0, AdamW (decay on
matrices only) with the warmup/decay schedule, a non-finite step skipped. Steps alternate
between the two (load from other processes hits both alike); each side's metrics are read
back every step, as the trainer does; torch runs on CUDA when it has it. Printed: ms/step
(best and median), the ratio transformers / art_jax, and the loss of both at the checkpoint
with dropout off (the same computation: equal to float32 rounding; to bfloat16's with
``--dtype bfloat16``, both sides' towers computing in it, torch under autocast, scores and
loss in float32). ``--peak-tflops`` adds both sides' rate and MFU at their median step, the
FLOPs the matrix products of art_jax's update (``benchmarks/flops.py``).

``--memory`` instead compiles art_jax's update alone for the same shapes with abstract weights
(no checkpoint, nothing run) on the default backend and prints that compiler's memory analysis
per device: what the README sets XLA:CPU's figures beside XLA:GPU's with.

Part 2, the loop. ``Trainer.train_step`` on the generated demo world (configs/demo.py at
the same tower size, dropout 0.1) after the first index is built: its own timers, search
(question tokenization, the question tower, exact top-K), scorer (the frozen teacher) and
update (unique rows, the store's token lookup, the jitted re-embed + update), as a table
with each stage's share of the step. Steps that compiled something (a new number of unique
rows or passage length) are counted and left out. ``--loop-steps 0`` skips it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.threads import add_threads_flag, pin_cpus  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
PAD, CLS, SEP = 0, 1, 2  # random token ids: which are special only matters to the mask


def retrieved_rows(questions: int, k: int, corpus: int, zipf: float, rng) -> np.ndarray:
    """[B, K] distinct rows per question; row r is drawn with weight 1 / (r + 1)^zipf,
    so popular passages come back for several questions (0: uniform, few repeats)."""
    weights = 1.0 / np.arange(1, corpus + 1) ** zipf
    return np.stack([rng.choice(corpus, k, replace=False, p=weights / weights.sum()) for _ in range(questions)])


def random_tokens(count: int, length: int, vocab: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``[CLS] ... [SEP]`` rows of random ids, lengths between half and all of ``length``."""
    lengths = rng.integers(length // 2, length + 1, count)
    ids = rng.integers(SEP + 1, vocab, (count, length)).astype(np.int32)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = CLS
    ids[np.arange(count), lengths - 1] = SEP
    return np.where(mask > 0, ids, PAD).astype(np.int32), mask


def make_batch(args, multiple: int) -> tuple[dict[str, np.ndarray], int]:
    """The update's batch (one micro-batch) and how many distinct rows the B x K hold."""
    from art_jax.methods.art import unique_passages

    rng = np.random.default_rng(args.seed)
    rows = retrieved_rows(args.batch, args.k, args.corpus, args.zipf, rng)
    unique_rows, positions = unique_passages(rows, 1, multiple)
    passage_ids, passage_mask = random_tokens(args.corpus, args.passage_length, args.vocab, rng)
    question_ids, question_mask = random_tokens(args.batch, args.question_length, args.vocab, rng)
    batch = {"question_ids": question_ids, "question_mask": question_mask, "passage_index": positions,
             "passage_ids": passage_ids[unique_rows], "passage_mask": passage_mask[unique_rows],
             "teacher_scores": rng.normal(0.0, 2.0, (args.batch, args.k)).astype(np.float32)}
    return batch, len(np.unique(rows))


def schedule_fraction(step: int, optim) -> float:
    """``learning_rate_schedule`` / peak at ``step``: linear warmup, then linear decay to 0."""
    warmup = int(optim.warmup_fraction * optim.total_steps)
    if step < warmup:
        return step / warmup
    return max(0.0, (optim.total_steps - step) / max(1, optim.total_steps - warmup))


class JaxStep:
    """art_jax: the towers, the optimizer and the jitted ``update`` as the trainer builds them,
    for ``method`` (a module of art_jax/methods/ with ``objective`` and ``batch_shardings``)."""

    def __init__(self, folder: str, optim, temperature_multiplier: float, method=None, dtype: str = "float32",
                 remat: bool = False, **objective_options):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from art_jax.core.sharding import make_mesh
        from art_jax.methods import art
        from art_jax.models.hf import load_bert, with_config
        from art_jax.training.state import ParamGroups, init_state, learning_rate_schedule, make_optimizer
        from art_jax.training.update import jit_update

        method = method or art
        self.mesh = make_mesh()
        towers = {role: load_bert(folder, dtype=dtype, remat=remat) for role in ("question", "passage")}
        self.towers, params = ParamGroups.split(towers)
        self.m = temperature_multiplier
        optimizer = make_optimizer(optim, self.towers, params)
        self.state = jax.device_put(init_state(params, optimizer, seed=0), NamedSharding(self.mesh, P()))

        def update(groups):
            objective = method.objective(groups, temperature_multiplier=temperature_multiplier, **objective_options)
            return objective, jit_update(objective, optimizer, learning_rate_schedule(optim), self.mesh,
                                         method.batch_shardings(self.mesh))

        self.objective, self._update = update(self.towers)
        # the model's FLOPs are those of the same step without remat's recomputation
        self._plain_update = self._update
        if remat:
            self._plain_update = update(ParamGroups.split({role: with_config(tower, remat=False)
                                                           for role, tower in towers.items()})[0])[1]

    def model_flops(self, batch: dict[str, np.ndarray]) -> float:
        from benchmarks.flops import matmul_flops

        return matmul_flops(self._plain_update, self.state, batch)

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        self.state, metrics = self._update(self.state, batch)
        return {name: float(value) for name, value in metrics.items()}

    def loss_without_dropout(self, batch: dict[str, np.ndarray]) -> float:
        import jax

        from art_jax.objectives import art_loss

        def loss(params, b):
            q = self.towers.module(params, "question").embed_cls(b["question_ids"], b["question_mask"])
            p = self.towers.module(params, "passage").embed_cls(b["passage_ids"][0], b["passage_mask"][0])
            return art_loss(q, p[b["passage_index"]], b["teacher_scores"], self.m)[0]

        return float(jax.jit(loss)(self.state.params, batch))


def autocast(torch, device: str, dtype: str):
    """The peer's counterpart of art_jax's compute dtype: bfloat16 matrix work under autocast,
    float32 parameters, optimizer and loss (as art_jax keeps them)."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


class TorchStep:
    """The peer: two transformers ``BertModel`` towers and the same loss and optimizer."""

    def __init__(self, folder: str, optim, temperature_multiplier: float, dtype: str = "float32",
                 remat: bool = False):
        import torch
        from transformers import BertModel

        self.torch, self.dtype = torch, dtype
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.towers = [BertModel.from_pretrained(folder, add_pooling_layer=False).to(self.device).train()
                       for _ in range(2)]
        if remat:  # as art_jax's retriever.remat: each layer's activations recomputed in the backward pass
            for tower in self.towers:
                tower.gradient_checkpointing_enable()
        self.params = [p for tower in self.towers for p in tower.parameters()]
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": optim.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=optim.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: schedule_fraction(s, optim))
        self.clip_norm, self.m = optim.clip_norm, temperature_multiplier

    def tensors(self, batch: dict[str, np.ndarray]) -> dict:
        """Ids and masks as int64 (what embedding lookups and indexing take), scores float32."""
        return {name: self.torch.from_numpy(value if value.dtype == np.float32 else value.astype(np.int64))
                .to(self.device) for name, value in batch.items()}

    def loss(self, b):
        torch = self.torch
        question, passage = self.towers
        with autocast(torch, self.device, self.dtype):
            q = question(input_ids=b["question_ids"], attention_mask=b["question_mask"]).last_hidden_state[:, 0]
            p = passage(input_ids=b["passage_ids"][0], attention_mask=b["passage_mask"][0]).last_hidden_state[:, 0]
        q, p = q.float(), p.float()  # scores and softmax in float32, as art_jax's
        scores = torch.einsum("bh,bkh->bk", q, p[b["passage_index"]]) / (self.m * q.shape[-1] ** 0.5)
        log_student = torch.log_softmax(scores, -1)
        log_teacher = torch.log_softmax(b["teacher_scores"], -1)
        return (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean()

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        torch = self.torch
        loss = self.loss(self.tensors(batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        if torch.isfinite(loss) and torch.isfinite(norm):
            self.optimizer.step()
        self.scheduler.step()
        return {"loss": float(loss.detach()), "grad_norm": float(norm)}

    def loss_without_dropout(self, batch: dict[str, np.ndarray]) -> float:
        for tower in self.towers:
            tower.eval()
        with self.torch.no_grad():
            loss = float(self.loss(self.tensors(batch)))
        for tower in self.towers:
            tower.train()
        return loss


def compare_update(args) -> None:
    import jax
    import torch

    remat = args.remat == "on"
    ours, peer = both_sides(args, lambda folder, optim: JaxStep(folder, optim, args.temperature_multiplier,
                                                                dtype=args.dtype, remat=remat),
                            lambda folder, optim: TorchStep(folder, optim, args.temperature_multiplier, args.dtype,
                                                            remat))
    batch, unique = make_batch(args, unique_multiple(args, ours.mesh.size))
    print(f"update: BERT towers hidden {args.hidden} x {args.layers} layers ({args.heads} heads, vocab {args.vocab}), "
          f"B={args.batch} K={args.k} Lq={args.question_length} Lp={args.passage_length}, "
          f"{unique} unique of {args.batch * args.k} retrieved rows padded to U={batch['passage_ids'].shape[1]} "
          f"(corpus {args.corpus:,}, zipf {args.zipf:g}); jax {jax.__version__} on {jax.device_count()} "
          f"{jax.default_backend()} device(s), torch {torch.__version__} on {peer.device} "
          f"({torch.get_num_threads()} CPU threads), compute {args.dtype}, remat {args.remat}")
    race(ours, peer, batch, batch, args, peer_label="transformers BertModel")


def both_sides(args, make_ours, make_peer):
    """(art_jax side, PyTorch side), each ``make_*(folder, optim)`` on one random BERT folder
    written by transformers (``args``' size), with the default optimizer settings; torch on
    every CPU the process may use (``--threads``), as XLA:CPU."""
    import torch
    import transformers

    from art_jax.training.state import OptimConfig
    from tests.hf_fixtures import make_bert_checkpoint

    transformers.logging.set_verbosity_error()  # the peer leaves the checkpoint's pooler unused
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the CPUs --threads left, as XLA:CPU's pool
    optim = OptimConfig()
    with tempfile.TemporaryDirectory() as folder:
        make_bert_checkpoint(folder, vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                             max_position_embeddings=max(512, args.passage_length))
        return make_ours(folder, optim), make_peer(folder, optim)


def race(ours, peer, ours_batch, peer_batch, args, *, peer_label: str) -> None:
    """Both sides' loss with dropout off, art_jax's compile, then steps alternating between
    the two; prints ms/step (best and median) and the ratio transformers / art_jax."""
    ours_loss, peer_loss = ours.loss_without_dropout(peer_batch), peer.loss_without_dropout(peer_batch)
    start = time.perf_counter()
    ours.step(ours_batch)  # compile
    print(f"  art_jax first step (compile) {time.perf_counter() - start:.1f} s")
    times = {"art_jax": [], "transformers": []}
    for repeat in range(args.warmup + args.repeats):
        for name, side, batch in (("art_jax", ours, ours_batch), ("transformers", peer, peer_batch)):
            start = time.perf_counter()
            side.step(batch)
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - start)
    best, median = ({name: f(t) for name, t in times.items()} for f in (min, statistics.median))
    width = max(28, len(peer_label) + 2)
    print(f"  {'':<{width}}{'best ms/step':>14}{'median ms/step':>16}")
    for name, label in (("art_jax", "art_jax update (jit)"), ("transformers", peer_label)):
        print(f"  {label:<{width}}{best[name] * 1e3:14.1f}{median[name] * 1e3:16.1f}")
    print(f"  loss at the checkpoint, dropout off: art_jax {ours_loss:.6f}, transformers {peer_loss:.6f} "
          f"(|difference| {abs(ours_loss - peer_loss):.1e})")
    print(f"ratio transformers / art_jax: {best['transformers'] / best['art_jax']:.2f}x (best of {args.repeats}; "
          f"medians {median['transformers'] / median['art_jax']:.2f}x)")
    if getattr(args, "peak_tflops", None):
        print_mfu(ours, ours_batch, median, args.peak_tflops)


def print_mfu(ours, batch, median: dict[str, float], peak_tflops: float) -> None:
    """Both sides' achieved rate and MFU at their median step. The FLOPs, for both sides, are the
    matrix products of art_jax's update counted in its jaxpr (benchmarks/flops.py): forward and
    backward, without remat's recomputation (``ours.model_flops``)."""
    from benchmarks.flops import rate_line

    flops = ours.model_flops(batch)
    print(f"  {flops / 1e12:.3g} TFLOP of matrix products per step: " + "; ".join(
        f"{name} {rate_line(flops / seconds, peak_tflops)}" for name, seconds in median.items()))


def unique_multiple(args, devices: int) -> int:
    """The trainer's padding of U: a multiple of an eighth of B x K, divisible over the devices."""
    from art_jax.core.batching import round_up

    return round_up(max(8, args.batch * args.k // 8), devices)


def abstract_state(modules: dict):
    """(groups, optimizer, optimizer settings, train state of shapes alone) of ``modules`` (by
    role, abstract), with the default AdamW, as the trainer builds them: what a memory analysis
    compiles against."""
    import jax

    from art_jax.training.state import OptimConfig, ParamGroups, init_state, make_optimizer

    groups, params = ParamGroups.split(modules)
    optim = OptimConfig()
    optimizer = make_optimizer(optim, groups, params)
    return groups, optimizer, optim, jax.eval_shape(lambda p: init_state(p, optimizer, seed=0), params)


def update_memory(args) -> None:
    """XLA's memory analysis of the compiled update at ``args``' shapes, weights abstract."""
    import jax
    import jax.numpy as jnp

    from art_jax.core.sharding import make_mesh
    from art_jax.methods import art
    from art_jax.models.shapes import abstract_bert
    from art_jax.training.state import learning_rate_schedule
    from art_jax.training.update import jit_update

    hf = dict(model_type="bert", vocab_size=args.vocab, max_position_embeddings=max(512, args.passage_length),
              type_vocab_size=2, hidden_size=args.hidden, num_hidden_layers=args.layers,
              num_attention_heads=args.heads, intermediate_size=4 * args.hidden)
    towers, optimizer, optim, state = abstract_state({role: abstract_bert(hf, dtype=args.dtype, with_pooler=False,
                                                                          remat=args.remat == "on")
                                                      for role in ("question", "passage")})
    mesh = make_mesh(devices=jax.devices()[:1])
    batch, unique = make_batch(args, unique_multiple(args, mesh.size))
    shapes = {name: jax.ShapeDtypeStruct(value.shape, jnp.asarray(value).dtype) for name, value in batch.items()}
    update = jit_update(art.objective(towers, temperature_multiplier=args.temperature_multiplier), optimizer,
                        learning_rate_schedule(optim), mesh, art.batch_shardings(mesh))
    start = time.perf_counter()
    analysis = update.lower(state, shapes).compile().memory_analysis()
    gib = 2 ** 30
    print(f"memory: the ART update, BERT towers hidden {args.hidden} x {args.layers} layers, B={args.batch} "
          f"K={args.k}, U={batch['passage_ids'].shape[1]} passages of {args.passage_length} tokens ({unique} "
          f"unique), compute {args.dtype}, one device; XLA:{jax.default_backend().upper()}'s memory_analysis "
          f"(jax {jax.__version__}), compiled in {time.perf_counter() - start:.0f} s: arguments "
          f"{analysis.argument_size_in_bytes / gib:.2f} GiB, outputs {analysis.output_size_in_bytes / gib:.2f}, "
          f"aliased {analysis.alias_size_in_bytes / gib:.2f}, temporaries {analysis.temp_size_in_bytes / gib:.2f}")


def loop_split(args) -> None:
    import jax

    from art_jax.config import load_config
    from art_jax.jobs.demo import prepare_demo
    from art_jax.methods import make_trainer

    cfg = load_config(os.path.join(ROOT, "configs", "demo.py"))
    cfg.demo.update(hidden_size=args.hidden, layers=args.layers, heads=args.heads, entities=args.entities,
                    dropout=0.1)
    cfg.train.batch_size, cfg.train.topk = args.batch, args.k
    cfg.train.steps = args.loop_warmup + args.loop_steps
    cfg.train.refresh_every = cfg.train.eval_every = cfg.train.checkpoint_every = cfg.train.steps + 1
    with tempfile.TemporaryDirectory() as workdir:
        teacher = "query_likelihood (Dirichlet, jitted)"
        if args.scorer == "t5":
            from benchmarks.score import SIZES
            from tests.hf_fixtures import make_t5_checkpoint

            cfg.scorer.kind, cfg.scorer.dtype = "t5", args.scorer_dtype
            cfg.scorer.checkpoint = make_t5_checkpoint(os.path.join(workdir, "t5"), version="1.1", vocab_size=32128,
                                                       **SIZES[args.t5_size])
            teacher = f"T5 v1.1 '{args.t5_size}' {args.scorer_dtype}, batch {cfg.scorer.batch_size}"
        prepare_demo(cfg, workdir)
        trainer = make_trainer(cfg, workdir)
        start = time.perf_counter()
        trainer.resume()  # the first index, from the initial passage tower
        print(f"loop: demo world of {len(trainer.method.store):,} passages, B={args.batch} K={args.k}, "
              f"teacher {teacher}; first index built in {time.perf_counter() - start:.1f} s")
        compiles: list[float] = []  # seconds of XLA compilation in the step under way
        jax.monitoring.register_event_duration_secs_listener(
            lambda event, seconds, **_: compiles.append(seconds) if event == COMPILE_EVENT else None)
        records = []
        for step in range(cfg.train.steps):
            compiles.clear()
            records.append({**trainer.train_step(step), "compile": sum(compiles)})
        trainer.checkpoints.close()
    timed = records[args.loop_warmup:]
    steady = [r for r in timed if not r["compile"]]
    print(f"  {len(steady)} of {len(timed)} steps after {args.loop_warmup} warm-up compiled nothing"
          + (f"; the other {len(timed) - len(steady)} met a new shape (unique rows, passage or prompt length), "
             f"spent {sum(r['compile'] for r in timed):.1f} s compiling and are left out" if len(steady) < len(timed)
             else ""))
    if not steady:
        return
    stages = (("search", "search: question tower + exact top-K"), ("scorer", "scorer: frozen teacher"),
              ("batch", "batch: store lookup, dedupe, placement"), ("update", "update: re-embed + AdamW"))
    totals = {name: sum(r[f"time_{name}"] for r in steady) for name, _ in stages}
    print(f"  {'stage':<42}{'median ms':>10}{'mean ms':>10}{'share':>8}")
    for name, label in stages:
        median = statistics.median(r[f"time_{name}"] for r in steady)
        print(f"  {label:<42}{median * 1e3:10.1f}{totals[name] / len(steady) * 1e3:10.1f}"
              f"{totals[name] / sum(totals.values()):8.1%}")
    median_step = statistics.median(sum(r[f"time_{name}"] for name, _ in stages) for r in steady)
    print(f"  {'step':<42}{median_step * 1e3:10.1f}{sum(totals.values()) / len(steady) * 1e3:10.1f}{1:8.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=30522, help="update comparison only (the demo trains its own)")
    parser.add_argument("--batch", type=int, default=16, help="questions per step (B)")
    parser.add_argument("--k", type=int, default=32, help="retrieved passages per question (K)")
    parser.add_argument("--question-length", type=int, default=32)
    parser.add_argument("--passage-length", type=int, default=128, help="update comparison (the demo's: 64)")
    parser.add_argument("--corpus", type=int, default=10000, help="rows the random batch is retrieved from")
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity skew of the retrieved rows (0: uniform)")
    parser.add_argument("--temperature-multiplier", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the towers' compute dtype (parameters stay float32; torch under autocast)")
    parser.add_argument("--remat", choices=("off", "on"), default="off", help="the towers' rematerialisation "
                        "(art_jax's retriever.remat; transformers' gradient checkpointing)")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense peak for --dtype, to print MFU "
                        "(H100/H200 SXM bfloat16: 989)")
    parser.add_argument("--memory", action="store_true", help="only compile the update and print its memory")
    parser.add_argument("--loop-steps", type=int, default=20, help="timed Trainer.train_step calls (0: skip)")
    parser.add_argument("--loop-warmup", type=int, default=5)
    parser.add_argument("--entities", type=int, default=200, help="demo world size (2 passages each)")
    parser.add_argument("--scorer", choices=("query_likelihood", "t5"), default="query_likelihood")
    parser.add_argument("--t5-size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--scorer-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    add_threads_flag(parser)
    args = parser.parse_args()
    pin_cpus(args.threads)
    if args.memory:
        return update_memory(args)
    compare_update(args)
    if args.loop_steps:
        loop_split(args)


if __name__ == "__main__":
    main()
