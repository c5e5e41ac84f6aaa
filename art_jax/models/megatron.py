"""Megatron-LM retriever checkpoints -> two towers by transformers' ``MegatronBertModel`` names.

Reads the biencoders of ART and EMDR2 (DevSinghSachan/art: ``model['retriever/biencoder_model']``)
and of Megatron-LM's ICT/MSS training (``model`` itself): ``query_model`` and ``context_model``
(or one ``shared_model``), each a pre-LayerNorm BERT whose [CLS] output is the embedding, optionally
through ``projection_enc`` (a Linear with bias, Megatron-LM's ``--projection-dim``).

A checkpoint directory holds ``latest_checkpointed_iteration.txt`` (an iteration or ``release``) and
``iter_0000010/mp_rank_00/model_optim_rng.pt`` (or ``release/mp_rank_00/...``); the iteration folder or
the .pt file may be given instead. Only model-parallel size 1 is read. Anything the towers would
not compute as Megatron does (an unknown tensor, the older ICT's ict_head after the tanh pooler,
post-LN residuals, shared layers, mean pooling) is refused rather than dropped.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from art_jax.core.errors import CheckpointError
from art_jax.core.storage import is_remote
from art_jax.models.torch_checkpoints import ConvertedRetriever, TowerWeights, load_torch_file, to_numpy

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILE = "model_optim_rng.pt"
_BIENCODER_KEY = "retriever/biencoder_model"  # ART's and EMDR2's models keep the retriever here

# Megatron's per-layer tensors (after "layers.{i}.") -> transformers' (after "encoder.layer.{i}.");
# the fused query_key_value is split separately. Older Megatron named self_attention "attention".
_LAYER_NAMES = {
    "input_layernorm": "attention.ln",
    "self_attention.dense": "attention.output.dense",
    "post_attention_layernorm": "ln",
    "mlp.dense_h_to_4h": "intermediate.dense",
    "mlp.dense_4h_to_h": "output.dense",
}
_QKV = "self_attention.query_key_value"
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def read_megatron_checkpoint(path: str) -> ConvertedRetriever:
    """The question (query_model) and passage (context_model) towers of the Megatron-LM
    checkpoint at the local ``path`` (a checkpoint directory, an iteration folder or the .pt)."""
    file, tracked_iteration = _locate(path)
    ckpt = load_torch_file(file, "a Megatron-LM checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        found = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{file}: not a Megatron-LM checkpoint (no 'model' dict; found {found})")
    version = ckpt.get("checkpoint_version", 0)  # absent in the oldest checkpoints, which mean 0
    if isinstance(version, bool) or not isinstance(version, (int, float)) or version < 0:
        raise CheckpointError(f"{file}: checkpoint_version={version!r} is not a Megatron checkpoint version")
    args = ckpt.get("args")
    notes: list[str] = []
    biencoder, where, keys = _biencoder(ckpt["model"], file, notes)
    towers = [_tower(biencoder[key], args, version, f"{file}: {where}['{key}']", notes) for key in keys]
    iteration = ckpt.get("iteration", ckpt.get("total_iters", tracked_iteration))
    provenance = {"source": "megatron", "checkpoint": path, "file": file,
                  "iteration": iteration if isinstance(iteration, int) else tracked_iteration,
                  "checkpoint_version": version, "biencoder": where,
                  "towers": {"question": keys[0], "passage": keys[1]}}
    if notes:
        provenance["notes"] = sorted(set(notes))
    return ConvertedRetriever(question=towers[0], passage=towers[1], provenance=provenance)


# ---------------------------------------------------------------------------------------
# Locating the file


def _locate(path: str) -> tuple[str, int | str | None]:
    """(the .pt file, the tracker's iteration or "release", None without a tracker)."""
    if is_remote(path):
        raise CheckpointError(f"{path}: Megatron checkpoints are read from a local path (copy it first)")
    local = os.path.expanduser(path)
    if os.path.isfile(local):
        rank_dir = os.path.dirname(os.path.abspath(local))
        if os.path.basename(rank_dir).startswith("mp_rank_"):
            _check_ranks(os.path.dirname(rank_dir))
        return local, None
    if not os.path.isdir(local):
        raise CheckpointError(f"{path}: no such Megatron checkpoint (a directory with {TRACKER}, an "
                              f"iter_XXXXXXX folder or a {CHECKPOINT_FILE})")
    if os.path.isfile(os.path.join(local, CHECKPOINT_FILE)):  # an mp_rank_00 folder
        return _locate(os.path.join(local, CHECKPOINT_FILE))
    tracked: int | str | None = None
    folder = local
    if not any(name.startswith("mp_rank_") for name in os.listdir(local)):  # not an iteration folder
        tracker = os.path.join(local, TRACKER)
        if not os.path.isfile(tracker):
            return _locate_untracked(path, local)
        with open(tracker) as f:
            text = f.read().strip()
        if text == "release":
            tracked, name = "release", "release"
        elif re.fullmatch(r"\d+", text):
            tracked = int(text)
            name = f"iter_{tracked:07d}"
        else:
            raise CheckpointError(f"{tracker}: {text[:40]!r} is neither an iteration number nor 'release'")
        folder = os.path.join(local, name)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{tracker} names {text}, but {folder} does not exist")
    _check_ranks(folder)
    file = os.path.join(folder, "mp_rank_00", CHECKPOINT_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: no such file (the Megatron checkpoint of {path})")
    return file, tracked


def _locate_untracked(path: str, local: str) -> tuple[str, int | str | None]:
    """A directory without the tracker file (a tarball packed without it): its one iteration
    folder (iter_XXXXXXX or release), if it has exactly one."""
    folders = sorted(name for name in os.listdir(local) if re.fullmatch(r"iter_\d{7}|release", name)
                     and os.path.isdir(os.path.join(local, name)))
    if len(folders) != 1:
        found = f"several iteration folders ({', '.join(folders)}): name one" if folders else "no iter_XXXXXXX folder"
        raise CheckpointError(f"{path}: no {TRACKER} and {found} (expected a Megatron-LM checkpoint directory, "
                              f"an iter_XXXXXXX folder or a {CHECKPOINT_FILE})")
    file, _ = _locate(os.path.join(local, folders[0]))
    return file, "release" if folders[0] == "release" else int(folders[0][5:])


def _check_ranks(folder: str) -> None:
    ranks = sorted(name for name in os.listdir(folder) if name.startswith("mp_rank_"))
    if ranks and ranks != ["mp_rank_00"]:
        raise CheckpointError(f"{folder}: holds {', '.join(ranks)}: a model-parallel (or pipeline-parallel) "
                              "checkpoint; merge its ranks into one with Megatron-LM's tools first")


# ---------------------------------------------------------------------------------------
# The biencoder and its towers


def _biencoder(model: dict, file: str, notes: list[str]) -> tuple[dict, str, tuple[str, str]]:
    """(the dict holding the towers, where it is, the keys of the question and passage towers)."""
    where = "model"
    if _BIENCODER_KEY in model:
        model, where = model[_BIENCODER_KEY], f"model['{_BIENCODER_KEY}']"
    keys = set(model) if isinstance(model, dict) else set()
    if keys == {"shared_model"}:  # Megatron-LM's --biencoder-shared-query-context-model
        notes.append("one shared_model for questions and passages")
        return model, where, ("shared_model", "shared_model")
    if keys and keys <= {"query_model", "context_model"}:
        if len(keys) == 1:
            (only,) = keys
            notes.append(f"the checkpoint holds only {only}: it is both the question and the passage tower")
            return model, where, (only, only)
        return model, where, ("query_model", "context_model")
    found = sorted(map(str, keys)) if isinstance(model, dict) else type(model).__name__
    raise CheckpointError(f"{file}: {where} holds no Megatron biencoder: expected query_model and "
                          f"context_model (or shared_model), found {found}")


def _tower(tower: Any, args: Any, version: float, where: str, notes: list[str]) -> TowerWeights:
    _expect_keys(tower, {"language_model"}, {"projection_enc"}, where)
    lm = tower["language_model"]
    encoder_key = "transformer" if isinstance(lm, dict) and "transformer" in lm else "encoder"  # older name
    lm_where = f"{where}['language_model']"
    _expect_keys(lm, {"embedding", encoder_key}, set(), lm_where)
    emb_where = f"{lm_where}['embedding']"
    _expect_keys(lm["embedding"], {"word_embeddings", "position_embeddings"}, {"tokentype_embeddings"}, emb_where)
    tables = {}
    for name, table in lm["embedding"].items():
        _expect_keys(table, {"weight"}, set(), f"{emb_where}['{name}']")
        tables[name] = to_numpy(table["weight"], f"{name}.weight", emb_where)
        if tables[name].ndim != 2:
            raise CheckpointError(f"{emb_where}: {name}.weight has shape {list(tables[name].shape)}; "
                                  "expected [rows, hidden]")
    enc_where = f"{lm_where}['{encoder_key}']"
    layers, final_norm = _layers(lm[encoder_key], enc_where)

    # sizes from the tensors (the vocabulary as Megatron padded it), checked against args and each other
    vocab, hidden = tables["word_embeddings"].shape
    ffn = layers[0]["mlp.dense_h_to_4h.weight"].shape[0]
    cfg = _config(args, len(layers), hidden, ffn, tables["position_embeddings"].shape[0], where, notes)
    if "tokentype_embeddings" not in tables:  # Megatron adds no token-type term then; zeros add nothing either
        tables["tokentype_embeddings"] = np.zeros((2, hidden), np.float32)
        notes.append("no tokentype_embeddings: written as zeros")
    cfg.update(vocab_size=vocab, type_vocab_size=tables["tokentype_embeddings"].shape[0])
    weights = {"embeddings.word_embeddings.weight": tables["word_embeddings"],
               "embeddings.position_embeddings.weight": tables["position_embeddings"],
               "embeddings.token_type_embeddings.weight": tables["tokentype_embeddings"]}
    _check_shape(tables["tokentype_embeddings"], (cfg["type_vocab_size"], hidden), "tokentype_embeddings.weight",
                 emb_where)
    shapes = {"input_layernorm": [(hidden,)] * 2, "self_attention.dense": [(hidden, hidden), (hidden,)],
              "post_attention_layernorm": [(hidden,)] * 2, "mlp.dense_h_to_4h": [(ffn, hidden), (ffn,)],
              "mlp.dense_4h_to_h": [(hidden, ffn), (hidden,)], _QKV: [(3 * hidden, hidden), (3 * hidden,)]}
    for i, layer in enumerate(layers):
        for theirs, kinds in shapes.items():
            for kind, shape in zip(("weight", "bias"), kinds):
                _check_shape(layer[f"{theirs}.{kind}"], shape, f"layers.{i}.{layer['names'][theirs]}.{kind}",
                             enc_where)
                if theirs == _QKV:
                    for proj, part in zip(("query", "key", "value"),
                                          _split_qkv(layer[f"{_QKV}.{kind}"], cfg["num_attention_heads"], version)):
                        weights[f"encoder.layer.{i}.attention.self.{proj}.{kind}"] = part
                else:
                    weights[f"encoder.layer.{i}.{_LAYER_NAMES[theirs]}.{kind}"] = layer[f"{theirs}.{kind}"]
    for kind, array in final_norm.items():
        _check_shape(array, (hidden,), f"final_layernorm.{kind}", enc_where)
        weights[f"encoder.ln.{kind}"] = array
    if "projection_enc" in tower:  # a Linear on the [CLS] vector: our projection head without LayerNorm
        head_where = f"{where}['projection_enc']"
        _expect_keys(tower["projection_enc"], {"weight", "bias"}, set(), head_where)
        dense = to_numpy(tower["projection_enc"]["weight"], "weight", head_where)
        bias = to_numpy(tower["projection_enc"]["bias"], "bias", head_where)
        if dense.ndim != 2 or dense.shape[1] != hidden:
            raise CheckpointError(f"{head_where}: weight has shape {list(dense.shape)}, expected [dim, {hidden}]")
        _check_shape(bias, (dense.shape[0],), "bias", head_where)
        weights.update({"head.dense.weight": dense, "head.dense.bias": bias})
    return TowerWeights(hf_config=cfg, weights=weights)


def _expect_keys(value: Any, required: set[str], optional: set[str], where: str) -> None:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} is a {type(value).__name__}, expected a dict with {sorted(required)}")
    missing, unknown = sorted(required - value.keys()), sorted(map(str, value.keys() - required - optional))
    if missing or unknown:
        hint = ("; Megatron's older ICT head (ict_head after the tanh pooler) is not a [CLS] retriever"
                if {"ict_head", "pooler"} & set(unknown) else "")
        raise CheckpointError(f"{where}: " + "; ".join(
            f"{label} {keys}" for label, keys in (("missing", missing), ("unknown keys", unknown)) if keys) + hint)


def _layers(encoder: Any, where: str) -> tuple[list[dict], dict]:
    """Per layer, its float32 tensors by the names of _LAYER_NAMES and _QKV ("names": the names found,
    for errors); and the final LayerNorm's."""
    if not isinstance(encoder, dict):
        raise CheckpointError(f"{where} is a {type(encoder).__name__}, not a dict of tensors")
    layers: dict[int, dict] = {}
    final, unknown = {}, []
    for key, value in encoder.items():
        if key in ("final_layernorm.weight", "final_layernorm.bias"):
            final[key.split(".")[1]] = to_numpy(value, key, where)
            continue
        match = _LAYER_KEY.match(str(key))
        name = match and re.sub(r"^attention\.", "self_attention.", match.group(2))  # the older name
        if not match or (name not in _LAYER_NAMES and name != _QKV):
            unknown.append(str(key))
            continue
        layer = layers.setdefault(int(match.group(1)), {"names": {}})
        layer[f"{name}.{match.group(3)}"] = to_numpy(value, key, where)
        layer["names"][name] = match.group(2)
    if unknown:
        raise CheckpointError(f"{where}: unknown tensors {sorted(unknown)[:8]} (refusing to drop trained weights)")
    if not layers:
        raise CheckpointError(f"{where}: no transformer layers (layers.0.* tensors)")
    if sorted(layers) != list(range(len(layers))):
        raise CheckpointError(f"{where}: layers numbered {sorted(layers)}; expected 0 to {len(layers) - 1}")
    for i in range(len(layers)):
        for name in (*_LAYER_NAMES, _QKV):
            for kind in ("weight", "bias"):
                if f"{name}.{kind}" not in layers[i]:
                    raise CheckpointError(f"{where}: missing layers.{i}.{name}.{kind}")
    for kind in ("weight", "bias"):
        if kind not in final:
            raise CheckpointError(f"{where}: missing final_layernorm.{kind}")
    return [layers[i] for i in range(len(layers))], final


def _check_shape(array: np.ndarray, shape: tuple, name: str, where: str) -> None:
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"{where}: {name} has shape {list(array.shape)}, expected {list(shape)}")


