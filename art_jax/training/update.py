"""The generic jitted update: a method's loss in, new state and metrics out.

``update(objective, optimizer, schedule, state, batch)`` computes the gradients the way the
objective says (by default: the loss's gradient, summed over ``accumulation`` micro-batches
with ``lax.scan`` and averaged; a method may bring its own scheme, e.g. a two-pass cached
gradient), skips a step whose loss or gradients are not finite (counted in
``state.skipped``), and applies the optimizer. The state is donated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.training.state import TrainState

# (params, batch, keys) -> (loss, metrics)
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def split_evenly(batch: dict[str, jax.Array], accumulation: int) -> dict[str, jax.Array]:
    """Every array's leading axis dealt into ``accumulation`` equal micro-batches: micro-batch a takes
    rows a, a + A, a + 2A, ... A batch split over the devices in contiguous blocks so gives every
    micro-batch an equal part on every device, with no data moved (cut into contiguous parts, each
    micro-batch would sit on A-th of the devices, all of its activations with it)."""
    return {name: value.reshape(-1, accumulation, *value.shape[1:]).swapaxes(0, 1) for name, value in batch.items()}


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a method gives the update.

    ``loss(params, batch, keys)``: the loss of one (micro-)batch and named scalar metrics.
    ``keys(key)``: the step's key -> the keys the loss takes (any pytree; micro-batch i of an
    accumulated step gets each of them folded with i). ``split(batch, A)``: the batch with a
    leading micro-batch axis of A. ``gradients``: a scheme of the method's own,
    ``(params, batch, keys) -> ((loss, metrics), grads)``, instead of plain accumulation."""

    loss: LossFn
    keys: Callable[[jax.Array], object] = lambda key: key
    accumulation: int = 1
    split: Callable[[dict, int], dict] = split_evenly
    gradients: Callable | None = None


def step_key(state: TrainState) -> jax.Array:
    """The step's key: the run's key folded with the step number."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def accumulated_gradients(objective: Objective, params, batch, keys):
    """Mean loss, metrics and gradients over the objective's micro-batches."""
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    count = objective.accumulation
    split = objective.split(batch, count)
    if count == 1:
        return grad_fn(params, jax.tree.map(lambda x: x[0], split), keys)

    def body(total, xs):
        i, micro_batch = xs
        (loss, metrics), grads = grad_fn(params, micro_batch, jax.tree.map(lambda k: jax.random.fold_in(k, i), keys))
        return jax.tree.map(jnp.add, total, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, metrics) = jax.lax.scan(body, zeros, (jnp.arange(count), split))
    return (jnp.mean(losses), jax.tree.map(jnp.mean, metrics)), jax.tree.map(lambda g: g / count, grads)


def update(objective: Objective, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
           state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step. A step whose loss or gradients are not finite leaves params and
    optimizer state untouched. ``learning_rate`` is the rate this step applied: the
    schedule at the optimizer's count, which skipped steps do not advance."""
    keys = objective.keys(step_key(state))
    gradients = objective.gradients or functools.partial(accumulated_gradients, objective)
    (loss, metrics), grads = gradients(state.params, batch, keys)
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

    def apply(state: TrainState) -> TrainState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)

    # a branch, not a select of new or old per array: no work on a skipped step, and XLA:CPU's fusion
    # of ~2,000 selects on one predicate (~650 parameter arrays of BERT towers + T5 reader, their AdamW
    # moments) ran out of memory
    stepped = jax.lax.cond(finite, apply, lambda state: state, state)
    new_state = stepped.replace(step=state.step + 1, skipped=state.skipped + (~finite))
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step - state.skipped), "skipped": new_state.skipped}
    return new_state, metrics


def jit_update(objective: Objective, optimizer: optax.GradientTransformation, schedule: optax.Schedule, mesh,
               batch_shardings: dict[str, NamedSharding], state_shardings=None):
    """``update`` compiled over ``mesh``: the state placed as ``state_shardings`` says (default
    replicated; training/layout.py's FSDP splits it) and donated, each batch array placed as
    ``batch_shardings`` says (the method's data parallelism)."""
    replicated = NamedSharding(mesh, P())
    state_shardings = state_shardings or replicated
    return jax.jit(functools.partial(update, objective, optimizer, schedule),
                   in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, replicated),
                   donate_argnums=0)
