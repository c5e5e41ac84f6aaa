"""EMDR2 (Singh, Reddy, Hamilton, Dyer, Yogatama, NeurIPS 2021; paper 004, equation 6): FiD over
the top-K trains the reader, and the retriever learns from the reader's answer likelihood given
each passage alone, taken without gradient:

    L = -log p(a | q, z_1..K) - log sum_k SG(p(a | q, z_k)) p(z_k | q)

p(a | q, z_k): the same reader, its decoder (without dropout) reading passage k's encoding from
the FiD pass alone, without gradient (the encoding keeps that pass's dropout: no second encoder
pass); p(z_k | q): softmax over the K of q.z / tau, both towers re-embedded with gradient.
``train.marginalise``: "sequence" (the paper's equation, the default) or "token" (the reference
code's per-token marginal; see ``objectives.emdr2_loss``).
"""

from __future__ import annotations

import jax

from art_jax.core.errors import UserError
from art_jax.methods.end_to_end import EndToEnd, log_p_retrieved
from art_jax.methods.reading import fid_log_probs, per_passage_log_probs
from art_jax.objectives import emdr2_loss
from art_jax.training.state import ParamGroups

MARGINALS = ("sequence", "token")


def loss(groups: ParamGroups, params, batch, keys, *, tau: float, marginalise: str):
    log_retriever = log_p_retrieved(groups, params, batch, keys, tau=tau)
    reader = groups.module(params, "reader")
    answer, memory, memory_mask = fid_log_probs(reader, batch, keys[2:])
    per_passage = per_passage_log_probs(reader, jax.lax.stop_gradient(memory), memory_mask, batch["labels"],
                                        log_retriever.shape[1])
    return emdr2_loss(answer, per_passage, log_retriever, batch["label_mask"], marginalise=marginalise)


class Emdr2(EndToEnd):
    name = "emdr2"
    log_labels = {"reader_nll": "nll(reader)", "retriever_nll": "nll(retriever)", "retriever_entropy": "H(retriever)",
                  **EndToEnd.log_labels}

    @staticmethod
    def check_settings(cfg) -> None:
        if cfg.train.marginalise not in MARGINALS:
            raise UserError(f"train.marginalise: {cfg.train.marginalise!r} is not 'sequence' or 'token'")

    objective_loss = staticmethod(loss)

    @staticmethod
    def loss_settings(cfg, tau: float) -> dict:
        return {"tau": tau, "marginalise": cfg.train.marginalise}
