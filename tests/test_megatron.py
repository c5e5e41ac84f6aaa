"""art_jax.models.megatron: Megatron-LM retriever checkpoints (ART's, EMDR2's, ICT/MSS) as two
megatron-bert towers.

The checkpoints are written here in Megatron's layout (nested dicts, fused query_key_value in the
order of each checkpoint_version, run args and RNG states beside the tensors) from random
transformers ``MegatronBertModel``s, and each converted tower is checked against that model and
against a pre-LN forward written below from the Megatron tensors, splitting the fused QKV as
Megatron's own code does.
"""

import argparse
import os
import random

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from art_jax.core.errors import CheckpointError
from art_jax.models.hf import bert_from_weights, load_bert
from art_jax.models.megatron import read_megatron_checkpoint

HIDDEN, LAYERS, HEADS, FFN, VOCAB, POSITIONS = 32, 2, 4, 48, 128, 64  # VOCAB: padded to 128, as Megatron does
HEAD_DIM = HIDDEN // HEADS
ART_KEY = "retriever/biencoder_model"
# Megatron's per-layer names -> transformers' (MegatronBertModel)
LAYER_NAMES = {"input_layernorm": "attention.ln", "self_attention.dense": "attention.output.dense",
               "post_attention_layernorm": "ln", "mlp.dense_h_to_4h": "intermediate.dense",
               "mlp.dense_4h_to_h": "output.dense"}


def hf_model(seed: int, act: str = "gelu", vocab: int = VOCAB):
    from transformers import MegatronBertConfig, MegatronBertModel

    torch.manual_seed(seed)
    cfg = MegatronBertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             intermediate_size=FFN, max_position_embeddings=POSITIONS, layer_norm_eps=1e-5,
                             hidden_act=act)
    model = MegatronBertModel(cfg, add_pooling_layer=False).eval()
    # transformers' init (std 0.02, unit norms) leaves attention nearly uniform, where mixing up
    # query, key and value would hardly show: spread every weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("ln.weight")
                    else torch.randn_like(p) * (0.3 if p.ndim == 2 else 0.1))
    return model


def fuse_qkv(parts, version):
    """Megatron's fused rows for transformers' query, key, value [h, ...]: by checkpoint_version
    [3, heads, head_dim] (0), [heads, head_dim, 3] (1.0), [heads, 3, head_dim] (2.0)."""
    rest = parts[0].shape[1:]
    stacked = torch.stack(parts).reshape(3, HEADS, HEAD_DIM, *rest)
    order = {0: (0, 1, 2), 1.0: (1, 2, 0), 2.0: (1, 0, 2)}[version]
    return stacked.permute(*order, *range(3, stacked.ndim)).reshape(3 * HIDDEN, *rest).contiguous()


def megatron_tower(model, version, *, dtype=torch.float32, token_types=True, older_names=False):
    """A PretrainedBertModel's state_dict_for_save_checkpoint() holding ``model``'s weights."""
    sd = {k: v.detach().clone().to(dtype) for k, v in model.state_dict().items()}
    attention = "attention" if older_names else "self_attention"
    encoder = {}
    for i in range(LAYERS):
        for theirs, ours in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                encoder[f"layers.{i}.{theirs.replace('self_attention', attention)}.{kind}"] = \
                    sd[f"encoder.layer.{i}.{ours}.{kind}"]
        for kind in ("weight", "bias"):
            encoder[f"layers.{i}.{attention}.query_key_value.{kind}"] = fuse_qkv(
                [sd[f"encoder.layer.{i}.attention.self.{p}.{kind}"] for p in ("query", "key", "value")], version)
    encoder.update({f"final_layernorm.{kind}": sd[f"encoder.ln.{kind}"] for kind in ("weight", "bias")})
    embedding = {"word_embeddings": {"weight": sd["embeddings.word_embeddings.weight"]},
                 "position_embeddings": {"weight": sd["embeddings.position_embeddings.weight"]}}
    if token_types:
        embedding["tokentype_embeddings"] = {"weight": sd["embeddings.token_type_embeddings.weight"]}
    return {"language_model": {"embedding": embedding, "transformer" if older_names else "encoder": encoder}}


