"""Reading training checkpoints that PyTorch code saved (Megatron-LM's, facebook DPR's), for
`art-jax convert`.

They are pickles: besides tensors they hold the run's arguments (argparse.Namespace) and RNG
states (numpy arrays, tuples). ``torch.load(weights_only=True)`` is given exactly those extra
types and nothing else: a file asking for any other class or function is refused, never run.
torch is the ``convert`` extra (``pip install -e ".[convert]"``) and imported only here.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import warnings
from typing import Any

import numpy as np

from art_jax.core.errors import CheckpointError


@dataclasses.dataclass
class TowerWeights:
    """One tower as a Hugging Face folder would hold it: config.json's dict, and tensors by
    transformers' names (torch layout: Linear weights [out, in]); a projection head's as head.*."""

    hf_config: dict[str, Any]
    weights: dict[str, np.ndarray]


@dataclasses.dataclass
class ConvertedRetriever:
    question: TowerWeights
    passage: TowerWeights
    provenance: dict[str, Any]  # where it came from: recorded in the export's art_jax_export.json


class _Inert:
    """Stands in for a class of the training code that only carries attributes: built from the
    pickled attributes, with no method of the original ever run."""


# Megatron's fp16 optimizer state pickles its loss scaler object (by these names over its history);
# DPR's hydra-era runs keep their encoder settings as an omegaconf DictConfig (read by ``plain``)
_INERT_CLASSES = (*(f"{package}loss_scaler.{name}" for package in ("megatron.fp16.", "fp16.")
                    for name in ("LossScaler", "DynamicLossScaler")),
                  "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.nodes.AnyNode",
                  *(f"omegaconf.nodes.{kind}Node" for kind in ("String", "Integer", "Float", "Boolean", "Bytes",
                                                               "Path", "Enum")),
                  "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata")


class _InertValue:
    """Stands in for an enum member of the training code (newer Megatron-LM's args.model_type):
    the pickle rebuilds it from its value, which is all that is kept."""

    def __init__(self, value: Any):
        self.value = value


# Megatron-LM's enums, by their module over its history
_INERT_VALUES = tuple(f"megatron.{package}enums.{name}" for package in ("model.", "core.")
                      for name in ("ModelType", "AttnMaskType", "AttnType", "LayerType", "PositionEmbeddingType"))


def plain(value: Any) -> Any:
    """``value`` with run arguments (argparse.Namespace) and omegaconf containers and nodes read
    back as dicts, lists and their values."""
    import argparse

    if isinstance(value, argparse.Namespace):
        return plain(vars(value))
    if isinstance(value, _InertValue):
        return plain(value.value)
    if isinstance(value, _Inert):
        attributes = vars(value)
        if "_content" in attributes:
            return plain(attributes["_content"])
        if "_val" in attributes:
            return plain(attributes["_val"])
        return {key: plain(item) for key, item in attributes.items() if not key.startswith("_")}
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def _allowed_globals() -> list:
    """The non-tensor objects real checkpoints hold: run arguments, RNG states (numpy's pickles
    name its internals under numpy._core from numpy 2 on, numpy.core before) and loss scalers."""
    import argparse
    import collections
    import typing

    from numpy._core import multiarray

    return [argparse.Namespace, np.ndarray, np.dtype, multiarray._reconstruct,
            (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            *(type(np.dtype(code)) for code in "?bhilqBHILQefdgFDGSUV"),
            (np.dtype, "numpy.core.multiarray.dtype"),
            *((_Inert, name) for name in _INERT_CLASSES), *((_InertValue, name) for name in _INERT_VALUES),
            # what omegaconf's metadata names: types as values, its flags' default dict
            dict, list, int, float, str, bool, collections.defaultdict, typing.Any]


def load_torch_file(path: str, what: str) -> Any:
    """The object ``torch.save`` wrote to the local file ``path``, tensors as torch tensors on
    the CPU; ``what`` names the expected content in errors."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading {what} needs torch: pip install -e \".[convert]\"") from None
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_allowed_globals()):
            warnings.simplefilter("ignore")  # numpy.core's deprecation, torch's notes on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file ({what})") from None
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused: it holds objects beyond tensors, run arguments and RNG "
                              f"states ({refusal_reason(err)})") from None
    except Exception as err:  # noqa: BLE001 - any other failure of torch.load: a file that is not a checkpoint
        raise CheckpointError(f"{path}: unreadable as {what} ({type(err).__name__}: "
                              f"{(str(err).strip().splitlines() or [''])[0]})") from None


def refusal_reason(err: pickle.UnpicklingError) -> str:
    """What a weights_only load refused, from torch's message (whose advice, weights_only=False,
    would run the file's code: only the reason is kept)."""
    reason = re.search(r"(?:WeightsUnpickler error:\s*|Trying to load )(.*?)(?:\.\s|\n|$)", str(err))
    return reason.group(1) if reason else "unsafe pickle"


def to_numpy(tensor, name: str, source: str) -> np.ndarray:
    """A float32 array of a torch tensor (fp16/bf16 training checkpoints included)."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{source}: {name} is a {type(tensor).__name__}, not a tensor")
    return tensor.detach().to(torch.float32).numpy()
