"""The reader's answers: questions with their retrieved passages -> Fusion-in-Decoder inputs ->
generated answer strings. `art-jax answer` and the reader methods' dev EM both use it.

A batch is padded to a fixed number of questions (its last question repeated) so one shape
is compiled; a question with fewer than K passages gets empty, fully masked ones, which
the decoder never attends to. Inputs are split over the mesh's ``data`` axis. The encoder skips
the inputs' padding and the decoder reads the real tokens alone (``art_jax.models.packing``),
their slots chosen per batch among 16 sizes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.batching import round_up
from art_jax.core.errors import UserError
from art_jax.core.progress import progress_bar
from art_jax.core.sharding import from_identical
from art_jax.data.reader_inputs import encode_reader_batch
from art_jax.evaluation.answers import check_results
from art_jax.models.generation import beam_search, greedy_decode
from art_jax.models.packing import packed_capacity
from art_jax.models.reader import fid_encode, packed_fid_encode, passage_memory_bias
from art_jax.models.reader_folder import ReaderSettings
from art_jax.models.t5 import T5
from art_jax.objectives import joint_topk_memory_weights


@dataclasses.dataclass(frozen=True)
class Retrieved:
    """One question and its passages, best first, with their retriever scores (needed only by a
    Joint top-K reader)."""

    question: str
    passages: Sequence[tuple[str, str]]  # (title, text)
    scores: Sequence[float] | None = None


def joint_memory_bias(scores: np.ndarray, present: np.ndarray, settings: ReaderSettings,
                      passage_length: int) -> np.ndarray:
    """lambda * softmax(score / tau) over each question's present passages, repeated over each
    passage's positions: the additive cross-attention bias a Joint top-K reader was trained with."""
    scores = np.where(present, scores, -np.inf).astype(np.float32)
    weights = joint_topk_memory_weights(scores, settings.joint_tau, settings.joint_lambda)
    return np.asarray(passage_memory_bias(weights, passage_length))


# A batch's packed encoder slots are a multiple of 1/16 of its K x N: at most 16 compiled shapes
CAPACITY_STEPS = 16


def capacity_step(tokens: int) -> int:
    """The granularity of the packed slots of a question's ``tokens`` = K x N input positions."""
    return -(-tokens // CAPACITY_STEPS)


def encoder_capacity(mask: np.ndarray) -> int | None:
    """The packed encoder's slots per question for a host mask [B, K, N] (``packed_fid_encode``); None
    (the padded encoder) where the fullest question needs them all, and packing would only cost."""
    capacity = packed_capacity(mask, capacity_step(mask[0].size))
    return None if capacity == mask[0].size else capacity


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "beams", "capacity"))
def generate(model: T5, ids, mask, memory_bias, *, max_new_tokens: int, beams: int, capacity: int | None = None):
    """Answer tokens [B, max_new_tokens] (padded with 0 after </s>) of a FiD batch [B, K, N], its
    padding skipped by the encoder and the decoder given ``capacity`` (``encoder_capacity``)."""
    if capacity is None:
        memory, memory_mask = fid_encode(model, ids, mask)
    else:
        memory, memory_mask, memory_bias = packed_fid_encode(model, ids, mask, capacity, memory_bias)
    if beams == 1:
        return greedy_decode(model, memory, memory_mask, max_new_tokens=max_new_tokens, memory_bias=memory_bias)
    return beam_search(model, memory, memory_mask, beams=beams, max_new_tokens=max_new_tokens,
                       memory_bias=memory_bias)


def _padded(items: list[Retrieved], k: int, size: int) -> tuple[list[Retrieved], np.ndarray]:
    """``size`` questions of exactly ``k`` passages (missing ones empty) and which are real."""
    present = np.zeros((size, k), bool)
    out = []
    for i in range(size):
        item = items[min(i, len(items) - 1)]
        passages = list(item.passages[:k])
        present[i, :len(passages)] = True
        scores = list(item.scores[:k]) if item.scores is not None else None
        out.append(Retrieved(item.question, passages + [("", "")] * (k - len(passages)),
                             scores + [0.0] * (k - len(scores)) if scores is not None else None))
    return out, present


def predict_answers(model: T5, tokenizer, items: Sequence[Retrieved], settings: ReaderSettings, *, topk: int,
                    mesh, beams: int = 1, batch_size: int = 8, progress: bool = True) -> list[str]:
    """The generated answer of each question over its first ``topk`` passages. ``model`` lives on
    ``mesh`` (replicated); on a mesh over several processes every process returns all answers."""
    template = settings.input_format
    size = round_up(batch_size, mesh.shape["data"])
    sharding = NamedSharding(mesh, P("data"))
    predictions = []
    with progress_bar(total=len(items), unit="question", desc="answer", disable=not progress) as bar:
        for start in range(0, len(items), size):
            chunk = list(items[start:start + size])
            batch, present = _padded(chunk, topk, size)
            ids, mask = encode_reader_batch(tokenizer, [r.question for r in batch], [r.passages for r in batch],
                                            template, settings.max_input_tokens)
            mask = mask * present[..., None]
            bias = None
            if settings.joint:
                scores = np.asarray([r.scores for r in batch], np.float32)
                bias = from_identical(sharding, joint_memory_bias(scores, present, settings, ids.shape[-1]))
            tokens = generate(model, from_identical(sharding, ids), from_identical(sharding, mask), bias,
                              max_new_tokens=settings.max_answer_tokens, beams=beams, capacity=encoder_capacity(mask))
            if not tokens.is_fully_addressable:  # a mesh over several processes: every process gets all rows
                tokens = multihost_utils.process_allgather(tokens, tiled=True)
            texts = tokenizer.batch_decode(np.asarray(tokens)[:len(chunk)], skip_special_tokens=True)
            predictions += [text.strip() for text in texts]
            bar.update(len(chunk))
    return predictions


def read_retrieved(results: list[dict], source: str, *, scores: bool) -> list[Retrieved]:
    """DPR-format results (checked as ``check_results`` does) as questions with their passages;
    with ``scores`` every ctx must carry a numeric ``score`` (a Joint top-K reader's bias)."""
    check_results(results, source)
    items = []
    for qi, item in enumerate(results):
        if not item["question"].strip():
            raise UserError(f"{source}: result {qi}: the question is empty")
        ctxs = item["ctxs"]
        if scores:
            bad = next((ci for ci, ctx in enumerate(ctxs) if not isinstance(ctx.get("score"), (int, float))), None)
            if bad is not None:
                raise UserError(f"{source}: result {qi}, ctx {bad}: no numeric 'score', which a Joint top-K "
                                "reader's cross-attention bias needs")
        items.append(Retrieved(item["question"], [(str(ctx.get("title") or ""), ctx["text"]) for ctx in ctxs],
                               [float(ctx["score"]) for ctx in ctxs] if scores else None))
    return items
