"""facebookresearch/DPR's training checkpoints (``dpr_biencoder.N`` / ``*.cp``) as two retriever towers.

DPR saves ``CheckpointState._asdict()`` with ``torch.save``: ``model_dict`` (the BiEncoder's state
dict), ``optimizer_dict``, ``scheduler_dict``, ``offset``, ``epoch`` and ``encoder_params`` (the
run's encoder settings: a dict, or an argparse.Namespace in old versions). The BiEncoder holds
two ``HFBertEncoder``s, transformers ``BertModel`` subclasses: ``question_model.<BertModel name>``
and ``ctx_model.<BertModel name>`` (the pooler included), and ``<tower>.encode_proj.{weight,bias}``
(hidden -> projection_dim, no LayerNorm) when the run had ``projection_dim > 0``. Both towers are
always saved (a file without ``ctx_model.*`` is refused: cut short, or not DPR's).

The towers' embedding is the last layer's [CLS] state (through encode_proj when there is one),
what DPR's ``HFBertEncoder.forward`` returns with ``representation_token_pos=0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from art_jax.core.errors import CheckpointError
from art_jax.models.hf import HEAD_PREFIX
from art_jax.models.torch_checkpoints import ConvertedRetriever, TowerWeights, load_torch_file, plain, to_numpy

_TOWERS = {"question": "question_model.", "passage": "ctx_model."}
# transformers' BertModel buffers that older releases saved in state dicts: not weights
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_PROJECTION = "encode_proj."
_HEAD_DIM = 64  # every released BERT size (tiny 128/2 ... large 1024/16) has 64-wide attention heads


def read_dpr_checkpoint(path: str) -> ConvertedRetriever:
    """The question and passage towers of the DPR training checkpoint ``path`` (a local file), by
    transformers' ``BertModel`` names with the projection as ``head.dense.*``, for
    ``art_jax.models.hf.bert_from_weights``. A file that is not such a checkpoint, or that asks
    for objects beyond tensors and run settings (which are refused, never run), is a
    CheckpointError naming the file and what is wrong."""
    state = load_torch_file(path, "a DPR training checkpoint")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a DPR training checkpoint: it holds a {type(state).__name__}, "
                              "expected a dict with model_dict, epoch and encoder_params")
    model = state.get("model_dict")
    if not isinstance(model, dict):
        found = "no model_dict" if model is None else f"model_dict is a {type(model).__name__}"
        raise CheckpointError(f"{path}: not a DPR training checkpoint: {found} (its keys: {sorted(map(str, state))})")
    params = _encoder_params(state.get("encoder_params"), path)
    model_type = _setting(params, "encoder_model_type")
    if model_type not in (None, "hf_bert"):
        raise CheckpointError(f"{path}: encoder_params encoder_model_type={model_type!r}; only DPR's BERT "
                              "encoders (hf_bert) are supported")

    groups: dict[str, dict[str, Any]] = {side: {} for side in _TOWERS}
    stray = []
    for key, value in model.items():
        key = str(key)
        side = next((side for side, prefix in _TOWERS.items() if key.startswith(prefix)), None)
        if side is None:
            stray.append(key)
        elif key.removeprefix(_TOWERS[side]) not in _BUFFERS:
            groups[side][key.removeprefix(_TOWERS[side])] = value
    for side, prefix in _TOWERS.items():
        if not groups[side]:
            raise CheckpointError(f"{path}: model_dict has no {prefix}* tensors (a DPR BiEncoder saves both "
                                  f"towers; its tensors start with {sorted({str(k).split('.', 1)[0] for k in model})})")
    if stray:
        shown = ", ".join(sorted(stray)[:5]) + (f", ... ({len(stray)} in all)" if len(stray) > 5 else "")
        raise CheckpointError(f"{path}: model_dict has tensors outside question_model.* and ctx_model.*: {shown}")

    provenance: dict[str, Any] = {"source": "dpr", "checkpoint": path, "epoch": _jsonable(state.get("epoch")),
                                  "offset": _jsonable(state.get("offset")), "encoder_params": _jsonable(params)}
    heads = _setting(params, "num_attention_heads")
    towers = {}
    for side, prefix in _TOWERS.items():
        weights = {}
        for name, tensor in groups[side].items():
            ours = f"{HEAD_PREFIX}dense.{name.removeprefix(_PROJECTION)}" if name.startswith(_PROJECTION) else name
            weights[ours] = to_numpy(tensor, f"model_dict[{prefix}{name}]", path)
        towers[side] = TowerWeights(_bert_config(weights, prefix, heads, params, path, provenance), weights)
    return ConvertedRetriever(towers["question"], towers["passage"], provenance)


def _encoder_params(params, path: str) -> dict[str, Any]:
    """``encoder_params`` as a dict: DPR's flat one (pretrained_model_cfg, projection_dim, ...),
    an old run's argparse.Namespace, a hydra run's {"encoder": DictConfig}, or none."""
    if params is None:
        return {}
    params = plain(params)
    if not isinstance(params, Mapping):
        raise CheckpointError(f"{path}: encoder_params is a {type(params).__name__}, expected a dict of the "
                              "run's encoder settings")
    return dict(params)


def _setting(params: dict[str, Any], key: str):
    """A run setting: at the top of encoder_params, or under its "encoder" (DPR's hydra runs)."""
    if key in params:
        return params[key]
    nested = params.get("encoder")
    return nested.get(key) if isinstance(nested, Mapping) else None


def _bert_config(weights: dict[str, np.ndarray], prefix: str, heads, params: dict[str, Any], path: str,
                 provenance: dict[str, Any]) -> dict[str, Any]:
    """transformers' BertConfig dict of one tower, its sizes read off the tensors."""
    def shape(name: str) -> tuple[int, ...]:
        if name not in weights:
            raise CheckpointError(f"{path}: model_dict has no {prefix}{name} (the {prefix.rstrip('.')} tower "
                                  "is not a complete BERT)")
        return weights[name].shape

    vocab_size, hidden_size = shape("embeddings.word_embeddings.weight")
    layers = {int(name.split(".")[2]) for name in weights
              if name.startswith("encoder.layer.") and name.split(".")[2].isdigit()}
    if not layers:
        raise CheckpointError(f"{path}: model_dict has no {prefix}encoder.layer.* tensors")
    if heads is None:
        if hidden_size % _HEAD_DIM:
            raise CheckpointError(f"{path}: the checkpoint does not say its number of attention heads, and "
                                  f"hidden size {hidden_size} is not a multiple of BERT's 64-wide heads")
        heads = hidden_size // _HEAD_DIM
        provenance["num_attention_heads"] = f"{heads}: hidden_size / 64, as in every BERT size (not in the checkpoint)"
    dropout = _setting(params, "dropout")
    dropout = 0.1 if not dropout else float(dropout)  # DPR's HFBertEncoder keeps BERT's 0.1 for dropout 0
    return {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size), "num_hidden_layers": max(layers) + 1, "num_attention_heads": int(heads),
        "intermediate_size": int(shape("encoder.layer.0.intermediate.dense.weight")[0]),
        "max_position_embeddings": int(shape("embeddings.position_embeddings.weight")[0]),
        "type_vocab_size": int(shape("embeddings.token_type_embeddings.weight")[0]),
        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout, "initializer_range": 0.02, "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }


def _jsonable(value):
    """``value`` as JSON can hold it (an export records it): containers recursively, other objects as text."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return repr(value)
