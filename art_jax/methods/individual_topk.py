"""Individual top-K (Sachan et al., ACL 2021; paper 001 section 3.1): the reader reads the question
with ONE retrieved passage at a time, and the answer's likelihood is marginalised over the K:

    L = -log sum_k p(a | q, z_k) p(z_k | q)

p(z_k | q): softmax over the K (not the corpus) of q.z / tau. Gradients reach the reader and both
towers (the K passages re-embedded with gradient; unlike RAG, whose passage tower is frozen).
The paper finds accuracy can fall as K grows: K (``train.topk``) is tuned on dev.
"""

from __future__ import annotations

from art_jax.methods.end_to_end import EndToEnd, log_p_retrieved
from art_jax.methods.reading import per_passage_log_probs
from art_jax.models.reader import fid_encode
from art_jax.objectives import individual_topk_loss
from art_jax.training.state import ParamGroups


def loss(groups: ParamGroups, params, batch, keys, *, tau: float):
    log_retriever = log_p_retrieved(groups, params, batch, keys, tau=tau)
    reader = groups.module(params, "reader")
    encoder_key, decoder_key = keys[2:]
    memory, memory_mask = fid_encode(reader, batch["reader_ids"], batch["reader_mask"], dropout_key=encoder_key)
    per_passage = per_passage_log_probs(reader, memory, memory_mask, batch["labels"], log_retriever.shape[1],
                                        dropout_key=decoder_key)
    return individual_topk_loss(per_passage, log_retriever, batch["label_mask"])


class IndividualTopK(EndToEnd):
    name = "individual_topk"
    log_labels = {"retriever_entropy": "H(retriever)", **EndToEnd.log_labels}
    objective_loss = staticmethod(loss)
