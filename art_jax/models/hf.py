"""Hugging Face checkpoints <-> art_jax parameters.

A checkpoint is a folder (config.json + model.safetensors, sharded safetensors, or
pytorch_model.bin), a hub id, or a gs:// folder. Loading is strict: a missing,
unexpected or mis-shaped weight is an error that names it; nothing is ever left at
its random initialisation (but a projection head asked for where the folder has none).

Retriever towers are BERT or RoBERTa folders (``model_type`` "bert" or "roberta"). A tower's
projection head, which transformers' models do not have, lives beside the model as
sentence-transformers modules (modules.json: Transformer, Pooling (CLS), Dense, LayerNorm),
so that ``SentenceTransformer(folder)`` computes the same embedding.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import warnings
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from art_jax.core.errors import CheckpointError
from art_jax.core.remote import local_copy, staging_parent
from art_jax.core.sharding import DEFAULT_RULES, state_shardings
from art_jax.core.storage import is_remote, publish_folder
from art_jax.models.bert import MODEL_TYPES, Bert, BertConfig, ProjectionHead
from art_jax.models.t5 import T5, T5Config
from art_jax.models.torch_checkpoints import refusal_reason

# ---------------------------------------------------------------------------------------
# Locating and reading checkpoint folders


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_LOCAL_PREFIXES = ("/", "./", "../", "~")


def resolve_checkpoint(name: str, *, config_only: bool = False) -> str:
    """Local folder for a folder path, gs:// folder or hub id (downloads are cached; of a hub id,
    only its config.json when ``config_only``: what sizing a model needs)."""
    if is_remote(name):  # gs://
        folder = local_copy(name)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(f"checkpoint folder {name} has no config.json")
        return folder
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise CheckpointError(f"checkpoint {name!r} is a file; expected a folder with config.json")
    if name.startswith(_LOCAL_PREFIXES) or name.count("/") > 1:
        raise CheckpointError(f"checkpoint folder not found: {name}")
    if config_only:
        return _download_hub(name, ["config.json"])
    folder = _download_hub(name, CHECKPOINT_FILES)
    # offline (or the hub unreachable), the hub's cache answers with whatever snapshot it holds: a
    # dry run's is a config alone
    if not any(os.path.exists(os.path.join(folder, f)) for f in _WEIGHT_FILES):
        raise CheckpointError(f"checkpoint {name!r}: the local Hugging Face cache holds no weights of it (a "
                              "--dry-run fetches config.json alone); fetch them online (HF_HUB_OFFLINE unset, the "
                              "hub reachable)")
    return folder


# a checkpoint's files on the hub (a projection head's modules: 2_Dense/*, 3_LayerNorm/*)
CHECKPOINT_FILES = ["*.json", "*.safetensors", "pytorch_model.bin", "*/pytorch_model.bin", "*.model", "*.txt"]


def _download_hub(repo_id: str, patterns: list[str]) -> str:
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as err:  # offline, unknown repo, auth: one line (the hub's own texts run to several)
        offline = " (HF_HUB_OFFLINE is set: only the local hub cache was looked in)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(
            f"checkpoint {repo_id!r} is not a local folder and could not be fetched from the "
            f"Hugging Face hub{offline}: {type(err).__name__}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"no config.json in checkpoint folder {folder}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from err


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped arrays (bfloat16 included, which numpy's loader refuses)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_len is None or 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, shorter than its header)")
        try:
            header = json.loads(f.read(header_len))
            declared = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"),
                           default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    if 8 + header_len + declared > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, its header declares "
                              f"{8 + header_len + declared})")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        out[key] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(f"{path}: reading pytorch_model.bin needs torch installed "
                              "(or convert the checkpoint to safetensors)") from err
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says what matters
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused: not a plain tensor file ({refusal_reason(err)}); "
                              "convert a trusted copy to safetensors") from None
    except Exception as err:  # noqa: BLE001 - any other failure of torch.load: a file that is not a checkpoint
        with open(path, "rb") as f:
            if f.read(40).startswith(b"version https://git-lfs"):
                raise CheckpointError(f"{path}: a Git LFS pointer, not the weights (run `git lfs pull`)") from None
        raise CheckpointError(f"{path}: unreadable as a PyTorch checkpoint ({type(err).__name__}: "
                              f"{_first_line(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors by name")
    return {k: (v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy())
            for k, v in state.items()}


def read_weights(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder by their Hugging Face names."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    torch_bin = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(single):
        return _read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(_read_safetensors(os.path.join(folder, shard)))
        return weights
    if os.path.isfile(torch_bin):
        return _read_torch_bin(torch_bin)
    raise CheckpointError(f"no weights in checkpoint folder {folder} (looked for {', '.join(_WEIGHT_FILES)})")


# ---------------------------------------------------------------------------------------
# Name tables: one entry per HF tensor, shared by loading and export.


HEAD_PREFIX = "head."  # the projection head's tensors: head.dense.weight, head.norm.bias, ...


@dataclasses.dataclass(frozen=True)
class WeightName:
    hf: str  # Hugging Face tensor name
    ours: tuple[str | int, ...]  # path in the NNX state
    transpose: bool  # torch Linear stores [out, in]; our kernels are [in, out]


def _linear(hf: str, ours: tuple, *, bias: bool) -> list[WeightName]:
    names = [WeightName(f"{hf}.weight", ours + ("kernel",), True)]
    if bias:
        names.append(WeightName(f"{hf}.bias", ours + ("bias",), False))
    return names


def _layer_norm(hf: str, ours: tuple) -> list[WeightName]:
    return [WeightName(f"{hf}.weight", ours + ("scale",), False),
            WeightName(f"{hf}.bias", ours + ("bias",), False)]


def _embedding(hf: str, ours: tuple) -> list[WeightName]:
    return [WeightName(f"{hf}.weight", ours + ("embedding",), False)]


def bert_names(cfg: BertConfig) -> list[WeightName]:
    """The tower's tensors by their transformers names: ``BertModel``'s / ``RobertaModel``'s, or
    ``MegatronBertModel``'s for the pre-LayerNorm BERT (norms at ``attention.ln`` and ``ln`` of each
    layer, before attention and MLP, and ``encoder.ln`` last; none on the embeddings)."""
    names = []
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        names += _embedding(f"embeddings.{table}", ("embeddings", table))
    pre_ln = cfg.pre_layer_norm
    if not pre_ln:
        names += _layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"))
    for i in range(cfg.num_layers):
        hf, ours = f"encoder.layer.{i}", ("layers", i)
        for proj in ("query", "key", "value"):
            names += _linear(f"{hf}.attention.self.{proj}", ours + (proj,), bias=True)
        names += _linear(f"{hf}.attention.output.dense", ours + ("attention_output",), bias=True)
        names += _layer_norm(f"{hf}.attention.ln" if pre_ln else f"{hf}.attention.output.LayerNorm",
                             ours + ("attention_norm",))
        names += _linear(f"{hf}.intermediate.dense", ours + ("intermediate",), bias=True)
        names += _linear(f"{hf}.output.dense", ours + ("output",), bias=True)
        names += _layer_norm(f"{hf}.ln" if pre_ln else f"{hf}.output.LayerNorm", ours + ("output_norm",))
    if pre_ln:
        names += _layer_norm("encoder.ln", ("final_norm",))
    if cfg.with_pooler:
        names += _linear("pooler.dense", ("pooler", "dense"), bias=True)
    if cfg.projection:  # not in the Hugging Face file: sentence-transformers' Dense and LayerNorm modules
        names += _linear(f"{HEAD_PREFIX}dense", ("head", "dense"), bias=True)
        if cfg.projection_norm:
            names += _layer_norm(f"{HEAD_PREFIX}norm", ("head", "norm"))
    return names


def t5_names(cfg: T5Config) -> list[WeightName]:
    names = _embedding("shared", ("shared",))
    ffn = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
    for stack, count in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        for i in range(count):
            hf, ours = f"{stack}.block.{i}.layer", (stack, "blocks", i)
            sublayers = [("SelfAttention", "self_attention")]
            if stack == "decoder":
                sublayers.append(("EncDecAttention", "cross_attention"))
            for j, (hf_attn, our_attn) in enumerate(sublayers):
                for proj in ("q", "k", "v", "o"):
                    names += _linear(f"{hf}.{j}.{hf_attn}.{proj}", ours + (our_attn, proj), bias=False)
                names.append(WeightName(f"{hf}.{j}.layer_norm.weight", ours + (f"{our_attn}_norm", "weight"), False))
            if i == 0:
                names += _embedding(f"{hf}.0.SelfAttention.relative_attention_bias",
                                    ours + ("self_attention", "relative_attention_bias"))
            j = len(sublayers)
            for proj in ffn:
                names += _linear(f"{hf}.{j}.DenseReluDense.{proj}", ours + ("feed_forward", proj), bias=False)
            names.append(WeightName(f"{hf}.{j}.layer_norm.weight", ours + ("feed_forward_norm", "weight"), False))
        names.append(WeightName(f"{stack}.final_layer_norm.weight", (stack, "final_layer_norm", "weight"), False))
    if cfg.untied_lm_head:
        names += _linear("lm_head", ("lm_head",), bias=False)
    return names


# ---------------------------------------------------------------------------------------
# Configs


def bert_config_from_hf(hf: dict[str, Any], weights: dict[str, np.ndarray], **overrides) -> BertConfig:
    """The BertConfig of a "bert", "roberta", "megatron-bert" or "dpr" config.json (absent keys take
    transformers' defaults); ``weights`` (their names, a DPR folder's as ``load_bert`` renames them)
    say whether there is a pooler and a projection head, and the head's kind."""
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new"):
        raise CheckpointError(f"config.json: hidden_act={act!r} is not supported (BERT uses exact 'gelu'; "
                              "'gelu_new' is its tanh form)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError("config.json: only position_embedding_type='absolute' is supported")
    cfg = BertConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02), with_pooler="pooler.dense.weight" in weights,
        hidden_act=act)
    head = weights.get(f"{HEAD_PREFIX}dense.weight")
    if head is not None:
        cfg = dataclasses.replace(cfg, projection=True, projection_norm=f"{HEAD_PREFIX}norm.weight" in weights,
                                  projection_dim=0 if head.shape[0] == cfg.hidden_size else int(head.shape[0]))
    kind = hf.get("model_type", "bert")
    if kind == "roberta":  # RobertaConfig's pad_token_id is 1
        cfg = dataclasses.replace(cfg, model_type="roberta", pad_token_id=hf.get("pad_token_id", 1))
    elif kind == "megatron-bert":
        cfg = dataclasses.replace(cfg, model_type="megatron-bert", pad_token_id=hf.get("pad_token_id", 0))
    return dataclasses.replace(cfg, **overrides)


