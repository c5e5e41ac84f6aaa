"""Model shapes without weights: what sizing a run (its mesh, a dry run's compile) needs.

A checkpoint folder's config.json gives them; for the papers' models the values of their
Hugging Face configs ship here, so that a dry run of a paper config downloads nothing.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from art_jax.core import storage
from art_jax.core.errors import CheckpointError
from art_jax.core.fileio import read_json
from art_jax.models.bert import Bert
from art_jax.models.hf import abstract_module, bert_config_from_hf, read_config, resolve_checkpoint, t5_config_from_hf
from art_jax.models.t5 import T5

_BERT = dict(model_type="bert", vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)
_ROBERTA = dict(model_type="roberta", vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                pad_token_id=1, layer_norm_eps=1e-5)
_T5_V11 = dict(model_type="t5", vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False)

# the config.json fields that decide parameter shapes, as the hub's configs hold them
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": dict(_BERT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072),
    "bert-large-uncased": dict(_BERT, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                               intermediate_size=4096),
    # T0 3B is T5 v1.1 XL (LM-adapted); the 11B teacher is T5 v1.1 XXL (LM-adapted)
    "bigscience/T0_3B": dict(_T5_V11, d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "google/t5-xl-lm-adapt": dict(_T5_V11, d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "google/t5-xxl-lm-adapt": dict(_T5_V11, d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
    "roberta-base": dict(_ROBERTA, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072),
    "roberta-large": dict(_ROBERTA, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096),
    "t5-base": dict(model_type="t5", vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(model_type="t5", vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24,
                     num_heads=16),
}


def hf_config(name: str, folder: str | None = None) -> dict[str, Any]:
    """The config.json of checkpoint ``name`` (its local ``folder`` when already known); a known
    hub id that is no local folder gives the shipped shapes without downloading, another hub id
    downloads its config.json alone, a URL's (gs://) is read alone (not its weights)."""
    if folder is None and name in KNOWN_CONFIGS and not os.path.isdir(os.path.expanduser(name)):
        return dict(KNOWN_CONFIGS[name])
    if folder is None and storage.is_remote(name):
        path = f"{name.rstrip('/')}/config.json"
        if not storage.isfile(path):
            raise CheckpointError(f"checkpoint folder {name} has no config.json")
        return read_json(path)
    return read_config(folder or resolve_checkpoint(name, config_only=True))


def abstract_t5(hf: dict[str, Any], **overrides) -> T5:
    """A T5 of these shapes with no memory behind it (jax.ShapeDtypeStruct parameters)."""
    untied = hf.get("tie_word_embeddings", True) is False
    return abstract_module(T5, t5_config_from_hf(hf, {}, untied_lm_head=untied, **overrides))


def abstract_bert(hf: dict[str, Any], **overrides) -> Bert:
    return abstract_module(Bert, bert_config_from_hf(hf, {}, **{"with_pooler": True, **overrides}))


def parameter_bytes(tree) -> int:
    """Bytes of every array (or shape) in ``tree``."""
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
               if hasattr(leaf, "shape"))
