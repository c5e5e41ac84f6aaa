"""`art-jax train --dry-run`: whether a config fits its devices, before anything is loaded.

Every jitted function of a training step is lowered and compiled for the run's mesh with abstract
shapes (no weights, data or workdir: the models' shapes come from their config.json or
``models/shapes.py``), and the compiler's own memory analysis is read per device:
- resident arrays: the train state's, and as the method has them the index shard and the teacher's
  share of its parameters;
- each function's temporaries (the update's activations, the teacher's, a search block's, the
  passage embedding's at a refresh or evaluation);
- resident + the largest temporaries against ``mesh.device_memory_gb``.
Sized: ART (update, question embedding, search, teacher, refresh), DPR / ICT / pairs
(the cached-gradient update; with data.dev_questions the evaluation index, its passage embedding
and a search block), FiD (the reader's update) and EMDR2, Individual and Joint top-K (the update
of towers and reader, the step's question embedding and search, the index's passage embedding);
with dev questions, the reader's generation of their answers.
On CPU devices the figures come from XLA:CPU's compiler, which approximate an accelerator's:
same program, same shapes, same sharding, but another compiler's fusion and scheduling.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core import storage
from art_jax.core.batching import round_up
from art_jax.core.errors import UserError
from art_jax.core.sharding import batch_sharding, make_mesh
from art_jax.core.sharding import state_shardings as logical_shardings
from art_jax.data.prompts import PromptConfig
from art_jax.models.shapes import abstract_bert, abstract_t5, hf_config, parameter_bytes
from art_jax.training.layout import GB, Layout, plan_layout, state_shardings, teacher_shapes
from art_jax.training.state import OptimConfig, ParamGroups, init_state, learning_rate_schedule, make_optimizer
from art_jax.training.update import jit_update

# DPR's Wikipedia (psgs_w100.tsv): the index a paper config trains against
WIKIPEDIA_PASSAGES = 21_015_324


WIDTH = 72  # the report's name column


@dataclasses.dataclass
class Compiled:
    """One jitted function's per-device figures from its compiled executable."""

    name: str
    temporaries: int  # bytes per device
    flops: float  # per call, all devices together
    calls: int  # per training step

    @classmethod
    def of(cls, name: str, lowered, calls: int = 1, *, unrolled=None, copies: int = 1) -> "Compiled":
        """``unrolled``: the same function lowered without remat. FLOPs are counted on the lowered,
        not yet partitioned program (the whole step's model FLOPs; a shard_map's body is one
        device's: ``copies`` of it run); XLA counts a loop's body once, and remat runs the layers
        as one loop."""
        memory = lowered.compile().memory_analysis()
        cost = (unrolled or lowered).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return cls(name, int(memory.temp_size_in_bytes), copies * float((cost or {}).get("flops", 0.0)), calls)


@dataclasses.dataclass
class Report:
    layout: Layout
    fsdp: bool
    resident: dict[str, int]  # what stays on a device all run: name -> bytes per device
    functions: list[Compiled]

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + max(f.temporaries for f in self.functions)

    @property
    def fits(self) -> bool:
        return self.peak <= self.layout.memory

    @property
    def flops_per_step(self) -> float:
        return sum(f.flops * f.calls for f in self.functions if f.calls)

    def lines(self) -> list[str]:
        memory = self.layout.memory
        out = [f"dry run: {self.layout.describe(self.fsdp)}", f"{'per device, resident':<{WIDTH + 2}}     GB"]
        out += [f"  {name:<{WIDTH}}{size / GB:7.2f}" for name, size in self.resident.items()]
        out.append(f"  {'all resident':<{WIDTH}}{sum(self.resident.values()) / GB:7.2f}")
        out.append(f"{'temporaries of each compiled function':<{WIDTH + 2}}     GB   TFLOP a call (all devices) "
                   "x calls a step")
        out += [f"  {f.name:<{WIDTH}}{f.temporaries / GB:7.2f}   {f.flops / 1e12:9.4f} x {f.calls}"
                for f in self.functions]
        largest = max(self.functions, key=lambda f: f.temporaries)
        verdict = "fits" if self.fits else "DOES NOT FIT"
        out.append(f"resident + largest temporaries ({largest.name.split(' (')[0]}): {self.peak / GB:.2f} GB of "
                   f"{memory / GB:.2f} GB: {verdict}")
        devices = self.layout.mesh.size
        out.append(f"model FLOPs per training step: {self.flops_per_step / 1e15:.3f} PFLOP on {devices} devices "
                   f"({self.flops_per_step / devices / 1e12:.2f} TFLOP each if evenly spread)")
        return out