def bert_config_to_hf(cfg: BertConfig) -> dict[str, Any]:
    return {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "position_embedding_type": "absolute", "pad_token_id": cfg.pad_token_id,
        "initializer_range": cfg.initializer_range, "hidden_act": cfg.hidden_act,
        **_ARCHITECTURES[cfg.model_type],
    }


_ARCHITECTURES = {"bert": {}, "roberta": {"architectures": ["RobertaModel"], "model_type": "roberta"},
                  "megatron-bert": {"architectures": ["MegatronBertModel"], "model_type": "megatron-bert"}}


def t5_config_from_hf(hf: dict[str, Any], weights: dict[str, np.ndarray], **overrides) -> T5Config:
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise CheckpointError(f"config.json: feed_forward_proj={proj!r} is not a T5 FFN kind")
    activation = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if activation not in ("relu", "gelu_new", "gelu"):
        raise CheckpointError(f"config.json: activation {activation!r} is not supported")
    # transformers writes scale_decoder_outputs; older configs mean the same by tie_word_embeddings.
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    head = weights.get("lm_head.weight")
    untied = head is not None and not np.array_equal(head, weights.get("shared.weight"))
    cfg = T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        num_layers=hf["num_layers"], num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        num_heads=hf["num_heads"], relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), gated=parts[0] == "gated",
        activation=activation, untied_lm_head=untied, scale_decoder_outputs=bool(scale),
        dropout_rate=hf.get("dropout_rate", 0.1), **_special_tokens(hf))
    return dataclasses.replace(cfg, **overrides)


