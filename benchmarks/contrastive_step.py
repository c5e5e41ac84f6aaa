"""The contrastive (DPR) train step: art_jax's jitted ``update`` with the contrastive
objective vs a PyTorch DPR-style in-batch step on the same checkpoint and batch, in one process.

    python benchmarks/contrastive_step.py                        # small BERT on CPU, a minute or two
    python benchmarks/contrastive_step.py --hidden 768 --layers 12 --heads 12 --batch 128 \\
        --passage-length 256                                     # DPR's NQ step with BERT-base (a GPU)
    python benchmarks/contrastive_step.py --accumulation 4       # art_jax with cached gradients

Both towers (separate weights) come from one random BERT folder written by transformers'
``save_pretrained``. Both sides take B questions and B x (1 + n) passages (each question's
positive and n hard negatives), embed [CLS] with dropout, score every question against every
passage of the batch (q.z / sqrt(hidden)), take DPR's NLL of each question's positive, backward,
clip the global norm at 1.0 and step AdamW (decay on matrices only). art_jax runs
``training.update.jit_update`` as the trainer does (``--accumulation`` > 1: the same loss
through cached gradients, which costs one more forward pass); the peer is transformers
``BertModel`` in train mode, the whole batch in one backward (as DPR's train_dense_encoder.py).
Steps alternate between the two; each side's metrics are read back every step. Printed: ms/step
(best and median), the ratio transformers / art_jax, and both losses with dropout off.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.threads import add_threads_flag, pin_cpus  # noqa: E402
from benchmarks.train_step import JaxStep, TorchStep, both_sides, race, random_tokens  # noqa: E402


def make_batch(args) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    q_ids, q_mask = random_tokens(args.batch, args.question_length, args.vocab, rng)
    p_ids, p_mask = random_tokens(args.batch * (1 + args.hard_negatives), args.passage_length, args.vocab, rng)
    return {"question_ids": q_ids, "question_mask": q_mask, "passage_ids": p_ids, "passage_mask": p_mask}


class ContrastiveJaxStep(JaxStep):
    def __init__(self, folder: str, optim, accumulation: int):
        from art_jax.methods import contrastive

        super().__init__(folder, optim, 1.0, contrastive, accumulation=accumulation)
        self.accumulation = accumulation

    def layout(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: value.reshape(self.accumulation, -1, value.shape[-1]) for name, value in batch.items()}

    def loss_without_dropout(self, batch: dict[str, np.ndarray]) -> float:
        import jax

        from art_jax.objectives import contrastive_loss

        def loss(params, b):
            q = self.towers.module(params, "question").embed_cls(b["question_ids"], b["question_mask"])
            p = self.towers.module(params, "passage").embed_cls(b["passage_ids"], b["passage_mask"])
            return contrastive_loss(q, p)[0]

        return float(jax.jit(loss)(self.state.params, batch))


class ContrastiveTorchStep(TorchStep):
    """DPR-style: in-batch scores q.z / sqrt(hidden), NLL of each question's positive."""

    def __init__(self, folder: str, optim):
        super().__init__(folder, optim, 1.0)

    def loss(self, b):
        torch = self.torch
        question, passage = self.towers
        q = question(input_ids=b["question_ids"], attention_mask=b["question_mask"]).last_hidden_state[:, 0]
        p = passage(input_ids=b["passage_ids"], attention_mask=b["passage_mask"]).last_hidden_state[:, 0]
        scores = q @ p.T / q.shape[-1] ** 0.5
        positives = torch.arange(q.shape[0], device=self.device) * (p.shape[0] // q.shape[0])
        return torch.nn.functional.nll_loss(torch.log_softmax(scores, dim=1), positives, reduction="mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--batch", type=int, default=32, help="questions per step (B)")
    parser.add_argument("--hard-negatives", type=int, default=1)
    parser.add_argument("--question-length", type=int, default=32)
    parser.add_argument("--passage-length", type=int, default=128)
    parser.add_argument("--accumulation", type=int, default=1, help="art_jax micro-batches (cached gradients)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    add_threads_flag(parser)
    args = parser.parse_args()
    pin_cpus(args.threads)

    import jax
    import torch

    ours, peer = both_sides(args, lambda folder, optim: ContrastiveJaxStep(folder, optim, args.accumulation),
                            ContrastiveTorchStep)
    batch = make_batch(args)
    laid_out = ours.layout(batch)
    print(f"contrastive step: BERT towers hidden {args.hidden} x {args.layers} layers ({args.heads} heads), "
          f"B={args.batch} x (1 + {args.hard_negatives}) passages, Lq={args.question_length} Lp={args.passage_length}, "
          f"art_jax accumulation {args.accumulation}; jax {jax.__version__} on {jax.device_count()} "
          f"{jax.default_backend()} device(s), torch {torch.__version__} on {peer.device} "
          f"({torch.get_num_threads()} CPU threads)")
    race(ours, peer, laid_out, batch, args, peer_label="transformers BertModel, DPR loss")


if __name__ == "__main__":
    main()