def per_device_bytes(tree) -> int:
    """Bytes one device holds of ``tree`` (ShapeDtypeStructs with shardings)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _placed(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _spec(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def tower_config(spec: str) -> dict:
    """The towers' config.json: a Hugging Face checkpoint's (a known hub id's shipped shapes), or
    the question tower's of an export or a run."""
    from art_jax.retrieval.encoder import retriever_kind
    from art_jax.workdir import remote_model_folder, source_folders

    if storage.is_remote(spec):  # its config.json alone, where the model a run starts from lies
        return hf_config(remote_model_folder(spec, "question"))
    if retriever_kind(spec) == "hf":
        return hf_config(spec)
    return hf_config(spec, source_folders(spec)["question"])


def corpus_passages(cfg) -> tuple[int, str]:
    from art_jax.data.corpus import CorpusStore

    if cfg.data.corpus_store and storage.isdir(cfg.data.corpus_store):
        return len(CorpusStore.open(cfg.data.corpus_store)), cfg.data.corpus_store
    return WIKIPEDIA_PASSAGES, "DPR's Wikipedia; no data.corpus_store to count"


@dataclasses.dataclass
class TrainShapes:
    """A run's train state as placed shapes, and how to lower its update."""

    groups: ParamGroups
    unrolled: ParamGroups | None  # the same modules without remat (FLOPs); None when nothing is rematerialised
    optim: OptimConfig
    optimizer: object
    state: object
    fsdp: bool

    @classmethod
    def of(cls, cfg, layout: Layout, modules, *, remat: bool, frozen: tuple[str, ...] = ()) -> "TrainShapes":
        """``modules(unrolled)``: the run's modules by role as abstract shapes (without remat when
        ``unrolled``); ``remat``: whether any of them rematerialises."""
        groups, params = ParamGroups.split(modules(False))
        optim = OptimConfig(learning_rate=cfg.train.learning_rate, total_steps=max(1, cfg.train.steps),
                            frozen_roles=frozen)
        optimizer = make_optimizer(optim, groups, params)
        state = jax.eval_shape(lambda p: init_state(p, optimizer, cfg.seed), params)
        fsdp = layout.shards_state(state)
        state = _placed(state, state_shardings(state, layout.mesh, fsdp))
        unrolled = ParamGroups.split(modules(True))[0] if remat else None
        return cls(groups, unrolled, optim, optimizer, state, fsdp)

    def resident(self) -> tuple[str, int]:
        return (f"train state ({'FSDP' if self.fsdp else 'replicated'}: parameters, AdamW moments)",
                per_device_bytes(self.state))

    def update(self, name: str, mesh, objective_of, batch: dict, *, micro_batches: int) -> Compiled:
        """The jitted update of ``objective_of(groups)`` on ``batch`` (placed shapes); its FLOPs
        times ``micro_batches`` (the update's scan over them is counted once)."""

        def lowered(groups: ParamGroups):
            update = jit_update(objective_of(groups), self.optimizer, learning_rate_schedule(self.optim), mesh,
                                {key: spec.sharding for key, spec in batch.items()},
                                jax.tree.map(lambda x: x.sharding, self.state))
            return update.lower(self.state, batch)

        return Compiled.of(name, lowered(self.groups), unrolled=self.unrolled and lowered(self.unrolled),
                           copies=micro_batches)


def _towers(cfg, tower_hf: dict, unrolled: bool) -> dict:
    from art_jax.methods.common import check_compute_policy

    retriever = cfg.retriever
    check_compute_policy(retriever, "retriever")
    policy = dict(projection=retriever.projection, dtype=retriever.dtype, remat=retriever.remat and not unrolled,
                  remat_policy=retriever.remat_policy)
    question = abstract_bert(tower_hf, **policy)
    passage = question if retriever.shared_towers else abstract_bert(tower_hf, **policy)
    return {"question": question, "passage": passage}


def _tower_shapes(cfg, layout: Layout) -> tuple[dict, TrainShapes]:
    """The towers' config.json and the train state of a run that trains the two towers."""
    from art_jax.methods.common import frozen_towers

    tower_hf = tower_config(cfg.retriever.checkpoint)
    return tower_hf, TrainShapes.of(cfg, layout, functools.partial(_towers, cfg, tower_hf),
                                    remat=cfg.retriever.remat, frozen=frozen_towers(cfg))


def _reader(cfg, reader_hf: dict, unrolled: bool):
    from art_jax.methods.common import check_compute_policy

    reader = cfg.reader
    check_compute_policy(reader, "reader")
    return abstract_t5(reader_hf, dropout_rate=reader.dropout, dtype=reader.dtype, remat=reader.remat and not unrolled,
                       remat_policy=reader.remat_policy)


def _index(cfg, layout: Layout, dim: int, use: str) -> tuple[tuple[str, int], int, int]:
    """The index shard a device holds ((name, bytes)), the blocks a search runs and the rows of each."""
    from art_jax.retrieval.search import ACCELERATOR_ROWS_PER_DEVICE, block_layout

    passages, source = corpus_passages(cfg)
    blocks, per_device = block_layout(passages, layout.mesh.size,
                                      cfg.index.rows_per_device or ACCELERATOR_ROWS_PER_DEVICE)
    size = blocks * per_device * dim * jnp.dtype(cfg.index.dtype).itemsize
    return (f"index shard, {use} ({passages:,} x {dim} {cfg.index.dtype}: {source})", size), blocks, per_device


def _local_replica(module):
    """(``module``'s replica on this process's devices, their mesh): what a process embeds or
    decodes with on its own."""
    local = make_mesh(devices=jax.local_devices())
    graph, params = nnx.split(module, nnx.Param)
    return nnx.merge(graph, jax.tree.map(lambda x: _spec(x.shape, x.dtype, NamedSharding(local, P())), params)), local


def _passage_embedding(cfg, tower_hf: dict, when: str) -> Compiled:
    """Each process embeds its chunks of the corpus with a replica of the passage tower on its own
    devices (as ``for_inference``: float32, no remat); the replica counts among the temporaries."""
    from art_jax.retrieval.embed import _embed_as

    replica, local = _local_replica(abstract_bert(tower_hf, projection=cfg.retriever.projection))
    size = round_up(cfg.index.embed_batch_size, local.shape["data"])
    tokens = _spec((size, cfg.retriever.passage_max_length), jnp.int32, batch_sharding(local, 2))
    embedding = Compiled.of(f"passage embedding at {when} ({size} passages; + the tower)",
                            _embed_as.lower(replica, tokens, tokens, dtype=cfg.index.dtype), calls=0)
    embedding.temporaries += parameter_bytes(nnx.state(replica))  # the tower's replica, held while it embeds
    return embedding


def _answer_generation(cfg, reader_hf: dict, *, biased: bool) -> Compiled:
    """Dev answers at evaluation: each process decodes its share of the questions, greedily,
    ``reader.eval_batch_size`` at a time, with a replica of the reader on its own devices (as
    ``for_inference``: float32, no remat); the replica counts among the temporaries. ``biased``:
    Joint top-K's cross-attention bias is an input too."""
    from art_jax.evaluation.predict import capacity_step, generate

    replica, local = _local_replica(abstract_t5(reader_hf, dropout_rate=0.0))
    size = round_up(cfg.reader.eval_batch_size, local.shape["data"])
    k, n, t = cfg.train.topk, cfg.reader.max_input_tokens, cfg.reader.max_answer_tokens
    rows = NamedSharding(local, P("data"))
    tokens = _spec((size, k, n), jnp.int32, rows)
    bias = _spec((size, k * n), jnp.float32, rows) if biased else None
    # the larger of the fullest packed batch (both layouts of the encoder's q, k, v live) and a batch
    # that needs every slot, which runs padded (its decoder keeps the keys and values of all K x N)
    name = f"answer generation at evaluation ({size} questions x K={k}, {t} tokens; + the reader)"
    fullest = k * n - capacity_step(k * n)  # one step short of every slot
    answers = max((Compiled.of(name, generate.lower(replica, tokens, tokens, bias, max_new_tokens=t, beams=1,
                                                    capacity=capacity), calls=0)
                   for capacity in ((fullest, None) if fullest else (None,))), key=lambda c: c.temporaries)
    answers.temporaries += parameter_bytes(nnx.state(replica))
    return answers


def _search_block(name: str, layout: Layout, queries: int, k: int, dim: int, per_device: int, dtype,
                  calls: int) -> Compiled:
    """One block of the exact top-k search: ``queries`` against ``per_device`` rows on every device."""
    from art_jax.retrieval.search import ROWS, _block_step

    mesh = layout.mesh
    every, replicated = NamedSharding(mesh, ROWS), NamedSharding(mesh, P())
    search = _block_step(mesh, k, True).lower(
        _spec((queries, dim), dtype, replicated), _spec((per_device * mesh.size, dim), dtype, every),
        _spec((mesh.size * queries, k), jnp.float32, every), _spec((mesh.size * queries, k), jnp.int32, every),
        _spec((), jnp.int32, replicated), _spec((), jnp.int32, replicated))
    return Compiled.of(name, search, calls=calls, copies=mesh.size)


def _vectors_gather(layout: Layout, vectors: jax.ShapeDtypeStruct, blocks: int, per_device: int) -> Compiled:
    """The step's read of its passages' ``vectors`` (their batch array's shape, dtype and layout)
    from the index's ``blocks`` of ``per_device`` rows a device (``ShardedIndex.vectors``)."""
    from art_jax.retrieval.search import ROWS, _gather_rows

    mesh, (*rows, dim) = layout.mesh, vectors.shape
    block = _spec((per_device * mesh.size, dim), vectors.dtype, NamedSharding(mesh, ROWS))
    gather = _gather_rows(mesh, blocks, tuple(rows), vectors.sharding).lower(
        _spec((int(np.prod(rows)),), jnp.int32, NamedSharding(mesh, P())), (block,) * blocks)
    return Compiled.of("the passages' vectors from the index", gather)


def _question_search(cfg, layout: Layout, shapes: TrainShapes, embed, batch: dict, dim: int, per_device: int,
                     blocks: int, depth: int) -> list[Compiled]:
    """The step's question embedding (``embed(groups, state, ids, mask)``, as the method's) and its
    exact top-``depth`` search, one block a call."""
    rows = batch["question_ids"].sharding
    embed_questions = jax.jit(functools.partial(embed, shapes.groups), in_shardings=(None, rows, rows),
                              out_shardings=NamedSharding(layout.mesh, P()))
    return [Compiled.of("question embedding", embed_questions.lower(shapes.state, batch["question_ids"],
                                                                   batch["question_mask"])),
            _search_block(f"search, one block ({per_device:,} rows a device)", layout, cfg.train.batch_size,
                          depth, dim, per_device, jnp.dtype(cfg.index.dtype), calls=blocks)]


def _art(cfg, layout: Layout) -> Report:
    """ART: the towers' update, the step's question embedding, search and teacher, the refresh."""
    if cfg.scorer.kind != "t5":
        raise UserError("--dry-run: sizes a T5 teacher (scorer.kind=t5); a query-likelihood teacher has no weights")
    from art_jax.methods import art
    from art_jax.methods.common import check_topk

    check_topk(cfg)
    mesh, train = layout.mesh, cfg.train
    tower_hf, shapes = _tower_shapes(cfg, layout)
    dim = shapes.groups.module(shapes.state.params, "question").config.embedding_dim

    # the teacher, split over `model` as the trainer loads it
    teacher = teacher_shapes(cfg)
    graph, teacher_state = nnx.split(teacher)
    teacher = nnx.merge(graph, _placed(teacher_state, logical_shardings(teacher_state, mesh)))

    index, blocks, per_device = _index(cfg, layout, dim, "searched every step")
    resident = dict([index, (f"teacher parameters ({cfg.scorer.checkpoint}, {cfg.scorer.dtype})",
                             per_device_bytes(nnx.state(teacher))), shapes.resident()])

    # the update
    micro = train.batch_size // train.accumulation
    unique = round_up(micro * train.topk, mesh.size)  # every retrieved passage distinct: the most
    placed = art.batch_shardings(mesh)
    lq, lp = cfg.retriever.question_max_length, cfg.retriever.train_passage_max_length
    arrays = {"question_ids": ((train.batch_size, lq), jnp.int32),
              "question_mask": ((train.batch_size, lq), jnp.int32),
              "passage_index": ((train.batch_size, train.topk), jnp.int32),
              "teacher_scores": ((train.batch_size, train.topk), jnp.float32),
              "passage_ids": ((train.accumulation, unique, lp), jnp.int32),
              "passage_mask": ((train.accumulation, unique, lp), jnp.int32)}
    batch = {name: _spec(shape, dtype, placed[name]) for name, (shape, dtype) in arrays.items()}
    objective_of = functools.partial(art.objective, temperature_multiplier=train.temperature_multiplier,
                                     score_scaling=train.score_scaling, accumulation=train.accumulation)
    functions = [shapes.update(f"update (batch {train.batch_size}, K={train.topk}, {unique} passages)", mesh,
                               objective_of, batch, micro_batches=train.accumulation)]

    functions += _question_search(cfg, layout, shapes, art.embed_questions, batch, dim, per_device, blocks,
                                  train.topk)

    # the teacher: the step's B x K pairs in batches of scorer.batch_size (as one process)
    from art_jax.teachers.t5 import _teacher_scores

    prompt = PromptConfig()
    pairs = round_up(cfg.scorer.batch_size, mesh.shape["data"])  # one process's call; P processes send P x as many
    scorer_rows = batch_sharding(mesh, 2)
    teacher_batch = (_spec((pairs, prompt.max_encoder_tokens), jnp.int32, scorer_rows),
                     _spec((pairs, prompt.max_encoder_tokens), jnp.int32, scorer_rows),
                     _spec((pairs, prompt.max_decoder_tokens), jnp.int32, scorer_rows),
                     _spec((pairs, prompt.max_decoder_tokens), jnp.int32, scorer_rows))
    functions.append(Compiled.of(
        f"teacher ({pairs} pairs as one process, {prompt.max_encoder_tokens}+{prompt.max_decoder_tokens} tokens)",
        _teacher_scores.lower(teacher, *teacher_batch, sharding=batch_sharding(mesh, 1)),
        calls=-(-train.batch_size * train.topk // pairs)))
    functions.append(_passage_embedding(cfg, tower_hf, "refresh"))
    return Report(layout, shapes.fsdp, resident, functions)


def _contrastive(cfg, layout: Layout) -> Report:
    """DPR, ICT, pairs: the towers' update over the whole batch's passages (cached gradients across
    micro-batches); with data.dev_questions, the index evaluations build."""
    from art_jax.methods import contrastive

    train = cfg.train
    if train.hard_negatives < 0:
        raise UserError(f"train.hard_negatives={train.hard_negatives} must be 0 or more")
    if cfg.method == "ict" and train.hard_negatives:
        raise UserError(f"method=ict takes in-batch negatives only: set train.hard_negatives=0 "
                        f"(it is {train.hard_negatives})")
    mesh = layout.mesh
    tower_hf, shapes = _tower_shapes(cfg, layout)
    micro = train.batch_size // train.accumulation
    per_question = 1 + train.hard_negatives
    lq, lp = cfg.retriever.question_max_length, cfg.retriever.train_passage_max_length
    arrays = {"question_ids": (micro, lq), "question_mask": (micro, lq),
              "passage_ids": (micro * per_question, lp), "passage_mask": (micro * per_question, lp)}
    placed = contrastive.batch_shardings(mesh)
    batch = {name: _spec((train.accumulation, *shape), jnp.int32, placed[name]) for name, shape in arrays.items()}
    objective_of = functools.partial(contrastive.objective, temperature_multiplier=train.temperature_multiplier,
                                     score_scaling=train.score_scaling, accumulation=train.accumulation)
    functions = [shapes.update(f"update (batch {train.batch_size} x {per_question} passages, "
                               f"{train.accumulation} micro-batch(es))", mesh, objective_of, batch,
                               micro_batches=train.accumulation)]
    resident = dict([shapes.resident()])
    if cfg.data.dev_questions:  # evaluations search an index of the corpus, kept between them
        dim = shapes.groups.module(shapes.state.params, "question").config.embedding_dim
        index, _, per_device = _index(cfg, layout, dim, "for evaluations")
        resident.update([index])
        functions.append(_passage_embedding(cfg, tower_hf, "evaluation"))
        from art_jax.retrieval.results import SEARCH_BATCH

        functions.append(_search_block(f"search at evaluation, one block ({per_device:,} rows a device)", layout,
                                       SEARCH_BATCH, max(cfg.train.eval_topk), dim, per_device,
                                       jnp.dtype(cfg.index.dtype), calls=0))
    return Report(layout, shapes.fsdp, resident, functions)


def reader_config(spec: str) -> dict:
    """The reader's config.json: a hub id's (shipped shapes, else its config.json alone), or that of
    the folder a run starts from (a T5 folder, an export's reader/, a run's models/reader/)."""
    from art_jax.models.reader_folder import check_reader_config
    from art_jax.workdir import READER, reader_source_folder, remote_model_folder

    if storage.is_remote(spec):
        config = hf_config(remote_model_folder(spec, READER))
        check_reader_config(config, spec)
        return config
    if not os.path.isdir(os.path.expanduser(spec)):
        return hf_config(spec)
    return hf_config(spec, reader_source_folder(spec))


def _fid(cfg, layout: Layout) -> Report:
    """Fusion-in-Decoder alone: the reader's update over B questions x K passages of N tokens."""
    from art_jax.methods import fid
    from art_jax.methods.common import check_topk

    check_topk(cfg)
    train, reader = cfg.train, cfg.reader
    mesh = layout.mesh
    reader_hf = reader_config(reader.checkpoint)

    shapes = TrainShapes.of(cfg, layout, lambda unrolled: {"reader": _reader(cfg, reader_hf, unrolled)},
                            remat=reader.remat)
    k, n, t = train.topk, reader.max_input_tokens, reader.max_answer_tokens
    placed = fid.batch_shardings(mesh)
    arrays = {"reader_ids": (train.batch_size, k, n), "reader_mask": (train.batch_size, k, n),
              "labels": (train.batch_size, t), "label_mask": (train.batch_size, t)}
    batch = {name: _spec(shape, jnp.int32, placed[name]) for name, shape in arrays.items()}
    objective_of = functools.partial(fid.objective, accumulation=train.accumulation)
    functions = [shapes.update(f"update (batch {train.batch_size} x K={k} passages of {n} tokens, answers of {t})",
                               mesh, objective_of, batch, micro_batches=train.accumulation)]
    if cfg.data.dev_results:
        functions.append(_answer_generation(cfg, reader_hf, biased=False))
    return Report(layout, shapes.fsdp, dict([shapes.resident()]), functions)


def _end_to_end(cfg, layout: Layout) -> Report:
    """EMDR2, Individual and Joint top-K: the update of the towers and the reader together (the
    step's B x K passages re-embedded, or Joint top-K's vectors read from the index; the reader over
    B x K x N tokens), the step's question
    embedding and search, the passage embedding that builds (and refreshes) the index, and with
    dev questions (or held-out span sentences) their search and answers' generation."""
    from art_jax.methods import METHODS, end_to_end
    from art_jax.methods.common import check_topk, frozen_towers
    from art_jax.retrieval.results import SEARCH_BATCH

    check_topk(cfg)
    method, train, reader, data = METHODS[cfg.method], cfg.train, cfg.reader, cfg.data
    method.check_settings(cfg)
    mesh = layout.mesh
    tower_hf, reader_hf = tower_config(cfg.retriever.checkpoint), reader_config(reader.checkpoint)

    def modules(unrolled: bool) -> dict:
        return {**_towers(cfg, tower_hf, unrolled), "reader": _reader(cfg, reader_hf, unrolled),
                **method.other_modules(cfg)}

    shapes = TrainShapes.of(cfg, layout, modules, remat=cfg.retriever.remat or reader.remat,
                            frozen=frozen_towers(cfg) + method.always_frozen)
    dim = shapes.groups.module(shapes.state.params, "question").config.embedding_dim
    index, blocks, per_device = _index(cfg, layout, dim, "searched every step")

    b, k, n, t = train.batch_size, train.topk, reader.max_input_tokens, reader.max_answer_tokens
    lq, lp = cfg.retriever.question_max_length, cfg.retriever.train_passage_max_length
    arrays = {"question_ids": (b, lq), "question_mask": (b, lq), "reader_ids": (b, k, n), "reader_mask": (b, k, n),
              "labels": (b, t), "label_mask": (b, t)}
    if method.vectors_from_index:  # in the index's dtype, index.dtype as its shard above is sized
        arrays["passage_vectors"], passages = (b, k, dim), "the passages' vectors from the index"
    else:
        unique = end_to_end.unique_width(cfg, mesh)
        arrays.update(passage_index=(b, k), passage_ids=(train.accumulation, unique, lp),
                      passage_mask=(train.accumulation, unique, lp))
        passages = f"{unique} passages re-embedded"
    placed = end_to_end.batch_shardings(mesh, vectors_from_index=method.vectors_from_index)
    batch = {name: _spec(shape, jnp.dtype(cfg.index.dtype) if name == "passage_vectors" else jnp.int32, placed[name])
             for name, shape in arrays.items()}
    objective_of = functools.partial(end_to_end.objective, method.objective_loss, accumulation=train.accumulation,
                                     **method.loss_settings(cfg, end_to_end.retriever_tau(cfg, dim)))
    functions = [shapes.update(f"update (batch {b} x K={k}: {passages}, reader over {n} tokens each, answers of "
                               f"{t})", mesh, objective_of, batch, micro_batches=train.accumulation)]
    excluded = int(bool(data.salient_spans))  # a span sentence's own passage is searched for and dropped
    if not data.salient_source_passage:  # (which reads its own passage alone: nothing searched)
        functions += _question_search(cfg, layout, shapes, end_to_end.embed_questions, batch, dim, per_device, blocks,
                                      k + excluded)
    if method.vectors_from_index:
        functions.append(_vectors_gather(layout, batch["passage_vectors"], blocks, per_device))
    functions.append(_passage_embedding(cfg, tower_hf, "refresh" if method.index_use == "train" else "start"))
    if data.dev_questions or (data.salient_spans and data.salient_dev):  # what the run evaluates on
        functions.append(_search_block(f"search at evaluation, one block ({per_device:,} rows a device)", layout,
                                       SEARCH_BATCH, max(*train.eval_topk, k) + excluded, dim, per_device,
                                       jnp.dtype(cfg.index.dtype), calls=0))
        functions.append(_answer_generation(cfg, reader_hf, biased=method.biased_reader))
    return Report(layout, shapes.fsdp, dict([index, shapes.resident()]), functions)


SIZED = {"art": _art, "dpr": _contrastive, "ict": _contrastive, "pairs": _contrastive, "fid": _fid,
         "emdr2": _end_to_end, "individual_topk": _end_to_end, "joint_topk": _end_to_end}


def dry_run(cfg) -> Report:
    """Compile ``cfg``'s training step on its mesh with abstract shapes; nothing is loaded or written.
    ART's teacher batch is one process's (a job of P processes sends P times the pairs per call)."""
    if cfg.method not in SIZED:
        raise UserError(f"method: {cfg.method!r} is not one of {', '.join(sorted(SIZED))}")
    from art_jax.methods.common import check_batch

    check_batch(cfg, accumulation=cfg.train.accumulation)
    layout = plan_layout(cfg)
    if layout.memory is None:
        raise UserError(f"mesh.device_memory_gb: the dry run needs one device's memory to size against "
                        f"({layout.memory_source}); e.g. 40 for an A100 40GB")
    return SIZED[cfg.method](cfg, layout)


def print_dry_run(cfg) -> bool:
    report = dry_run(cfg)
    print("\n".join(report.lines()), flush=True)
    return report.fits