def _special_tokens(hf: dict[str, Any]) -> dict[str, int]:
    """pad, eos and decoder start ids of a Hugging Face T5 config (T5's 0, 1, 0 where absent; an eos
    list, as generation configs allow, gives its first)."""
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    pad = 0 if hf.get("pad_token_id") is None else hf["pad_token_id"]
    start = hf.get("decoder_start_token_id")
    return {"pad_token_id": pad, "eos_token_id": 1 if eos is None else eos,
            "decoder_start_token_id": pad if start is None else start}


def t5_config_to_hf(cfg: T5Config) -> dict[str, Any]:
    proj = ("gated-" if cfg.gated else "") + ("gelu" if cfg.activation == "gelu_new" and cfg.gated else cfg.activation)
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "feed_forward_proj": proj,
        "dropout_rate": cfg.dropout_rate, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id, "decoder_start_token_id": cfg.decoder_start_token_id,
        # the two flags transformers reads to decide head tying and output scaling
        "tie_word_embeddings": not cfg.untied_lm_head and cfg.scale_decoder_outputs,
        "scale_decoder_outputs": cfg.scale_decoder_outputs,
    }


# ---------------------------------------------------------------------------------------
# Loading


# Tensors a checkpoint may carry that the encoder has no use for (MLM heads, buffers).
_BERT_IGNORED = {"bert": re.compile(r"^(cls\.|embeddings\.position_ids$)"),
                 "roberta": re.compile(r"^(lm_head\.|embeddings\.(position_ids|token_type_ids)$)")}
