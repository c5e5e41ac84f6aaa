"""The training methods, by the name ``cfg.method`` selects."""

from __future__ import annotations

from art_jax.core.errors import UserError
from art_jax.methods.art import Art
from art_jax.methods.dpr import Dpr
from art_jax.methods.emdr2 import Emdr2
from art_jax.methods.fid import Fid
from art_jax.methods.ict import Ict
from art_jax.methods.individual_topk import IndividualTopK
from art_jax.methods.joint_topk import JointTopK
from art_jax.methods.pairs import Pairs
from art_jax.training.loop import Trainer

METHODS = {method.name: method for method in (Art, Dpr, Ict, Pairs, Fid, Emdr2, IndividualTopK, JointTopK)}


def make_trainer(cfg, workdir: str) -> Trainer:
    """The loop over the method ``cfg.method`` in ``workdir``."""
    if cfg.method not in METHODS:
        raise UserError(f"method: {cfg.method!r} is not one of {', '.join(sorted(METHODS))}")
    return Trainer(cfg, workdir, METHODS[cfg.method])
