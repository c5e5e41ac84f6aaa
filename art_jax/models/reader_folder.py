"""The reader's folder: a Hugging Face T5 folder (config.json, model.safetensors, the tokenizer)
that transformers' ``T5ForConditionalGeneration`` loads as it is, plus ``art_jax_reader.json``:
how the reader was trained to read (input format, input and answer lengths) and, for a Joint
top-K reader, the cross-attention weight lambda and the retriever temperature tau its bias needs.

An export's reader is its ``reader/`` folder; any other Hugging Face T5 folder reads with the
default settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from art_jax.core import storage
from art_jax.core.errors import CheckpointError
from art_jax.core.remote import local_copy
from art_jax.models.hf import hf_config_of, load_t5, load_tokenizer, read_config, state_dict, write_folder, write_json
from art_jax.models.t5 import T5

READER_FILE = "art_jax_reader.json"
READER_FOLDER = "reader"


@dataclasses.dataclass(frozen=True)
class ReaderSettings:
    """How a reader reads: FiD's defaults unless its folder records others."""

    input_format: str = "fid"  # a preset name ("fid", "emdr2") or a template with {question}, {title}, {text}
    max_input_tokens: int = 250  # per (question, passage) input, its </s> kept
    max_answer_tokens: int = 50
    # Joint top-K: lambda * softmax(score / tau) over the K passages biases the decoder's
    # cross-attention to each passage's positions; None for every other reader
    joint_lambda: float | None = None
    joint_tau: float | None = None

    @property
    def joint(self) -> bool:
        return self.joint_lambda is not None


@dataclasses.dataclass
class Reader:
    model: T5
    tokenizer: object
    settings: ReaderSettings
    source: str


def reader_path(folder: str) -> str:
    return f"{folder.rstrip('/')}/{READER_FOLDER}"


def holds_reader(folder: str) -> bool:
    """Whether ``folder`` (an export) has a reader/ model folder."""
    return storage.isfile(f"{reader_path(folder)}/config.json")


def read_settings(folder: str) -> ReaderSettings:
    """The settings recorded in a reader folder; the defaults for a plain Hugging Face T5 folder."""
    path = os.path.join(folder, READER_FILE)
    if not os.path.isfile(path):
        return ReaderSettings()
    try:
        with open(path, encoding="utf-8") as f:
            settings = ReaderSettings(**json.load(f))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable reader record ({err})") from err
    numbers = (settings.max_input_tokens, settings.max_answer_tokens)
    if not all(isinstance(n, int) and n > 0 for n in numbers) or not isinstance(settings.input_format, str):
        raise CheckpointError(f"{path}: input_format must be a string and max_input_tokens, max_answer_tokens "
                              f"positive integers, got {settings}")
    joint = (settings.joint_lambda, settings.joint_tau)
    if joint != (None, None) and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in joint):
        raise CheckpointError(f"{path}: a Joint top-K reader records numeric joint_lambda and joint_tau, got "
                              f"{joint[0]!r} and {joint[1]!r}")
    return settings


def read_reader_folder(folder: str, *, mesh=None, **overrides) -> Reader:
    """A reader from a local Hugging Face T5 folder (an export's reader/ or any T5 checkpoint);
    ``overrides``: T5Config fields (dropout, compute dtype, remat and its policy)."""
    return Reader(load_t5(folder, mesh=mesh, **overrides), load_tokenizer(folder), read_settings(folder), folder)


def reader_folder_of(spec: str) -> str:
    """The local model folder a reader argument names: an export's reader/, else the Hugging Face
    T5 folder or hub id itself."""
    path = os.path.expanduser(spec)
    if storage.isdir(path) and holds_reader(path):
        return reader_path(local_copy(path))
    from art_jax.models.export import reads_as_export  # (export.py imports this module)
    from art_jax.models.hf import resolve_checkpoint

    if storage.isdir(path) and reads_as_export(path):
        raise CheckpointError(f"{spec}: an export of a retriever alone (no reader/ in it); give a reader: a T5 "
                              "folder, an export of a run that trains one, or such a run")

    folder = resolve_checkpoint(spec)
    check_reader_config(read_config(folder), spec)
    return folder


def check_reader_config(config: dict[str, Any], spec: str) -> None:
    """Refuse a ``spec`` whose model (its config.json) is no T5."""
    model_type = config.get("model_type")
    if model_type != "t5":
        raise CheckpointError(f"{spec}: not a reader (a T5 folder, an export with reader/, or a training run "
                              f"that trains one); its config.json says model_type={model_type!r}")


def write_reader_folder(folder: str, model: T5, tokenizer, settings: ReaderSettings) -> None:
    """The reader's Hugging Face folder and its record into the local ``folder``."""
    write_folder(folder, hf_config_of(model), state_dict(model), tokenizer)
    write_json(os.path.join(folder, READER_FILE), settings_record(settings))


def settings_record(settings: ReaderSettings) -> dict[str, Any]:
    """What art_jax_reader.json holds: the Joint top-K fields only for a Joint top-K reader."""
    record = dataclasses.asdict(settings)
    return record if settings.joint else {k: v for k, v in record.items() if not k.startswith("joint_")}