_BERT_IGNORED["megatron-bert"] = _BERT_IGNORED["dpr"] = _BERT_IGNORED["bert"]
# the prefix of the encoder's tensors in a file of a model with heads (BertForPreTraining, ...)
_BERT_PREFIX = {"bert": "bert.", "roberta": "roberta.", "megatron-bert": "bert.", "dpr": ""}
# DPR's towers (transformers' DPRQuestionEncoder / DPRContextEncoder): a BertModel without pooler, then
# encode_proj (hidden -> projection_dim) when projection_dim > 0
_DPR_TOWERS = ("question_encoder.", "ctx_encoder.")
_T5_IGNORED = re.compile(
    r"^((encoder|decoder)\.embed_tokens\.weight|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight)$")


def _normalise_bert_names(weights: dict[str, np.ndarray], model_type: str = "bert",
                          source: str = "the checkpoint") -> dict[str, np.ndarray]:
    """bert-base-style files: a 'bert.' prefix ('roberta.' for RoBERTa) and LayerNorm gamma/beta;
    a DPR tower's 'question_encoder.bert_model.' / 'ctx_encoder.bert_model.' prefix, and its
    encode_proj as the projection head's Dense."""
    if model_type == "dpr":
        weights = _dpr_tower_names(weights, source)
    out = {}
    for key, value in weights.items():
        key = key.removeprefix(_BERT_PREFIX[model_type])
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        out[key] = value
    return out


