"""What the methods that train a T5 reader share (``fid``, ``emdr2``, ``individual_topk``,
``joint_topk``): the reader a run starts from, a step's reader inputs and answer targets, the
reader's part of a loss, and dev EM/F1 by greedy decoding.

A step's reader arrays, each question's row split over ``data``:
    reader_ids, reader_mask [B, K, N]   question + passage k, formatted and cut to N tokens
    labels, label_mask      [B, T]      one gold answer (drawn per epoch, as FiD) + </s>
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from art_jax.core.distributed import process_share, process_sum
from art_jax.core.errors import UserError
from art_jax.core.sharding import local_replica, make_mesh
from art_jax.data.reader_inputs import encode_answers, encode_reader_batch, resolve_format, sample_answer
from art_jax.evaluation.predict import Retrieved, predict_answers
from art_jax.evaluation.reading import exact_match, f1
from art_jax.methods.common import check_compute_policy
from art_jax.models.hf import for_inference
from art_jax.models.reader import answer_log_probs, fid_encode
from art_jax.models.reader_folder import ReaderSettings
from art_jax.models.t5 import T5

READER_METRICS = ("em", "f1")
READER_ARRAYS = ("reader_ids", "reader_mask", "labels", "label_mask")


def check_reader(cfg) -> None:
    """``reader.*`` keys, before anything is loaded."""
    reader = cfg.reader
    resolve_format(reader.input_format, "reader.input_format")
    for key in ("max_input_tokens", "max_answer_tokens", "eval_batch_size"):
        if reader[key] < 1:
            raise UserError(f"reader.{key}={reader[key]} must be at least 1")
    check_compute_policy(reader, "reader")
    if not 0 <= reader.dropout < 1:
        raise UserError(f"reader.dropout={reader.dropout} is not in [0, 1)")


def reader_settings(cfg, **joint) -> ReaderSettings:
    """How the run's reader reads (recorded with it: `answer` reads the same way)."""
    reader = cfg.reader
    return ReaderSettings(input_format=resolve_format(reader.input_format, "reader.input_format"),
                          max_input_tokens=reader.max_input_tokens, max_answer_tokens=reader.max_answer_tokens,
                          **joint)


def initial_reader(cfg):
    """The reader a run starts from (``reader.checkpoint``), with the run's dropout, compute dtype
    and rematerialisation."""
    from art_jax.workdir import load_reader

    return load_reader(cfg.reader.checkpoint, dropout_rate=cfg.reader.dropout, dtype=cfg.reader.dtype,
                       remat=cfg.reader.remat, remat_policy=cfg.reader.remat_policy)


def reader_arrays(tokenizer, settings: ReaderSettings, questions: Sequence[str],
                  passages: Sequence[Sequence[tuple[str, str]]], answers: Sequence[str]) -> dict[str, np.ndarray]:
    """One process's rows of a step's reader inputs [b, K, N] and answer targets [b, T]."""
    ids, mask = encode_reader_batch(tokenizer, questions, passages, settings.input_format, settings.max_input_tokens)
    labels, label_mask = encode_answers(tokenizer, answers, settings.max_answer_tokens)
    return {"reader_ids": ids, "reader_mask": mask, "labels": labels, "label_mask": label_mask}


def drawn_answer(answers: Sequence[str], *, seed: int, epoch: int, index: int) -> str:
    """The gold answer example ``index`` trains on in ``epoch`` (FiD draws one per example)."""
    return sample_answer(answers, np.random.default_rng([seed, epoch, index]))


def reader_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The reader's dropout keys: its encoder's and its decoder's."""
    encoder_key, decoder_key = jax.random.split(key)
    return encoder_key, decoder_key


def fid_log_probs(reader: T5, batch, keys, *, memory_bias=None):
    """Fusion-in-Decoder: (log p of each answer token [B, T] given all K passages, the memory
    [B, K * N, D] and its mask)."""
    encoder_key, decoder_key = keys
    memory, memory_mask = fid_encode(reader, batch["reader_ids"], batch["reader_mask"], dropout_key=encoder_key)
    log_probs = answer_log_probs(reader, memory, memory_mask, batch["labels"], memory_bias=memory_bias,
                                 dropout_key=decoder_key)
    return log_probs, memory, memory_mask


def per_passage_log_probs(reader: T5, memory, memory_mask, labels, passages: int, *, dropout_key=None):
    """log p(a_t | q, z_k, a_<t) [B, K, T]: the decoder reading one passage's encoding at a time
    (each passage is encoded on its own, so FiD's memory holds them already)."""
    batch, length, width = memory.shape
    per_passage = length // passages
    log_probs = answer_log_probs(reader, memory.reshape(batch * passages, per_passage, width),
                                 memory_mask.reshape(batch * passages, per_passage),
                                 jnp.repeat(labels, passages, axis=0), dropout_key=dropout_key)
    return log_probs.reshape(batch, passages, -1)


def reading_metrics(reader: T5, tokenizer, settings: ReaderSettings, items: Sequence[Retrieved],
                    answers: Sequence[Sequence[str]], *, topk: int, batch_size: int) -> dict[str, float]:
    """Dev EM and F1 (fractions; SQuAD's normalisation, the best gold answer) of greedy answers:
    each process decodes its share of the questions on its own devices, the sums are gathered."""
    local = make_mesh(devices=jax.local_devices())
    share = process_share(len(items))
    predictions = predict_answers(local_replica(for_inference(reader), local), tokenizer, [items[i] for i in share],
                                  settings, topk=topk, mesh=local, batch_size=batch_size, progress=False)
    gold = [answers[i] for i in share]
    em, f1_ = process_sum([sum(exact_match(p, a) for p, a in zip(predictions, gold)),
                           sum(f1(p, a) for p, a in zip(predictions, gold))]) / len(items)
    return {"em": float(em), "f1": float(f1_)}
