"""The ART update as pure functions over a train-state pytree.

One step is two jitted functions with the host between them:
  ``embed_questions(params, tokens, key)`` -> q, then the sharded index search and the
  frozen teacher on the host side; then
  ``update(state, batch) -> (state, metrics)``: re-embed the questions and the K retrieved
  passages with gradient (dropout on), ART's KL, AdamW.
The split is where the id -> tokens lookup happens (the memory-mapped corpus store).
A passage retrieved for several questions of a (micro-)batch is re-embedded once
(``unique_passages``): the same loss and gradients, and on a small corpus far less work.
Both use the same dropout key for the question tower, so the query that retrieved the
passages is the query the loss sees (without gradient accumulation, bit for bit).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.batching import round_up
from art_jax.models.bert import Bert
from art_jax.objectives import art_loss


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32, steps taken (skipped ones included)
    params: dict[str, nnx.State]  # {"question": ..., "passage": ...} or {"shared": ...}
    opt_state: Any
    rng: jax.Array  # the run's base key; each step folds in its number
    skipped: jax.Array  # int32, steps whose loss or gradients were not finite


@dataclasses.dataclass(frozen=True)
class Towers:
    """The static half of the two towers (graph definitions) and which params each reads."""

    question: nnx.GraphDef
    passage: nnx.GraphDef
    shared: bool

    @classmethod
    def split(cls, question: Bert, passage: Bert) -> tuple["Towers", dict[str, nnx.State]]:
        if question is passage:
            graph, params = nnx.split(question, nnx.Param)
            return cls(graph, graph, True), {"shared": params}
        q_graph, q_params = nnx.split(question, nnx.Param)
        p_graph, p_params = nnx.split(passage, nnx.Param)
        return cls(q_graph, p_graph, False), {"question": q_params, "passage": p_params}

    def question_tower(self, params) -> Bert:
        return nnx.merge(self.question, params["shared" if self.shared else "question"])

    def passage_tower(self, params) -> Bert:
        return nnx.merge(self.passage, params["shared" if self.shared else "passage"])


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 2e-5
    total_steps: int = 1000
    warmup_fraction: float = 0.01
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    train_question_tower: bool = True
    train_passage_tower: bool = True


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup over ``warmup_fraction`` of the steps, then linear decay to 0."""
    warmup = int(cfg.warmup_fraction * cfg.total_steps)
    if warmup == 0:
        return optax.linear_schedule(cfg.learning_rate, 0.0, max(1, cfg.total_steps))
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                 optax.linear_schedule(cfg.learning_rate, 0.0, max(1, cfg.total_steps - warmup))],
                                [warmup])


def make_optimizer(cfg: OptimConfig, params: dict[str, nnx.State]) -> optax.GradientTransformation:
    """AdamW with weight decay on matrices only (not biases or LayerNorm), global-norm
    clipping, and frozen towers held fixed."""
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)  # noqa: E731
    adamw = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                        optax.adamw(learning_rate_schedule(cfg), b1=0.9, b2=0.999, eps=1e-8,
                                    weight_decay=cfg.weight_decay, mask=decay_mask))
    trainable = {"shared": cfg.train_question_tower or cfg.train_passage_tower,
                 "question": cfg.train_question_tower, "passage": cfg.train_passage_tower}
    labels = {name: jax.tree.map(lambda _: "train" if trainable[name] else "freeze", tree)
              for name, tree in params.items()}
    return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)


def init_state(params: dict[str, nnx.State], optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.int32(0))


def step_keys(state: TrainState) -> tuple[jax.Array, jax.Array]:
    """Dropout keys of this step for the question and the passage tower."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    question_key, passage_key = jax.random.split(key)
    return question_key, passage_key


def embed_questions(towers: Towers, state: TrainState, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The step's queries, with the step's dropout: what the index is searched with."""
    return towers.question_tower(state.params).embed_cls(ids, mask, dropout_key=step_keys(state)[0])