def _dpr_tower_names(weights: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    towers = {prefix for prefix in _DPR_TOWERS for key in weights if key.startswith(prefix)}
    if len(towers) != 1:
        found = sorted({key.split(".", 1)[0] for key in weights})
        raise CheckpointError(f"{source}: a DPR folder must hold one encoder, question_encoder.* or ctx_encoder.* "
                              f"(DPRQuestionEncoder / DPRContextEncoder; a DPRReader is not a retriever tower); "
                              f"its tensors start with {found}")
    prefix = towers.pop()
    out = {}
    for key, value in weights.items():
        key = key.removeprefix(prefix)
        if key.startswith("encode_proj."):
            key = HEAD_PREFIX + "dense." + key.removeprefix("encode_proj.")
        out[key.removeprefix("bert_model.")] = value
    return out


def _fill_state(abstract_state: nnx.State, names: list[WeightName], weights: dict[str, np.ndarray],
                ignored: re.Pattern, source: str, shardings, param_dtype) -> nnx.State:
    flat = dict(nnx.to_flat_state(abstract_state))
    expected = {n.hf for n in names}
    missing = sorted(expected - weights.keys())
    unexpected = sorted(k for k in weights.keys() - expected if not ignored.search(k))
    mis_shaped = []
    for n in names:
        if n.hf in weights:
            got = weights[n.hf].shape[::-1] if n.transpose else weights[n.hf].shape
            if tuple(got) != tuple(flat[n.ours].shape):
                mis_shaped.append(f"{n.hf} {tuple(weights[n.hf].shape)} (expected "
                                  f"{tuple(flat[n.ours].shape[::-1] if n.transpose else flat[n.ours].shape)})")
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label} weights: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model: " + "; ".join(problems))

    flat_shardings = ({path: var.get_value() for path, var in nnx.to_flat_state(shardings)}
                      if shardings is not None else {})
    values = {}
    for n in names:
        array = np.asarray(weights[n.hf])
        array = (array.T if n.transpose else array).astype(param_dtype)
        values[n.ours] = jax.device_put(array, flat_shardings.get(n.ours))
    return nnx.from_flat_state({path: var.replace(values[path]) for path, var in flat.items()})


def abstract_module(module_cls, cfg):
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0)))


def with_config(module, **fields):
    """``module`` (a Bert or T5) rebuilt with its config's ``fields`` replaced (compute dtype, remat:
    settings that change no parameter), sharing the source's Variables."""
    graph, _ = nnx.split(abstract_module(type(module), dataclasses.replace(module.config, **fields)))
    return nnx.merge(graph, nnx.state(module))


def for_inference(module):
    """``module`` computing as an exported one does (float32, no remat): an index or evaluation during
    training gives what the run's checkpoint gives later (shares its Variables)."""
    cfg = module.config
    return module if cfg.dtype == "float32" and not cfg.remat else with_config(module, dtype="float32", remat=False)


def init_module(module_cls, cfg, seed: int = 0, mesh=None, rules=DEFAULT_RULES):
    """A randomly initialised module, its parameters placed by the mesh's rules."""
    with nnx.use_eager_sharding(False):
        model = module_cls(cfg, rngs=nnx.Rngs(seed))
    if mesh is not None:
        graphdef, state = nnx.split(model)
        shardings = state_shardings(state, mesh, rules)
        state = jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings)
        model = nnx.merge(graphdef, state)
    return model


def _load(folder: str, module_cls, cfg, names, weights, ignored, mesh, rules):
    model = abstract_module(module_cls, cfg)
    graphdef, abstract_state = nnx.split(model)
    shardings = state_shardings(abstract_state, mesh, rules) if mesh is not None else None
    state = _fill_state(abstract_state, names, weights, ignored, folder, shardings,
                        getattr(cfg, "param_dtype", "float32"))
    return nnx.merge(graphdef, state)


def _check_model_type(hf_config: dict, folder: str, wanted: tuple[str, ...]) -> str:
    kind = hf_config.get("model_type")
    if kind not in wanted:
        expected = " or ".join(map(repr, wanted))
        raise CheckpointError(f"{folder}/config.json: model_type={kind!r} is not a supported "
                              f"architecture here (expected {expected})")
    return kind