def megatron_state(model, version, iteration=10, **args):
    """What Megatron's save_checkpoint writes: args, version, iteration, model, optimizer and RNG states."""
    params = [torch.zeros(3, 2)]
    adam = torch.optim.Adam(params)
    params[0].grad = torch.ones(3, 2)
    adam.step()
    defaults = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, kv_channels=HEAD_DIM,
                    ffn_hidden_size=FFN, max_position_embeddings=POSITIONS, layernorm_epsilon=1e-5, hidden_dropout=0.1,
                    attention_dropout=0.1, params_dtype=torch.float16, fp16=True, bias_gelu_fusion=False,
                    openai_gelu=False, apply_residual_connection_post_layernorm=False, model_parallel_size=1,
                    make_vocab_size_divisible_by=128, padded_vocab_size=VOCAB, tokenizer_type="BertWordPieceLowerCase",
                    num_unique_layers=None, save="checkpoints/nq", seed=1234)
    return {"args": argparse.Namespace(**{**defaults, **args}), "checkpoint_version": version,
            "iteration": iteration, "model": model,
            "optimizer": {"optimizer_state_dict": adam.state_dict(), "fp32_from_fp16": [params]},
            "lr_scheduler": {"num_steps": iteration, "max_lr": 2e-5},
            "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}


def save(folder, state, *, release=False):
    """``folder`` as a Megatron checkpoint directory: tracker file and iter_XXXXXXX (or release)."""
    name = "release" if release else f"iter_{state['iteration']:07d}"
    file = folder / name / "mp_rank_00" / "model_optim_rng.pt"
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    (folder / "latest_checkpointed_iteration.txt").write_text("release" if release else str(state["iteration"]))
    return file


def inputs():
    """Random tokens, rows padded to different lengths."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (4, 12))
    mask = (np.arange(12)[None, :] < np.array([12, 9, 5, 2])[:, None]).astype(np.int32)
    return ids * mask, mask


def ours(tower, ids, mask):
    model = bert_from_weights(tower.hf_config, tower.weights, source="test")
    return np.asarray(model.embed_cls(jnp.asarray(ids), jnp.asarray(mask)))


def transformers_cls(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state[:, 0].numpy()


def megatron_cls(tower, version, ids, mask, *, heads=HEADS, act="gelu", eps=1e-5):
    """[CLS] of Megatron's pre-LN BERT (ART's PretrainedBertModel) from its tensors, in float64:
    the fused QKV's output split as megatron/model/transformer.py splits it for ``version``."""
    lm = tower["language_model"]
    emb = {k: v["weight"].double() for k, v in lm["embedding"].items()}
    enc = {k: v.double() for k, v in lm.get("encoder", lm.get("transformer")).items()}
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    b, s = ids.shape
    x = emb["word_embeddings"][ids] + emb["position_embeddings"][torch.arange(s)][None]
    if "tokentype_embeddings" in emb:
        x = x + emb["tokentype_embeddings"][torch.zeros_like(ids)]
    hidden = x.shape[-1]
    hn = hidden // heads

    def norm(y, name):
        return F.layer_norm(y, (hidden,), enc[f"{name}.weight"], enc[f"{name}.bias"], eps)

    def linear(y, name):
        return F.linear(y, enc[f"{name}.weight"], enc[f"{name}.bias"])

    def gelu(y):  # torch's exact gelu, or Megatron's fused bias-gelu (tanh)
        return F.gelu(y) if act == "gelu" else y * 0.5 * (1.0 + torch.tanh(0.79788456 * y * (1 + 0.044715 * y * y)))

    for i in range(len({k.split(".")[1] for k in enc if k.startswith("layers.")})):
        p = f"layers.{i}."
        attn = p + ("self_attention" if f"{p}self_attention.dense.weight" in enc else "attention")
        mixed = linear(norm(x, p + "input_layernorm"), f"{attn}.query_key_value")  # [b, s, 3h]
        if version == 0:  # _transpose_last_dim: [3, hp] -> [hp, 3]
            mixed = mixed.view(b, s, 3, hidden).transpose(-1, -2).reshape(b, s, 3 * hidden)
        if version < 2:  # ART: view(np, hn, 3), then [..., 0], [..., 1], [..., 2]
            mixed = mixed.view(b, s, heads, hn, 3)
            q, k, v = mixed[..., 0], mixed[..., 1], mixed[..., 2]
        else:  # Megatron-LM 2.0: view(np, 3 * hn), then split along the last dimension
            q, k, v = torch.split(mixed.view(b, s, heads, 3 * hn), hn, dim=-1)
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / hn ** 0.5
        scores = scores.masked_fill(mask[:, None, None, :] == 0, -10000.0)
        context = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(b, s, hidden)
        x = x + linear(context, f"{attn}.dense")
        x = x + linear(gelu(linear(norm(x, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h")),
                       p + "mlp.dense_4h_to_h")
    return norm(x, "final_layernorm")[:, 0].numpy()


def check_informative(out):
    assert np.abs(out - out[0]).max() > 0.1, "rows give (nearly) the same [CLS] vector"


@pytest.mark.parametrize("version", [0, 1.0, 2.0])
def test_towers_match_transformers_and_megatron(tmp_path, version):
    from transformers import MegatronBertConfig, MegatronBertModel

    query, context = hf_model(0), hf_model(1)
    biencoder = {"query_model": megatron_tower(query, version), "context_model": megatron_tower(context, version)}
    save(tmp_path, megatron_state({ART_KEY: biencoder}, version))
    converted = read_megatron_checkpoint(str(tmp_path))

    assert converted.provenance == {
        "source": "megatron", "checkpoint": str(tmp_path),
        "file": str(tmp_path / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"), "iteration": 10,
        "checkpoint_version": version, "biencoder": f"model['{ART_KEY}']",
        "towers": {"question": "query_model", "passage": "context_model"}}
    assert converted.question.hf_config == {
        "architectures": ["MegatronBertModel"], "model_type": "megatron-bert", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": FFN,
        "max_position_embeddings": POSITIONS, "type_vocab_size": 2, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "position_embedding_type": "absolute",
        "pad_token_id": 0}
    ids, mask = inputs()
    outs = {}
    for side, tower, model, key in (("question", converted.question, query, "query_model"),
                                    ("passage", converted.passage, context, "context_model")):
        outs[side] = got = ours(tower, ids, mask)
        check_informative(got)
        np.testing.assert_allclose(got, transformers_cls(model, ids, mask), atol=1e-5, rtol=0)
        np.testing.assert_allclose(got, megatron_cls(biencoder[key], version, ids, mask), atol=1e-5, rtol=0)
        # the config and names are transformers' own: MegatronBertModel loads them strictly
        reloaded = MegatronBertModel(MegatronBertConfig(**tower.hf_config), add_pooling_layer=False).eval()
        reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in tower.weights.items()}, strict=True)
        np.testing.assert_allclose(got, transformers_cls(reloaded, ids, mask), atol=1e-5, rtol=0)
    assert np.abs(outs["question"] - outs["passage"]).max() > 0.1
    # the mask is informative: without it, the padded rows' [CLS] differs
    unmasked = megatron_cls(biencoder["query_model"], version, ids, np.ones_like(mask))
    assert np.abs(unmasked[1:] - outs["question"][1:]).min(axis=1).max() > 1e-3


@pytest.mark.parametrize("written, claimed", [(1.0, 2.0), (0, 1.0), (2.0, 0)])
def test_qkv_order_follows_checkpoint_version(tmp_path, written, claimed):
    """A fused QKV read in another version's order gives another model: the parity above can fail."""
    model = hf_model(0)
    save(tmp_path, megatron_state({"query_model": megatron_tower(model, written),
                                   "context_model": megatron_tower(model, written)}, claimed))
    ids, mask = inputs()
    got = ours(read_megatron_checkpoint(str(tmp_path)).question, ids, mask)
    assert np.abs(got - transformers_cls(model, ids, mask)).max() > 1e-2


def test_release_older_names_fp16_tanh_gelu_without_token_types(tmp_path):
    """A release checkpoint of older Megatron (encoder as 'transformer', attention.*), fp16 tensors,
    the fused bias-GELU (tanh), no token-type table, and the ICT layout (towers directly in 'model')."""
    query, context = hf_model(2, act="gelu_new"), hf_model(3, act="gelu_new")
    with torch.no_grad():
        for model in (query, context):
            model.embeddings.token_type_embeddings.weight.zero_()  # Megatron adds no token-type term
            for p in model.parameters():
                p.copy_(p.half().float())  # the values the fp16 checkpoint holds
    biencoder = {"query_model": megatron_tower(query, 1.0, dtype=torch.float16, token_types=False, older_names=True),
                 "context_model": megatron_tower(context, 1.0, dtype=torch.float16, token_types=False,
                                                 older_names=True)}
    save(tmp_path, megatron_state(biencoder, 1.0, iteration=0, bias_gelu_fusion=True), release=True)
    converted = read_megatron_checkpoint(str(tmp_path))

    assert converted.provenance["file"] == str(tmp_path / "release" / "mp_rank_00" / "model_optim_rng.pt")
    assert converted.provenance["biencoder"] == "model"
    assert converted.provenance["notes"] == ["no tokentype_embeddings: written as zeros"]
    assert converted.question.hf_config["hidden_act"] == "gelu_new"
    tables = converted.question.weights["embeddings.token_type_embeddings.weight"]
    assert tables.shape == (2, HIDDEN) and not tables.any()
    assert all(w.dtype == np.float32 for w in converted.question.weights.values())
    ids, mask = inputs()
    for tower, model, key in ((converted.question, query, "query_model"),
                              (converted.passage, context, "context_model")):
        got = ours(tower, ids, mask)
        check_informative(got)
        np.testing.assert_allclose(got, transformers_cls(model, ids, mask), atol=1e-5, rtol=0)
        np.testing.assert_allclose(got, megatron_cls(biencoder[key], 1.0, ids, mask, act="gelu_new"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("keys", [("shared_model",), ("context_model",)])
def test_one_tower_serves_both_sides(tmp_path, keys):
    model = hf_model(0)
    save(tmp_path, megatron_state({ART_KEY: {keys[0]: megatron_tower(model, 1.0)}}, 1.0))
    converted = read_megatron_checkpoint(str(tmp_path))
    assert converted.provenance["towers"] == {"question": keys[0], "passage": keys[0]}
    assert keys[0] in converted.provenance["notes"][0]
    ids, mask = inputs()
    for tower in (converted.question, converted.passage):
        np.testing.assert_allclose(ours(tower, ids, mask), transformers_cls(model, ids, mask), atol=1e-5, rtol=0)


def test_projection_enc_is_the_projection_head(tmp_path):
    """Megatron-LM's --projection-dim: a Linear on the [CLS] vector, our head without LayerNorm."""
    query, context = hf_model(0), hf_model(1)
    biencoder = {"query_model": megatron_tower(query, 2.0), "context_model": megatron_tower(context, 2.0)}
    torch.manual_seed(5)
    for tower in biencoder.values():
        tower["projection_enc"] = {"weight": torch.randn(16, HIDDEN) * 0.3, "bias": torch.randn(16) * 0.1}
    save(tmp_path, megatron_state(biencoder, 2.0, projection_dim=16, pool_type="cls-token"))
    converted = read_megatron_checkpoint(str(tmp_path))
    ids, mask = inputs()
    for tower, key in ((converted.question, "query_model"), (converted.passage, "context_model")):
        head = biencoder[key]["projection_enc"]
        want = F.linear(torch.from_numpy(megatron_cls(biencoder[key], 2.0, ids, mask)).float(),
                        head["weight"], head["bias"]).numpy()
        got = ours(tower, ids, mask)
        assert got.shape == (4, 16)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_directory_without_its_tracker_file_reads_its_one_iteration(tmp_path):
    state = megatron_state({"query_model": megatron_tower(hf_model(0), 1.0)}, 1.0, iteration=300)
    save(tmp_path, state)
    os.remove(tmp_path / "latest_checkpointed_iteration.txt")
    converted = read_megatron_checkpoint(str(tmp_path))
    assert converted.provenance["iteration"] == 300
    assert converted.provenance["file"].endswith(os.path.join("iter_0000300", "mp_rank_00", "model_optim_rng.pt"))


def test_iteration_folder_rank_folder_and_file(tmp_path):
    model = hf_model(0)
    file = save(tmp_path, megatron_state({"query_model": megatron_tower(model, 1.0),
                                          "context_model": megatron_tower(hf_model(1), 1.0)}, 1.0))
    whole = read_megatron_checkpoint(str(tmp_path))
    for path in (file.parent.parent, file.parent, file):
        converted = read_megatron_checkpoint(str(path))
        assert converted.provenance["file"] == str(file) and converted.provenance["checkpoint"] == str(path)
        assert converted.question.hf_config == whole.question.hf_config
        for side in ("question", "passage"):
            want, got = getattr(whole, side).weights, getattr(converted, side).weights
            assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


def test_megatron_bert_folder_loads(tmp_path):
    """A transformers MegatronBertModel folder (pooler included) is a tower: hf.py's megatron-bert names."""
    from transformers import MegatronBertModel

    model = hf_model(4)
    folder = tmp_path / "megatron-bert"
    full = MegatronBertModel(model.config)  # with a (random) pooler, as saved models have one
    assert full.load_state_dict(model.state_dict(), strict=False).missing_keys == ["pooler.dense.weight",
                                                                                  "pooler.dense.bias"]
    full.save_pretrained(folder)
    ids, mask = inputs()
    got = np.asarray(load_bert(str(folder)).embed_cls(jnp.asarray(ids), jnp.asarray(mask)))
    check_informative(got)
    np.testing.assert_allclose(got, transformers_cls(model, ids, mask), atol=1e-5, rtol=0)


def _tower(state, key="query_model"):
    return state["model"][ART_KEY][key]


def _encoder(state):
    return _tower(state)["language_model"]["encoder"]


def _rm(path):
    os.remove(path)


BAD = {  # name: (change to the state before saving, change to the folder after, expected message)
    "no tracker, two iterations": (None, lambda d: (_rm(d / "latest_checkpointed_iteration.txt"),
                                                    (d / "iter_0000020").mkdir()),
                                   r"no latest_checkpointed_iteration\.txt and several iteration folders "
                                   r"\(iter_0000010, iter_0000020\): name one"),
    "shared layers": (lambda s: setattr(s["args"], "num_unique_layers", 1), None,
                      r"args\.num_unique_layers=1: layers shared across depth"),
    "tracker names a missing iteration": (
        None, lambda d: (d / "latest_checkpointed_iteration.txt").write_text("20"), r"names 20, but .*iter_0000020"),
    "tracker text": (None, lambda d: (d / "latest_checkpointed_iteration.txt").write_text("best"),
                     r"latest_checkpointed_iteration.txt: 'best' is neither"),
    "model parallel": (None, lambda d: (d / "iter_0000010" / "mp_rank_01").mkdir(), r"iter_0000010: holds mp_rank_00, "
                       r"mp_rank_01: a model-parallel"),
    "no biencoder": (lambda s: s["model"][ART_KEY].update(question_model=s["model"][ART_KEY].pop("query_model")),
                     None, r"model\['retriever/biencoder_model'\] holds no Megatron biencoder: expected query_model .*"
                     r"found \['context_model', 'question_model'\]"),
    "missing layer tensor": (lambda s: _encoder(s).pop("layers.1.mlp.dense_4h_to_h.weight"), None,
                             r"\['query_model'\]\['language_model'\]\['encoder'\]: missing "
                             r"layers\.1\.mlp\.dense_4h_to_h\.weight"),
    "mis-shaped QKV": (lambda s: _encoder(s).update({"layers.0.self_attention.query_key_value.weight": torch.zeros(
        3 * HIDDEN - 4, HIDDEN)}), None, r"layers\.0\.self_attention\.query_key_value\.weight has shape \[92, 32\], "
        r"expected \[96, 32\]"),
    "unknown tensor": (lambda s: _encoder(s).update({"layers.0.self_attention.rotary.inv_freq": torch.zeros(4)}), None,
                       r"unknown tensors \['layers\.0\.self_attention\.rotary\.inv_freq'\]"),
    "ICT head": (lambda s: _tower(s).update(ict_head={"weight": torch.zeros(8, HIDDEN), "bias": torch.zeros(8)}),
                 None, r"\['query_model'\]: unknown keys \['ict_head'\].*tanh pooler"),
    "pooler": (lambda s: _tower(s, "context_model")["language_model"].update(
        pooler={"dense.weight": torch.zeros(HIDDEN, HIDDEN)}), None, r"\['context_model'\]\['language_model'\]: "
        r"unknown keys \['pooler'\]"),
    "args disagree": (lambda s: setattr(s["args"], "hidden_size", 64), None, r"args\.hidden_size=64 but the tensors "
                      r"have 32"),
    "post-LN residuals": (lambda s: setattr(s["args"], "apply_residual_connection_post_layernorm", True), None,
                          r"apply_residual_connection_post_layernorm"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_are_one_clear_error(tmp_path, case):
    change_state, change_folder, message = BAD[case]
    model = hf_model(0)
    state = megatron_state({ART_KEY: {"query_model": megatron_tower(model, 1.0),
                                      "context_model": megatron_tower(model, 1.0)}}, 1.0)
    if change_state:
        change_state(state)
    save(tmp_path, state)
    if change_folder:
        change_folder(tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        read_megatron_checkpoint(str(tmp_path))
    assert "\n" not in str(err.value)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unsafe_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    state = megatron_state({"query_model": megatron_tower(hf_model(0), 1.0)}, 1.0)
    state["args"] = RunsCode(marker)
    (tmp_path / "ckpt").mkdir()
    save(tmp_path / "ckpt", state)
    with pytest.raises(CheckpointError, match=r"model_optim_rng\.pt: refused: .*system"):
        read_megatron_checkpoint(str(tmp_path / "ckpt"))
    assert not marker.exists()


def test_loss_scaler_and_enums_of_the_training_code_are_read_as_data(tmp_path, monkeypatch):
    """ART's FP16_Optimizer state pickles Megatron's loss scaler object, newer Megatron-LM's args an
    enum (args.model_type): the file is read (the scaler as its attributes, the enum as its value,
    none of their code), not refused."""
    import enum
    import sys
    import types

    scaler_module, enums_module = types.ModuleType("megatron.fp16.loss_scaler"), types.ModuleType("megatron.core.enums")

    class DynamicLossScaler:
        def __init__(self):
            self.cur_scale, self.cur_iter = 2.0 ** 16, 7

    class ModelType(enum.Enum):
        encoder_or_decoder = 1

    for cls, module in ((DynamicLossScaler, scaler_module), (ModelType, enums_module)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    modules = ("megatron", "megatron.fp16", "megatron.core", scaler_module.__name__, enums_module.__name__)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, {scaler_module.__name__: scaler_module,
                                                enums_module.__name__: enums_module}.get(name, types.ModuleType(name)))
    state = megatron_state({"query_model": megatron_tower(hf_model(0), 1.0)}, 1.0,
                           model_type=ModelType.encoder_or_decoder)
    state["optimizer"] = {"loss_scaler": DynamicLossScaler(), "optimizer": {"state": {}, "param_groups": []}}
    (tmp_path / "ckpt").mkdir()
    save(tmp_path / "ckpt", state)
    for name in modules:  # the reader has no Megatron to import
        monkeypatch.delitem(sys.modules, name)
    converted = read_megatron_checkpoint(str(tmp_path / "ckpt"))
    assert converted.provenance["iteration"] == 10
