"""The FiD reader: art_jax's jitted train step and greedy generation vs transformers'
T5ForConditionalGeneration (PyTorch) on the same checkpoint and the same batch, in one process,
and the compiler's memory figures of the train step at the paper's scale.

    python benchmarks/reader.py                                  # all three parts (see below for times)
    python benchmarks/reader.py --part step                      # one part: step | generate | memory
    python benchmarks/reader.py --part step --d-model 768 --d-ff 3072 --layers 12 --heads 12 \\
        --k 50 --passage-length 512 --batch 1 --answer-length 32  # T5-base FiD (a GPU)
    python benchmarks/reader.py --part memory --memory-dtypes float32   # two of its four compiles
    python benchmarks/reader.py --part memory --memory-remat on         # the two with remat

The checkpoint (parts 1 and 2) is a random T5 v1.0 (ReLU FFN, head tied to the embedding, as
FiD's t5-base) written by transformers' ``save_pretrained`` at ``--d-model`` etc. (vocab 32128),
then edited twice: the decoder's attention and feed-forward output projections are scaled by
``--lively`` (a random tied v1.0 decoder otherwise says one token whatever the memory, see
tests/test_generation.py), and the embedding row of </s> (id 1) is zeroed, so that its tied
logit is exactly 0 while the largest of the 32k other random logits is positive: neither side
ever emits </s>, and generation runs all ``--max-new-tokens`` steps with both sides' stopping
checks still in place (checked: no </s> in either output). Inputs are random token ids: B
questions of K passages of N tokens (lengths between N/2 and N, </s> last, padding 0), answers
of 2..T tokens ending in </s>.

Part 1, ``--part step``: one FiD training step. art_jax: ``training.update.jit_update`` with
``methods.fid.loss`` (the reader loaded by ``load_t5`` with dropout ``--dropout``; K passages
encoded separately as one [B*K, N] batch, the decoder over their concatenation [B, K*N, D],
token-mean NLL ``objectives.fid_nll``, backward, global-norm clip 1.0, AdamW with decay on
matrices only and the warmup/decay schedule, the state donated), as ``method=fid`` trains.
transformers: the encoder over [B*K, N], its output reshaped to [B, K*N, D] and given as
``encoder_outputs`` with the [B, K*N] mask and the labels (padding -100) to the model in train
mode (the same dropout), ``loss.backward()``, ``clip_grad_norm_``, ``torch.optim.AdamW`` (same
groups and schedule). Steps alternate between the two (``benchmarks/train_step.py``'s ``race``);
each side's loss is read back every step. Printed: ms/step (best and median), the ratio
transformers / art_jax, and both losses with dropout off (the same computation: equal to
float32 rounding, checked; 2% with ``--dtype bfloat16``, where both sides compute in it,
transformers under autocast, the loss in float32). ``--remat on`` rematerialises each block
on both sides (art_jax's ``reader.remat``, transformers' gradient checkpointing);
``--peak-tflops`` adds both sides' rate and MFU at their median step, the FLOPs the matrix
products of the same step without remat (``benchmarks/flops.py``).

Part 2, ``--part generate``: greedy answers of ``--generate-batch`` questions from their
token ids. art_jax: ``evaluation.predict.generate`` (what `art-jax answer` runs: ``packed_fid_encode``
and ``greedy_decode`` with its key/value cache in one ``nnx.jit``; the encoder skips the padding,
each question's real tokens packed into ``encoder_capacity`` slots, as `answer` packs them: the
batch's fullest question rounded up to 1/16 of K x N; the decoder reads that packed memory, so
its cross-attention skips the padding too). transformers: the encoder
over [B*K, N] under ``inference_mode``, reshaped, then ``generate(encoder_outputs=...,
attention_mask=..., max_new_tokens=..., num_beams=1, do_sample=False)`` with its own cache (an
``EncoderDecoderCache``), on all threads and on one. Both are also timed in halves (art_jax's
``packed_fid_encode`` and ``greedy_decode`` jitted apart; the encoder call and ``generate``), so the
ratio of each half shows where a difference comes from (both halves of art_jax skip the padding:
its decoder reads the real tokens' keys, transformers' all K x N). Printed: ms per batch (best, median),
questions/s, the ratios, and whether the tokens are the same.

Part 3, ``--part memory``: no weights and no run. The whole FiD train step (the same
``jit_update`` with AdamW) at T5-base's shapes (vocab 32128, d_model 768, d_kv 64, d_ff 3072,
12+12 layers, 12 heads, v1.0 ReLU FFN, tied head), one question per device with
``--memory-passages`` K=50 of ``--memory-length`` N=512 tokens and answers of T=32, lowered
with abstract inputs (``nnx.eval_shape`` of the model, ``jax.eval_shape`` of the optimizer
state, ``jax.ShapeDtypeStruct`` batch), compiled for the default backend, and
``compiled.memory_analysis()`` read: for float32 and bfloat16 compute (float32 parameters and
optimizer state), each without and with remat. Printed per device, GiB: arguments (parameters
+ AdamW state + batch), outputs, the part of the outputs aliased to the donated arguments,
temporaries (XLA's buffer assignment of everything live in between), and the peak estimate
arguments + outputs - aliased + temporaries. On this CPU these are XLA:CPU's figures: a GPU's
or TPU's compiler fuses and schedules differently, so its figures differ (the arguments do not);
on a GPU the same command prints XLA:GPU's.

Times on 2 CPU cores shared with other jobs: parts 1 and 2 a few minutes each; part 3 compiles
T5-base's train step four times, 2.5 to 7 minutes each there.

torch runs on CUDA when it has it. Threads: both sides get the CPUs the process may use
(``--threads N``: the first N, set as the process's affinity before XLA:CPU sizes its thread pool
by it, and ``torch.set_num_threads(N)``). On a CPU shared with other work, torch's OpenMP
threads can spend most of an op waiting on each other (XLA:CPU suffers less), which hurts
generation's many small ops most; so part 2 also times transformers on one thread and prints the
ratio against each, and on a busy machine part 1 is worth a second run with ``--threads 1``.
Every part prints the load average.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.threads import add_threads_flag, pin_cpus  # noqa: E402
from benchmarks.train_step import abstract_state, autocast, race, schedule_fraction  # noqa: E402

PAD, EOS = 0, 1
GiB = 1024 ** 3
BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12)


def load_average() -> str:
    return (f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
            f"({len(os.sched_getaffinity(0))} used)")


def make_checkpoint(folder: str, args) -> str:
    """The random v1.0 T5 folder of the module docstring (lively decoder, </s> never chosen)."""
    from safetensors.torch import load_file, save_file

    from tests.hf_fixtures import make_t5_checkpoint

    make_t5_checkpoint(folder, version="1.0", vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_kv,
                       d_ff=args.d_ff, num_layers=args.layers, num_decoder_layers=args.layers,
                       num_heads=args.heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       dropout_rate=args.dropout)
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    for name in weights:
        if name.startswith("decoder.") and name.endswith((".o.weight", ".wo.weight")):
            weights[name] = weights[name] * args.lively
        if name == "shared.weight" or name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            weights[name][EOS] = 0.0  # every copy of the tied table, so that it still reads as tied
    save_file(weights, path, metadata={"format": "pt"})
    return folder


def make_batch(args, questions: int) -> dict[str, np.ndarray]:
    """FiD's step arrays (``methods.reading.READER_ARRAYS``) of random token ids."""
    rng = np.random.default_rng(args.seed)
    k, n, t = args.k, args.passage_length, args.answer_length

    def rows(count: int, length: int, shortest: int) -> tuple[np.ndarray, np.ndarray]:
        lengths = rng.integers(shortest, length + 1, count)
        ids = rng.integers(EOS + 2, min(args.vocab, 32000), (count, length)).astype(np.int32)
        ids[np.arange(count), lengths - 1] = EOS
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        return np.where(mask > 0, ids, PAD).astype(np.int32), mask

    ids, mask = rows(questions * k, n, n // 2)
    labels, label_mask = rows(questions, t, 2)
    return {"reader_ids": ids.reshape(questions, k, n), "reader_mask": mask.reshape(questions, k, n),
            "labels": labels, "label_mask": label_mask}


def describe(args, questions: int) -> str:
    return (f"T5 v1.0 d_model {args.d_model} (d_kv {args.d_kv}, d_ff {args.d_ff}, {args.heads} heads) "
            f"{args.layers}+{args.layers} layers, vocab {args.vocab}; B={questions} K={args.k} "
            f"N={args.passage_length}")


def fid_objective(groups):
    from art_jax.methods import fid
    from art_jax.methods.reading import reader_keys
    from art_jax.training.update import Objective

    return Objective(functools.partial(fid.loss, groups), keys=reader_keys)


def fid_shardings(mesh):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from art_jax.methods.reading import READER_ARRAYS

    return {name: NamedSharding(mesh, P("data")) for name in READER_ARRAYS}  # as methods.fid.Fid places them


class FidJaxStep:
    """art_jax: the reader, AdamW and the jitted update as ``method=fid`` builds them."""

    def __init__(self, folder: str, optim, dropout: float, dtype: str = "float32", remat: bool = False):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from art_jax.core.sharding import make_mesh
        from art_jax.models.hf import load_t5, with_config
        from art_jax.training.state import ParamGroups, init_state, learning_rate_schedule, make_optimizer
        from art_jax.training.update import jit_update

        self.mesh = make_mesh()
        reader = load_t5(folder, dropout_rate=dropout, dtype=dtype, remat=remat)
        self.groups, params = ParamGroups.split({"reader": reader})
        optimizer = make_optimizer(optim, self.groups, params)
        self.state = jax.device_put(init_state(params, optimizer, seed=0), NamedSharding(self.mesh, P()))
        jitted = functools.partial(jit_update, optimizer=optimizer, schedule=learning_rate_schedule(optim),
                                   mesh=self.mesh, batch_shardings=fid_shardings(self.mesh))
        self._update = jitted(fid_objective(self.groups))
        # the model's FLOPs are those of the same step without remat's recomputation
        self._plain_update = jitted(fid_objective(ParamGroups.split({"reader": with_config(reader, remat=False)})[0]))

    def model_flops(self, batch: dict[str, np.ndarray]) -> float:
        from benchmarks.flops import matmul_flops

        return matmul_flops(self._plain_update, self.state, batch)

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        self.state, metrics = self._update(self.state, batch)
        return {name: float(value) for name, value in metrics.items()}

    def loss_without_dropout(self, batch: dict[str, np.ndarray]) -> float:
        import jax

        from art_jax.methods import fid

        # keys None: no dropout anywhere
        self.clean_loss = float(jax.jit(lambda p, b: fid.loss(self.groups, p, b, (None, None))[0])(
            self.state.params, batch))
        return self.clean_loss


class FidTorchStep:
    """The peer: T5ForConditionalGeneration in train mode, FiD's encoder reshape, its own loss."""

    def __init__(self, folder: str, optim, dropout: float, dtype: str = "float32", remat: bool = False):
        import torch
        from transformers import T5ForConditionalGeneration

        self.torch, self.dtype = torch, dtype
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = T5ForConditionalGeneration.from_pretrained(folder, dropout_rate=dropout).to(self.device).train()
        if remat:
            self.model.gradient_checkpointing_enable()  # per block, as art_jax's reader.remat
        self.params = list(self.model.parameters())  # the tied head is the embedding: counted once
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": optim.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=optim.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: schedule_fraction(s, optim))
        self.clip_norm = optim.clip_norm

    def loss(self, batch: dict[str, np.ndarray]):
        from transformers.modeling_outputs import BaseModelOutput

        torch = self.torch
        b, k, n = batch["reader_ids"].shape
        ids, mask = (torch.from_numpy(batch[name].astype(np.int64)).to(self.device)
                     for name in ("reader_ids", "reader_mask"))
        labels = torch.from_numpy(np.where(batch["label_mask"] > 0, batch["labels"], -100).astype(np.int64))
        labels = labels.to(self.device)
        with autocast(torch, self.device, self.dtype):
            encoded = self.model.encoder(input_ids=ids.view(b * k, n),
                                         attention_mask=mask.view(b * k, n)).last_hidden_state
            memory = BaseModelOutput(last_hidden_state=encoded.reshape(b, k * n, encoded.shape[-1]))
            return self.model(encoder_outputs=memory, attention_mask=mask.view(b, k * n), labels=labels).loss

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        torch = self.torch
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        if torch.isfinite(loss) and torch.isfinite(norm):
            self.optimizer.step()
        self.scheduler.step()
        return {"loss": float(loss.detach()), "grad_norm": float(norm)}

    def loss_without_dropout(self, batch: dict[str, np.ndarray]) -> float:
        self.model.eval()
        with self.torch.no_grad():
            self.clean_loss = float(self.loss(batch))
        self.model.train()
        return self.clean_loss


def compare_step(args, folder: str) -> None:
    import jax
    import torch

    from art_jax.training.state import OptimConfig

    optim = OptimConfig()
    ours = FidJaxStep(folder, optim, args.dropout, args.dtype, args.remat == "on")
    peer = FidTorchStep(folder, optim, args.dropout, args.dtype, args.remat == "on")
    batch = make_batch(args, args.batch)
    print(f"step: FiD train step, {describe(args, args.batch)} T={args.answer_length}, dropout {args.dropout}, "
          f"compute {args.dtype}, remat {args.remat}; "
          f"jax {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s), torch "
          f"{torch.__version__} on {peer.device} ({torch.get_num_threads()} thread(s)); {load_average()}")
    race(ours, peer, batch, batch, args, peer_label="transformers T5ForConditionalGeneration")
    difference = abs(ours.clean_loss - peer.clean_loss)
    # float32 rounding of a few layers; bfloat16's 8-bit mantissa, rounded differently on each side
    tolerance = 1e-5 if args.dtype == "float32" else 2e-2
    equal = difference <= tolerance * max(1.0, abs(peer.clean_loss))
    print(f"  losses with dropout off {f'equal to {args.dtype} rounding' if equal else 'DIFFER'} "
          f"(relative {difference / abs(peer.clean_loss):.1e}); {load_average()}")


def compare_generate(args, folder: str) -> None:
    import jax
    import torch
    import transformers
    from flax import nnx
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    from art_jax.evaluation.predict import encoder_capacity, generate
    from art_jax.models.generation import greedy_decode
    from art_jax.models.hf import load_t5
    from art_jax.models.reader import fid_encode, packed_fid_encode

    questions, new = args.generate_batch, args.max_new_tokens
    batch = make_batch(args, questions)
    ids, mask = batch["reader_ids"], batch["reader_mask"]
    model = load_t5(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peer = transformers.T5ForConditionalGeneration.from_pretrained(folder).to(device).eval()
    capacity = encoder_capacity(mask)  # as `answer` packs the batch's real tokens
    encode = nnx.jit(fid_encode if capacity is None else
                     lambda *a: packed_fid_encode(*a, capacity)[:2])
    decode = nnx.jit(greedy_decode, static_argnames=("max_new_tokens",))
    b, k, n = ids.shape
    ids_t, mask_t = (torch.from_numpy(x.astype(np.int64)).to(device) for x in (ids, mask))

    def art_jax_whole():
        return np.asarray(generate(model, ids, mask, None, max_new_tokens=new, beams=1, capacity=capacity))

    def art_jax_encode():
        return jax.block_until_ready(encode(model, ids, mask))

    def art_jax_decode(memory):
        return np.asarray(decode(model, *memory, max_new_tokens=new))

    def torch_encode():
        with torch.inference_mode():
            encoded = peer.encoder(input_ids=ids_t.view(b * k, n), attention_mask=mask_t.view(b * k, n))
            if device == "cuda":
                torch.cuda.synchronize()  # the split's encode time is the encoder's
            return encoded.last_hidden_state.reshape(b, k * n, -1)

    def torch_decode(memory):
        # a fresh cache per call, as generate makes one; built lazily (see tests/test_generation.py)
        with torch.inference_mode():
            out = peer.generate(encoder_outputs=BaseModelOutput(last_hidden_state=memory),
                                attention_mask=mask_t.view(b, k * n), max_new_tokens=new, num_beams=1,
                                do_sample=False, past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()))
        out = out[:, 1:].cpu().numpy()  # after the start token; shorter if every row ended
        return np.pad(out, ((0, 0), (0, new - out.shape[1])), constant_values=PAD)

    def timed(fn, *args_):
        start = time.perf_counter()
        result = fn(*args_)
        return time.perf_counter() - start, result

    threads = torch.get_num_threads()
    peers = [threads] + ([1] if threads > 1 else [])  # small ops on a shared CPU can favour one thread
    print(f"generate: greedy, {describe(args, questions)}, {new} new tokens; jax {jax.__version__}, torch "
          f"{torch.__version__} on {device}, {' and '.join(map(str, peers))} thread(s); {load_average()}")
    start = time.perf_counter()
    ours_tokens, ours_memory = art_jax_whole(), art_jax_encode()
    art_jax_decode(ours_memory)
    print(f"  art_jax compiles (whole, encode, decode) {time.perf_counter() - start:.1f} s")
    for count in peers:  # warm-up: allocator, thread pools
        torch.set_num_threads(count)
        torch_decode(torch_encode())
    times = collections.defaultdict(list)
    for repeat in range(args.warmup + args.repeats):
        lap = {}
        lap["art_jax"], ours_tokens = timed(art_jax_whole)
        lap["art_jax encode"], ours_memory = timed(art_jax_encode)
        lap["art_jax decode"], _ = timed(art_jax_decode, ours_memory)
        for count in peers:
            torch.set_num_threads(count)
            peer_name = f"torch{count}"
            lap[f"{peer_name} encode"], memory = timed(torch_encode)
            lap[f"{peer_name} decode"], theirs = timed(torch_decode, memory)
            lap[peer_name] = lap[f"{peer_name} encode"] + lap[f"{peer_name} decode"]
            if count == threads:
                tokens = theirs
        torch.set_num_threads(threads)
        if repeat >= args.warmup:
            for name, seconds in lap.items():
                times[name].append(seconds)
    best, median = ({name: f(t) for name, t in times.items()} for f in (min, statistics.median))
    rows = [("art_jax", "art_jax encode + greedy_decode (one jit)"), ("art_jax encode", "  packed_fid_encode (jit)"),
            ("art_jax decode", "  greedy_decode (jit, KV cache)")]
    for count in peers:
        rows += [(f"torch{count}", f"transformers, torch on {count} thread(s)"),
                 (f"torch{count} encode", "  encoder"), (f"torch{count} decode", "  generate (its cache)")]
    print(f"  {'':<46}{'best ms/batch':>14}{'median ms':>11}{'questions/s':>13}")
    for name, label in rows:
        print(f"  {label:<46}{best[name] * 1e3:14.1f}{median[name] * 1e3:11.1f}{questions / best[name]:13.1f}")
    same = np.array_equal(ours_tokens, tokens)
    distinct = len({tuple(row) for row in ours_tokens.tolist()})
    print(f"  tokens: {'the same' if same else 'DIFFERENT'} ({int((ours_tokens != tokens).any(-1).sum())} of "
          f"{questions} rows differ; {distinct} distinct rows), </s> emitted: art_jax "
          f"{int((ours_tokens == EOS).sum())}, transformers {int((tokens == EOS).sum())}"
          + (f" (all {new} steps run)" if not (ours_tokens == EOS).any() and not (tokens == EOS).any() else ""))
    for count in peers:
        ratio = lambda part: best[f"torch{count}{part}"] / best[f"art_jax{part}"]  # noqa: B023, E731
        print(f"ratio transformers (torch on {count} thread(s)) / art_jax: {ratio(''):.2f}x whole (medians "
              f"{median[f'torch{count}'] / median['art_jax']:.2f}x), encode {ratio(' encode'):.2f}x, "
              f"decode {ratio(' decode'):.2f}x (best of {args.repeats})")
    print(f"  {load_average()}")


def memory_table(args) -> None:
    import jax
    import jax.numpy as jnp

    from art_jax.core.sharding import make_mesh
    from art_jax.models.hf import abstract_module
    from art_jax.models.t5 import T5, T5Config
    from art_jax.training.state import learning_rate_schedule
    from art_jax.training.update import jit_update

    k, n, t = args.memory_passages, args.memory_length, args.memory_answer
    mesh = make_mesh(devices=jax.devices()[:1])  # one device: one question
    batch = {"reader_ids": jax.ShapeDtypeStruct((1, k, n), jnp.int32),
             "reader_mask": jax.ShapeDtypeStruct((1, k, n), jnp.int32),
             "labels": jax.ShapeDtypeStruct((1, t), jnp.int32), "label_mask": jax.ShapeDtypeStruct((1, t), jnp.int32)}
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    print(f"memory: FiD train step (jit_update, AdamW), T5-base v1.0 shapes, 1 question x K={k} passages x N={n} "
          f"tokens, T={t}, dropout {args.memory_dropout}, per device; "
          f"XLA:{jax.default_backend().upper()}'s memory_analysis "
          f"(jax {jax.__version__}); {load_average()}")
    parameters = None
    for dtype in args.memory_dtypes:
        for remat in args.memory_remat:
            cfg = T5Config(**BASE, dtype=dtype, param_dtype="float32", remat=remat == "on",
                           dropout_rate=args.memory_dropout)
            groups, optimizer, optim, state = abstract_state({"reader": abstract_module(T5, cfg)})
            params = state.params
            update = jit_update(fid_objective(groups), optimizer, learning_rate_schedule(optim), mesh,
                                fid_shardings(mesh))
            if parameters is None:  # the table's head, before the first (slow) compile
                parameters = sum(x.size for x in jax.tree.leaves(params))
                print(f"  {parameters / 1e6:.1f} M parameters (float32); GiB per device:")
                print(f"  {'variant':<30}{'params':>8}{'AdamW':>8}{'batch':>8}{'arguments':>11}{'outputs':>9}"
                      f"{'aliased':>9}{'temp':>8}{'total':>8}{'compile s':>11}")
            start = time.perf_counter()
            analysis = update.lower(state, batch).compile().memory_analysis()
            seconds = time.perf_counter() - start
            arguments, outputs = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
            aliased, temp = analysis.alias_size_in_bytes, analysis.temp_size_in_bytes
            total = arguments + outputs - aliased + temp
            label = f"{dtype} compute, remat {remat}"
            print(f"  {label:<30}{size(params) / GiB:8.2f}{size(state.opt_state) / GiB:8.2f}{size(batch) / GiB:8.4f}"
                  f"{arguments / GiB:11.2f}{outputs / GiB:9.2f}{aliased / GiB:9.2f}"
                  f"{temp / GiB:8.2f}{total / GiB:8.2f}{seconds:11.0f}")
    print(f"  total = arguments + outputs - aliased (the donated state's buffers reused) + temp; "
          f"XLA:{jax.default_backend().upper()}'s buffer assignment")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("step", "generate", "memory", "all"), default="all")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-kv", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4, help="encoder layers, and as many decoder layers")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32128)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lively", type=float, default=6.0,
                        help="scale of the decoder's attention / FFN output weights (see above)")
    parser.add_argument("--batch", type=int, default=2, help="questions per train step (B)")
    parser.add_argument("--k", type=int, default=8, help="passages per question (K)")
    parser.add_argument("--passage-length", type=int, default=128, help="tokens per question + passage input (N)")
    parser.add_argument("--answer-length", type=int, default=16, help="answer tokens in training (T)")
    parser.add_argument("--generate-batch", type=int, default=4, help="questions per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the step's compute dtype (parameters stay float32; torch under autocast)")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense peak for --dtype, to print the "
                        "step's MFU (H100/H200 SXM bfloat16: 989)")
    parser.add_argument("--remat", choices=("off", "on"), default="off", help="the step's rematerialisation "
                        "(art_jax's reader.remat; transformers' gradient checkpointing)")
    add_threads_flag(parser)
    parser.add_argument("--memory-passages", type=int, default=50)
    parser.add_argument("--memory-length", type=int, default=512)
    parser.add_argument("--memory-answer", type=int, default=32)
    parser.add_argument("--memory-dropout", type=float, default=0.1)
    parser.add_argument("--memory-dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    parser.add_argument("--memory-remat", nargs="+", default=["off", "on"], choices=("off", "on"),
                        type=str.lower)
    args = parser.parse_args()
    cpus = pin_cpus(args.threads)
    if args.part in ("step", "generate", "all"):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(cpus)
        with tempfile.TemporaryDirectory() as folder:
            make_checkpoint(folder, args)
            if args.part in ("step", "all"):
                compare_step(args, folder)
            if args.part in ("generate", "all"):
                compare_generate(args, folder)
    if args.part in ("memory", "all"):
        memory_table(args)


if __name__ == "__main__":
    main()