def load_bert(name: str, *, mesh=None, rules=DEFAULT_RULES, projection: bool | None = None, seed: int = 0,
              **overrides) -> Bert:
    """A retriever tower from a Hugging Face checkpoint: BERT, RoBERTa, Megatron's pre-LN BERT
    (``megatron-bert``), or one of DPR's encoders (``dpr``: a DPRQuestionEncoder or DPRContextEncoder
    folder, its encode_proj as the projection head); ``overrides`` set BertConfig fields (dtype, dropout).

    ``projection``: None, the tower has the projection head exactly when the folder carries one
    (sentence-transformers' Dense + LayerNorm modules after CLS pooling, as an export writes
    them); True, the folder's head, or a freshly initialised one (``seed``) where it has none;
    False, no head (a folder with one is refused rather than its trained head dropped)."""
    folder = resolve_checkpoint(name)
    hf_config = read_config(folder)
    model = bert_from_weights(hf_config, read_weights(folder), read_head(folder), source=folder, mesh=mesh,
                              rules=rules, **overrides)
    return with_projection(model, projection, seed=seed, mesh=mesh, rules=rules, source=folder)


def bert_from_weights(hf_config: dict[str, Any], weights: dict[str, np.ndarray],
                      head: dict[str, np.ndarray] | None = None, *, source: str, mesh=None, rules=DEFAULT_RULES,
                      **overrides) -> Bert:
    """The tower a config.json dict and its tensors by transformers' names describe (what
    ``load_bert`` reads from a folder; ``head``: a projection head's head.* tensors kept beside
    the model). Loading is strict (see ``_fill_state``); ``source`` names the checkpoint in errors."""
    kind = _check_model_type(hf_config, source, MODEL_TYPES + ("dpr",))
    weights = {**_normalise_bert_names(weights, kind, source), **(head or {})}
    cfg = bert_config_from_hf(hf_config, weights, **overrides)
    return _load(source, Bert, cfg, bert_names(cfg), weights, _BERT_IGNORED[kind], mesh, rules)


def with_projection(tower: Bert, projection: bool | None, *, seed: int = 0, mesh=None, rules=DEFAULT_RULES,
                    source: str = "the tower") -> Bert:
    """``tower`` as ``projection`` asks (see ``load_bert``): itself, or with a freshly initialised
    projection head (a Dense of std ``initializer_range`` and zero bias, a LayerNorm of ones and
    zeros) on the same parameters."""
    if projection is None or projection == tower.config.projection:
        return tower
    if not projection:
        raise CheckpointError(f"{source} has a projection head on [CLS], and projection=False "
                              "was asked: refusing to drop its trained weights")
    cfg = dataclasses.replace(tower.config, projection=True)
    head = init_module(ProjectionHead, cfg, seed=seed, mesh=mesh, rules=rules)
    values = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(tower))}
    values.update({("head", *path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(head))})
    graphdef, abstract = nnx.split(abstract_module(Bert, cfg))
    return nnx.merge(graphdef, nnx.from_flat_state({path: var.replace(values[path])
                                                    for path, var in nnx.to_flat_state(abstract)}))


def load_t5(name: str, *, mesh=None, rules=DEFAULT_RULES, **overrides) -> T5:
    """A T5 / T0 encoder-decoder from a Hugging Face checkpoint."""
    folder = resolve_checkpoint(name)
    hf_config = read_config(folder)
    _check_model_type(hf_config, folder, ("t5",))
    weights = _unwrap_fid_encoder(read_weights(folder))
    cfg = t5_config_from_hf(hf_config, weights, **overrides)
    return _load(folder, T5, cfg, t5_names(cfg), weights, _T5_IGNORED, mesh, rules)