def _split_qkv(array: np.ndarray, heads: int, version: float) -> list[np.ndarray]:
    """Query, key and value of a fused [3 * h, ...] tensor, each [h, ...], its rows (heads, head_dim)
    as transformers splits heads. The fused rows are, by checkpoint_version (Megatron-LM's
    fix_query_key_value_ordering): 0 [3, heads, head_dim]; 1.0 [heads, head_dim, 3] (ART's own
    checkpoints: it splits view(heads, head_dim, 3)); 2.0 and later [heads, 3, head_dim]."""
    rest = array.shape[1:]
    head_dim = array.shape[0] // (3 * heads)
    if version == 0:
        fused = array.reshape(3, heads, head_dim, *rest)
    elif version < 2:
        fused = np.moveaxis(array.reshape(heads, head_dim, 3, *rest), 2, 0)
    else:
        fused = np.moveaxis(array.reshape(heads, 3, head_dim, *rest), 1, 0)
    return [np.ascontiguousarray(fused[i].reshape(heads * head_dim, *rest)) for i in range(3)]


# ---------------------------------------------------------------------------------------
# Config


def _arg(args: Any, name: str, default: Any = None) -> Any:
    value = args.get(name) if isinstance(args, dict) else getattr(args, name, None)
    return default if value is None else value


