"""A run's train state and its optimizer: parameters in named groups, one pytree.

Parameters live in groups by name (``question``, ``passage``, later ``reader``; a module
used for several roles is one group, ``shared``), so freezing, export and the refresher
find a role's parameters the same way for every method.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32, steps taken (skipped ones included)
    params: dict[str, nnx.State]  # group name -> parameters
    opt_state: Any
    rng: jax.Array  # the run's base key; each step folds in its number
    skipped: jax.Array  # int32, steps whose loss or gradients were not finite


SHARED = "shared"


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """The static half of a method's modules (graph definitions) and which group of
    parameters each role reads: ``{"question": "question", "passage": "passage"}``, or both
    ``"shared"`` when one module plays both roles."""

    graphs: dict[str, nnx.GraphDef]  # group -> graph
    roles: dict[str, str]  # role -> group

    @classmethod
    def split(cls, modules: dict[str, nnx.Module]) -> tuple["ParamGroups", dict[str, nnx.State]]:
        """Roles -> modules; a module given for several roles becomes the one group "shared"."""
        graphs, params, roles = {}, {}, {}
        for role, module in modules.items():
            shared = [r for r, m in modules.items() if m is module]
            group = SHARED if len(shared) > 1 else role
            if group not in graphs:
                graphs[group], params[group] = nnx.split(module, nnx.Param)
            roles[role] = group
        return cls(graphs, roles), params

    def module(self, params: dict[str, nnx.State], role: str) -> nnx.Module:
        group = self.roles[role]
        return nnx.merge(self.graphs[group], params[group])


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 2e-5
    total_steps: int = 1000
    warmup_fraction: float = 0.01
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    frozen_roles: tuple[str, ...] = ()  # roles whose parameters stay fixed


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup over ``warmup_fraction`` of the steps, then linear decay to 0."""
    warmup = int(cfg.warmup_fraction * cfg.total_steps)
    if warmup == 0:
        return optax.linear_schedule(cfg.learning_rate, 0.0, max(1, cfg.total_steps))
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                 optax.linear_schedule(cfg.learning_rate, 0.0, max(1, cfg.total_steps - warmup))],
                                [warmup])


def make_optimizer(cfg: OptimConfig, groups: ParamGroups, params: dict[str, nnx.State]) -> optax.GradientTransformation:
    """AdamW with weight decay on matrices only (not biases or LayerNorm), global-norm
    clipping; a group is frozen when every role it plays is."""
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)  # noqa: E731
    adamw = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                        optax.adamw(learning_rate_schedule(cfg), b1=0.9, b2=0.999, eps=1e-8,
                                    weight_decay=cfg.weight_decay, mask=decay_mask))
    frozen = {group for group in params
              if all(role in cfg.frozen_roles for role, g in groups.roles.items() if g == group)}
    labels = {group: jax.tree.map(lambda _: "freeze" if group in frozen else "train", tree)
              for group, tree in params.items()}
    return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)


def init_state(params: dict[str, nnx.State], optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.int32(0))