def unique_passages(rows: np.ndarray, accumulation: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Each micro-batch's retrieved rows once. ``rows`` [B, K] -> (store rows [A, U], positions
    [B, K] into their micro-batch's U). U is the largest micro-batch's count rounded up to
    ``multiple``, so few shapes get compiled; shorter lists repeat their last row, and no
    question points at those copies (they get no gradient)."""
    groups = np.split(rows, accumulation)
    uniques, inverses = zip(*(np.unique(group, return_inverse=True) for group in groups))
    width = round_up(max(map(len, uniques)), multiple)
    unique_rows = np.stack([np.pad(unique, (0, width - len(unique)), mode="edge") for unique in uniques])
    positions = np.concatenate([inverse.reshape(group.shape) for group, inverse in zip(groups, inverses)])
    return unique_rows, positions.astype(np.int32)


def _loss(towers: Towers, params, batch, question_key, passage_key, temperature_multiplier):
    """``batch``: question_ids/mask [B, Lq], passage_ids/mask [U, Lp], passage_index [B, K]
    (which of the U passages each question retrieved), teacher_scores [B, K]."""
    q = towers.question_tower(params).embed_cls(batch["question_ids"], batch["question_mask"],
                                                dropout_key=question_key)
    p = towers.passage_tower(params).embed_cls(batch["passage_ids"], batch["passage_mask"], dropout_key=passage_key)
    return art_loss(q, p[batch["passage_index"]], batch["teacher_scores"], temperature_multiplier)


PER_QUESTION = ("question_ids", "question_mask", "passage_index", "teacher_scores")


def _micro_batches(batch: dict[str, jax.Array], accumulation: int) -> dict[str, jax.Array]:
    """Leading axis A on every array: per-question ones split into A equal parts, passage
    ones ([A, U, Lp]) are per micro-batch already."""
    return {name: value.reshape(accumulation, -1, *value.shape[1:]) if name in PER_QUESTION else value
            for name, value in batch.items()}


def update(towers: Towers, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
           state: TrainState, batch: dict[str, jax.Array], *, temperature_multiplier: float = 1.0,
           accumulation: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One ART update. ``batch``: question_ids/mask [B, Lq], teacher_scores [B, K], and the
    retrieved passages of each of the A = ``accumulation`` micro-batches once
    (``unique_passages``): passage_ids/mask [A, U, Lp], passage_index [B, K] into them.
    The micro-batches' gradients are averaged (the same loss, less memory). A step
    whose loss or gradients are not finite leaves params and optimizer state untouched."""
    question_key, passage_key = step_keys(state)
    grad_fn = jax.value_and_grad(_loss, argnums=1, has_aux=True)

    def micro(i, micro_batch):
        keys = (question_key, passage_key) if accumulation == 1 else (
            jax.random.fold_in(question_key, i), jax.random.fold_in(passage_key, i))
        return grad_fn(towers, state.params, micro_batch, *keys, temperature_multiplier)

    split = _micro_batches(batch, accumulation)
    if accumulation == 1:
        (loss, metrics), grads = micro(0, jax.tree.map(lambda x: x[0], split))
    else:
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def body(carry, xs):
            i, micro_batch = xs
            (loss, metrics), grads = micro(i, micro_batch)
            return jax.tree.map(jnp.add, carry, grads), (loss, metrics)

        grads, (losses, metrics) = jax.lax.scan(body, zeros, (jnp.arange(accumulation), split))
        grads = jax.tree.map(lambda g: g / accumulation, grads)
        loss, metrics = jnp.mean(losses), jax.tree.map(jnp.mean, metrics)

    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state), skipped=state.skipped + (~finite))
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step), "skipped": new_state.skipped}
    return new_state, metrics


def jit_update(towers: Towers, optimizer: optax.GradientTransformation, schedule: optax.Schedule, mesh, *,
               temperature_multiplier: float = 1.0, accumulation: int = 1):
    """``update`` compiled data parallel over ``mesh``: the state replicated and donated, the
    per-question arrays split over `data`, each micro-batch's unique passages [A, U, Lp] split
    along U. Returns (the jitted update, the batch's shardings)."""
    replicated = NamedSharding(mesh, P())
    questions, passages = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "data"))
    batch_sharding = {name: questions if name in PER_QUESTION else passages
                      for name in (*PER_QUESTION, "passage_ids", "passage_mask")}
    step = jax.jit(functools.partial(update, towers, optimizer, schedule,
                                     temperature_multiplier=temperature_multiplier, accumulation=accumulation),
                   in_shardings=(replicated, batch_sharding), out_shardings=replicated, donate_argnums=0)
    return step, batch_sharding