def _config(args: Any, layers: int, hidden: int, ffn: int, positions: int, where: str,
            notes: list[str]) -> dict[str, Any]:
    """transformers' MegatronBertConfig dict: sizes from the tensors, checked against the run's
    args; heads, epsilon, activation and dropout from the args."""
    if args is None:
        notes.append("no args in the checkpoint: layer_norm_eps 1e-5, exact gelu and dropout 0.1 assumed")
    unique = _arg(args, "num_unique_layers")  # first: shared layers would show as missing ones
    if unique is not None and unique != _arg(args, "num_layers", layers):
        raise CheckpointError(f"{where}: args.num_unique_layers={unique}: layers shared across depth "
                              "are not supported")
    for name, found in (("num_layers", layers), ("hidden_size", hidden), ("ffn_hidden_size", ffn),
                        ("max_position_embeddings", positions)):
        wanted = _arg(args, name)
        if wanted is not None and wanted != found:
            raise CheckpointError(f"{where}: args.{name}={wanted} but the tensors have {found}")
    heads = _arg(args, "num_attention_heads")
    if heads is None:
        if hidden % 64:
            raise CheckpointError(f"{where}: args lack num_attention_heads and hidden size {hidden} is "
                                  "not a multiple of 64 to infer it")
        heads = hidden // 64
        notes.append(f"args lack num_attention_heads: {heads} assumed (64 per head)")
    if heads <= 0 or hidden % heads:
        raise CheckpointError(f"{where}: hidden size {hidden} is not divisible by {heads} attention heads")
    kv_channels = _arg(args, "kv_channels")
    if kv_channels is not None and kv_channels * heads != hidden:
        raise CheckpointError(f"{where}: args.kv_channels={kv_channels} x {heads} heads != hidden size {hidden}")
    if _arg(args, "apply_residual_connection_post_layernorm", False):
        raise CheckpointError(f"{where}: args.apply_residual_connection_post_layernorm is set (BERT's residual "
                              "order); only Megatron's pre-LayerNorm residuals are supported")
    pool = _arg(args, "pool_type", "cls-token")
    if pool != "cls-token":
        raise CheckpointError(f"{where}: args.pool_type={pool!r}; only [CLS] pooling ('cls-token') is supported")
    # Megatron's fused bias-GELU and --openai-gelu are the tanh form; otherwise torch's exact gelu
    tanh = bool(_arg(args, "bias_gelu_fusion", False) or _arg(args, "openai_gelu", False))
    return {
        "architectures": ["MegatronBertModel"], "model_type": "megatron-bert", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": int(heads), "intermediate_size": ffn,
        "max_position_embeddings": positions, "layer_norm_eps": float(_arg(args, "layernorm_epsilon", 1e-5)),
        "hidden_act": "gelu_new" if tanh else "gelu",
        "hidden_dropout_prob": float(_arg(args, "hidden_dropout", 0.1)),
        "attention_probs_dropout_prob": float(_arg(args, "attention_dropout", 0.1)),
        "position_embedding_type": "absolute", "pad_token_id": 0,
    }