def _unwrap_fid_encoder(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """facebookresearch/FiD saves its readers (FiDT5) with the encoder wrapped twice:
    ``encoder.encoder.block.N.module.X`` is T5's ``encoder.block.N.X``."""
    if not any(name.startswith("encoder.encoder.") for name in weights):
        return weights
    return {re.sub(r"^encoder\.encoder\.(block\.\d+\.module\.)?",
                   lambda m: "encoder." + (m.group(1) or "").replace("module.", ""), name): value
            for name, value in weights.items()}


def load_tokenizer(name: str):
    """The fast tokenizer stored beside a checkpoint."""
    from transformers import AutoTokenizer

    folder = resolve_checkpoint(name)
    try:
        return AutoTokenizer.from_pretrained(folder, use_fast=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"no usable tokenizer in checkpoint folder {folder} ({_first_line(err)})") from err


# ---------------------------------------------------------------------------------------
# Export


def state_dict(model: Bert | T5) -> dict[str, np.ndarray]:
    """Float32 tensors by Hugging Face name (the inverse of loading); a projection head's as
    head.dense.* and head.norm.*."""
    names = bert_names(model.config) if isinstance(model, Bert) else t5_names(model.config)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for n in names:
        array = np.asarray(jax.device_get(flat[n.ours][...]), dtype=np.float32)
        out[n.hf] = np.ascontiguousarray(array.T if n.transpose else array)
    return out


def hf_config_of(model: Bert | T5) -> dict[str, Any]:
    return bert_config_to_hf(model.config) if isinstance(model, Bert) else t5_config_to_hf(model.config)


def write_folder(folder: str, hf_config: dict[str, Any], weights: dict[str, np.ndarray], tokenizer) -> None:
    """config.json, model.safetensors and the tokenizer's files into the local ``folder`` (the
    Hugging Face model only: a projection head's tensors are ``write_sentence_transformers``')."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file({k: v for k, v in weights.items() if not k.startswith(HEAD_PREFIX)},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_tower(folder: str, tower: Bert, weights: dict[str, np.ndarray], tokenizer, max_length: int) -> None:
    """A retriever tower's folder: the Hugging Face model (``weights``: its ``state_dict``) and the
    sentence-transformers modules that give its embedding, inputs cut at ``max_length``."""
    write_folder(folder, hf_config_of(tower), weights, tokenizer)
    write_sentence_transformers(folder, tower.config, weights, max_length)


def export(model: Bert | T5, tokenizer, out_dir: str) -> str:
    """Write a Hugging Face folder (config, safetensors, tokenizer) that transformers'
    ``AutoModel`` / ``T5ForConditionalGeneration`` load, locally (renamed into place) or to a
    URL (uploaded with config.json last). A tower with a projection head gets its
    sentence-transformers modules too (the head lives there), inputs cut at its positions."""
    staging = tempfile.mkdtemp(prefix=".export-", dir=staging_parent(out_dir))
    try:
        weights = state_dict(model)
        if isinstance(model, Bert) and model.config.projection:
            write_tower(staging, model, weights, tokenizer, model.config.max_length)
        else:
            write_folder(staging, hf_config_of(model), weights, tokenizer)
        publish_folder(staging, out_dir, marker="config.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------------------------------
# sentence-transformers modules: [CLS] pooling, and the projection head


# The legacy module names, which every sentence-transformers from 2.2 on reads
_ST_TYPE = "sentence_transformers.models.{}"
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
# (our name, module folder, sentence-transformers' tensor prefix) of the head's two modules
_HEAD_MODULES = (("dense", "2_Dense", "linear"), ("norm", "3_LayerNorm", "norm"))
_IDENTITY = "torch.nn.modules.linear.Identity"


def write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from err


def _head_modules(cfg: BertConfig) -> tuple[tuple[str, str, str], ...]:
    """The sentence-transformers modules of ``cfg``'s projection head: Dense, and LayerNorm when it has one."""
    if not cfg.projection:
        return ()
    return _HEAD_MODULES if cfg.projection_norm else _HEAD_MODULES[:1]


def write_sentence_transformers(folder: str, cfg: BertConfig, weights: dict[str, np.ndarray], max_length: int) -> None:
    """What SentenceTransformer(folder) needs to give the tower's embedding: the [CLS] token's
    last hidden state, through the projection head if ``cfg`` has one (``weights``' head.*
    tensors, as a Dense with identity activation and, if the head has one, a LayerNorm module, their weights as
    model.safetensors: checked with sentence-transformers 6.2; releases older than its
    safetensors support read only pytorch_model.bin there), not normalised, inputs cut at
    ``max_length``."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST_TYPE.format("Transformer")},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_TYPE.format("Pooling")}]
    head = _head_modules(cfg)
    modules += [{"idx": i, "name": str(i), "path": path, "type": _ST_TYPE.format(path.split("_")[1])}
                for i, (_, path, _) in enumerate(head, start=2)]
    write_json(os.path.join(folder, "modules.json"), modules)
    write_json(os.path.join(folder, "sentence_bert_config.json"), {"max_seq_length": max_length,
                                                                   "do_lower_case": False})
    write_json(os.path.join(folder, "1_Pooling", "config.json"), {
        "word_embedding_dimension": cfg.hidden_size, **{f"pooling_mode_{m}": m == "cls_token" for m in _POOLING_MODES}})
    # DPR scores by inner product; without this, model.similarity would use cosine
    write_json(os.path.join(folder, "config_sentence_transformers.json"),
               {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "dot"})
    if head:
        from safetensors.numpy import save_file

        configs = {"dense": {"in_features": cfg.hidden_size, "out_features": cfg.embedding_dim, "bias": True,
                             "activation_function": _IDENTITY},
                   "norm": {"dimension": cfg.embedding_dim}}
        for ours, path, theirs in head:
            write_json(os.path.join(folder, path, "config.json"), configs[ours])
            tensors = {f"{theirs}.{kind}": weights[f"{HEAD_PREFIX}{ours}.{kind}"] for kind in ("weight", "bias")}
            save_file(tensors, os.path.join(folder, path, "model.safetensors"), metadata={"format": "pt"})


def read_head(folder: str) -> dict[str, np.ndarray]:
    """The projection head's tensors of a tower ``folder`` by state_dict name (head.dense.weight,
    ...), from its sentence-transformers modules; none when it has no Dense or LayerNorm module.
    A head that is not exactly Transformer, Pooling (CLS), Dense (identity activation, bias) and
    optionally LayerNorm is refused: the tower would not compute what sentence-transformers does."""
    path = os.path.join(folder, "modules.json")
    if not os.path.isfile(path):
        return {}
    modules = _read_json(path)
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
    if not {"Dense", "LayerNorm"} & set(kinds):
        return {}  # e.g. mean pooling + Normalize: the tower is the model's [CLS], as for any folder
    if kinds not in (["Transformer", "Pooling", "Dense", "LayerNorm"], ["Transformer", "Pooling", "Dense"]):
        raise CheckpointError(f"{path}: modules {kinds}; a tower's projection head must be the modules "
                              "Transformer, Pooling (CLS), Dense and optionally LayerNorm (without modules.json "
                              "the folder loads as its Hugging Face model alone)")
    pooling, *head = (os.path.join(folder, m["path"]) for m in modules[1:])
    dense = head[0]
    pooling_cfg = _read_json(os.path.join(pooling, "config.json"))
    mode = pooling_cfg.get("pooling_mode")  # sentence-transformers 6 writes "cls"; older ones one flag per mode
    cls = (mode in ("cls", ["cls"]) if mode is not None else
           [m for m in _POOLING_MODES if pooling_cfg.get(f"pooling_mode_{m}")] == ["cls_token"])
    if not cls:
        raise CheckpointError(f"{pooling}/config.json: the projection head needs CLS pooling")
    dense_cfg = _read_json(os.path.join(dense, "config.json"))
    activation = str(dense_cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))  # Dense's default
    if (activation.rsplit(".", 1)[-1] != "Identity" or not dense_cfg.get("bias", True)
            or dense_cfg.get("use_residual", False)
            or dense_cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding"
            or dense_cfg.get("module_output_name", "sentence_embedding") != "sentence_embedding"):
        raise CheckpointError(f"{dense}/config.json: the projection head's Dense must be linear with a bias "
                              f"(activation Identity, no residual); it is {dense_cfg}")
    weights = {}
    for (ours, _, theirs), module in zip(_HEAD_MODULES, head):
        for key, value in read_weights(module).items():  # a stray tensor stays unexpected, and is named
            weights[f"{HEAD_PREFIX}{ours}.{key.removeprefix(theirs + '.')}"] = value
    return weights
