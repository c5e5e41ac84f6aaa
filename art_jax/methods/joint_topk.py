"""Joint top-K (Sachan et al., ACL 2021; paper 001 section 3.2): FiD over the K retrieved passages,
the retriever's probability biasing the decoder's cross-attention,

    attention logits = Q(a) K(z_1..K, q)^T + lambda * p(z | q)   at every position of passage z,

in every decoder layer and head; lambda a trainable scalar, p(z | q) the softmax over the K of
q.z / tau; loss -log p(a | q, z_1..K). The question tower learns through the bias; the passage
tower stays frozen, as in the paper, so its index never goes stale and z is read from it (the
vectors that ranked the passages, at index.dtype) rather than re-embedded each step. Its reader
records lambda and tau beside it (art_jax_reader.json): `art-jax answer` biases with the results'
retriever scores, which are those vectors' too.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from art_jax.core.errors import UserError
from art_jax.methods.end_to_end import EndToEnd, indexed_retriever_scores
from art_jax.methods.reading import fid_log_probs
from art_jax.models.reader import passage_memory_bias
from art_jax.objectives import fid_nll, joint_topk_memory_weights
from art_jax.training.state import ParamGroups, TrainState
from art_jax.workdir import JOINT


class CrossAttentionWeight(nnx.Module):
    """lambda: one trainable float32 scalar."""

    def __init__(self, value: float):
        self.weight = nnx.Param(jnp.float32(value))


def loss(groups: ParamGroups, params, batch, keys, *, tau: float):
    scores = indexed_retriever_scores(groups, params, batch, keys)
    lam = groups.module(params, JOINT).weight[...]
    weights = joint_topk_memory_weights(scores, tau, lam)
    bias = passage_memory_bias(weights, batch["reader_ids"].shape[-1])
    answer, _, _ = fid_log_probs(groups.module(params, "reader"), batch, keys[2:], memory_bias=bias)
    nll, metrics = fid_nll(answer, batch["label_mask"])
    return nll, {**metrics, "lambda": lam}


class JointTopK(EndToEnd):
    name = "joint_topk"

    @staticmethod
    def check_settings(cfg) -> None:
        if cfg.retriever.shared_towers:
            raise UserError("retriever.shared_towers: joint_topk trains the question tower and keeps the passage "
                            "tower frozen, which one shared tower cannot be; set retriever.shared_towers=False")
        if cfg.train.refresh_mode == "async":
            raise UserError("train.refresh_mode='async': joint_topk never refreshes its index (its passage tower "
                            "is frozen), so no refresher has work; set train.refresh_mode='sync'")

    always_frozen = ("passage",)
    biased_reader = True  # its reader reads with lambda * p(z|q) on the cross-attention
    index_use = "fixed"  # the frozen passage tower's index stays what it was
    vectors_from_index = True
    log_labels = {"token_nll": "nll/token", "lambda": "lambda", **EndToEnd.log_labels}

    objective_loss = staticmethod(loss)

    @staticmethod
    def initial_lambda(cfg) -> float:
        """reader.joint_lambda; 0 means K."""
        return float(cfg.reader.joint_lambda or cfg.train.topk)

    @staticmethod
    def other_modules(cfg) -> dict:
        return {JOINT: CrossAttentionWeight(JointTopK.initial_lambda(cfg))}

    def joint_settings(self, cfg) -> dict:
        return {"joint_lambda": self.initial_lambda(cfg), "joint_tau": self.tau}

    def evaluation_settings(self, state: TrainState):
        lam = float(self.groups.module(state.params, JOINT).weight[...])
        return dataclasses.replace(self.settings, joint_lambda=lam)
