"""The retriever export folder: a dual encoder as two Hugging Face folders (BERT, RoBERTa or
Megatron's pre-LN BERT) that transformers and sentence-transformers load as they are, and a
record of where it came from.

    OUT/art_jax_export.json   provenance + format, shared_towers, both max lengths (written last)
    OUT/question_encoder/     config.json, model.safetensors, the tokenizer, art_jax_tower.json and
    OUT/passage_encoder/      sentence-transformers' modules.json, sentence_bert_config.json, 1_Pooling/
                              (and a projection head's 2_Dense/, and 3_LayerNorm/ where it has one)
    OUT/reader/               a trained reader: a Hugging Face T5 folder and art_jax_reader.json
                              (a run that trains only a reader exports this alone)

Both tower folders are always there (identical when the towers are shared), so a user never
needs to know how the retriever was trained to pick the right one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from art_jax.core import storage
from art_jax.core.errors import CheckpointError, UserError
from art_jax.core.remote import staging_parent
from art_jax.models.bert import Bert
from art_jax.models.hf import state_dict, write_json, write_tower
from art_jax.models.reader_folder import Reader, reader_path, write_reader_folder

EXPORT_FILE = "art_jax_export.json"
TOWER_FILE = "art_jax_tower.json"
FORMAT = 1
# DPR's and ART's lengths: questions are short, passages are 100 words
DEFAULT_MAX_LENGTHS = {"question": 64, "passage": 256}


def tower_path(folder: str, side: str) -> str:
    return f"{folder.rstrip('/')}/{side}_encoder"


def is_export_folder(path: str) -> bool:
    """What `art-jax export --out` may replace: an export folder, known by its art_jax_export.json
    (never a model folder of the user's, which it would delete)."""
    return storage.isfile(f"{path.rstrip('/')}/{EXPORT_FILE}")


def reads_as_export(path: str) -> bool:
    """Whether ``path`` is read as a two-tower retriever: any folder whose question_encoder/ and
    passage_encoder/ are model folders (an export's, or e.g. DPR's two released encoders put side
    by side, which then take the default max lengths); a reader's export without towers is not."""
    return all(storage.isfile(f"{tower_path(path, side)}/config.json") for side in DEFAULT_MAX_LENGTHS)


def check_export_target(out: str) -> None:
    """Refuse, before any work, an --out that is neither missing, empty, nor an export."""
    storage.check_replaceable(out, f"an export folder (no {EXPORT_FILE})", is_export_folder)


def check_max_lengths(question: Bert, passage: Bert, question_max_length: int, passage_max_length: int) -> None:
    """Each recorded length must fit its tower's position embeddings (checked on every process
    of a job before process 0 writes: a refusal must not leave the others at a barrier)."""
    for side, tower, length in (("question", question, question_max_length),
                                ("passage", passage, passage_max_length)):
        positions, offset = tower.config.max_length, tower.config.position_offset
        if not 0 < length <= positions:
            raise UserError(f"export: {side} max length {length} is not within the {side} tower's "
                            f"1..{positions} positions (max_position_embeddings"
                            f"{f' - {offset}' if offset else ''})")


def export_retriever(question: Bert | None, passage: Bert | None, tokenizer, out: str, *,
                     question_max_length: int = 0, passage_max_length: int = 0, provenance: dict[str, Any],
                     question_truncation: str = "right", reader: Reader | None = None) -> str:
    """Write the export folder ``out`` (local: renamed into place; a URL: uploaded with
    art_jax_export.json last). ``provenance`` (config, step, index version, the metric that chose
    the checkpoint, ...) goes into art_jax_export.json as it is; so do the max lengths and the
    side a long question is cut from (``left`` keeps its end). With ``reader`` its folder goes to
    OUT/reader/; a run that trains only a reader exports no towers (``question`` None)."""
    check_export_target(out)
    towers = {"question": question, "passage": passage} if question is not None else {}
    if towers:
        check_max_lengths(question, passage, question_max_length, passage_max_length)
    lengths = {"question": question_max_length, "passage": passage_max_length}
    weights = {side: state_dict(tower) for side, tower in towers.items()}
    shared = bool(towers) and (question is passage or (weights["question"].keys() == weights["passage"].keys() and all(
        np.array_equal(w, weights["passage"][name]) for name, w in weights["question"].items())))
    staging = tempfile.mkdtemp(prefix=".export-", dir=staging_parent(out))
    try:
        for side, tower in towers.items():
            folder = tower_path(staging, side)
            write_tower(folder, tower, weights[side], tokenizer, lengths[side])
            write_json(os.path.join(folder, TOWER_FILE), {"side": side, "max_length": lengths[side]})
        if reader is not None:
            write_reader_folder(reader_path(staging), reader.model, reader.tokenizer, reader.settings)
        record = {"question_max_length": question_max_length, "passage_max_length": passage_max_length,
                  "question_truncation": question_truncation} if towers else {"reader_only": True}
        write_json(os.path.join(staging, EXPORT_FILE), {**provenance, "format": FORMAT, "shared_towers": shared,
                                                          **record})
        storage.publish_folder(staging, out, marker=EXPORT_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def read_export(folder: str) -> dict[str, Any]:
    """art_jax_export.json of the export ``folder`` (a path or URL), checked to be a format this
    reads; for a folder of two towers without one, the default lengths."""
    path = f"{os.path.expanduser(folder).rstrip('/')}/{EXPORT_FILE}"
    if not storage.isfile(path) and reads_as_export(folder):
        return {"format": FORMAT, **{f"{side}_max_length": n for side, n in DEFAULT_MAX_LENGTHS.items()}}
    try:
        info = json.loads(storage.read_text(path))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable export record ({err})") from err
    version = info.get("format") if isinstance(info, dict) else None
    if version != FORMAT:
        raise CheckpointError(f"{path}: export format {version!r} is not one this art_jax reads ({FORMAT})")
    return info


def provenance_of(info: dict[str, Any]) -> dict[str, Any]:
    """The caller's part of an export record (without the fields the writer adds)."""
    return {k: v for k, v in info.items()
            if k not in ("format", "shared_towers", "question_max_length", "passage_max_length",
                         "question_truncation", "reader_only")}


def tower_max_length(folder: str) -> int | None:
    """The max length recorded in an exported tower folder; None for any other BERT folder."""
    path = os.path.join(folder, TOWER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return int(json.load(f)["max_length"])
