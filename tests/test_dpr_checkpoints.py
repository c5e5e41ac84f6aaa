"""facebook DPR's retrievers as towers: transformers' DPRQuestionEncoder / DPRContextEncoder folders
(load_bert, and through an export to sentence-transformers), and facebookresearch/DPR's training
checkpoints (read_dpr_checkpoint), each checked against the torch model's own vectors."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

from art_jax.core.errors import CheckpointError
from art_jax.data.tokenization import tokenize_passages, tokenize_questions
from art_jax.data.tokenizers import train_wordpiece
from art_jax.models.dpr_checkpoint import read_dpr_checkpoint
from art_jax.models.export import export_retriever
from art_jax.models.hf import bert_from_weights, load_bert, load_tokenizer
from art_jax.retrieval.encoder import load_retriever
from tests.hf_fixtures import CORPUS

transformers = pytest.importorskip("transformers")

# varied lengths: the batch is padded, and the rows' vectors must differ
SENTENCES = ["who visited the bridge near paris", "which fox crossed the harbour in 1977",
             "when was the old castle painted", "marie curie", CORPUS[7] + " " + CORPUS[40]]
TITLES = ["Paris notes", "", "Kyoto", "Lagos", "A long title about bridges"]
# wider than BERT's 0.02, so that [CLS] depends on the input enough to tell rows apart
INIT = 0.3


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(CORPUS, 300)


def _batch(tokenizer, texts, max_length=64):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    assert (mask == 0).any(), "no padding: the test would not check it"
    return ids, mask


def _informative(vectors):
    vectors = np.asarray(vectors)
    assert np.abs(vectors - vectors.mean(0)).max() > 0.1, "every row gets the same vector: the test proves nothing"


# ---------------------------------------------------------------------------------------
# transformers' DPR folders


def _dpr_config(tokenizer, projection_dim):
    return transformers.DPRConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                                  projection_dim=projection_dim, initializer_range=INIT)


def _perturbed(model):
    """``model`` with noise on every parameter: its random init leaves biases 0 and LayerNorms 1, where a
    misplaced tensor would go unseen."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dpr_pairs(tokenizer, tmp_path_factory):
    """projection_dim -> (question folder, passage folder): a DPRQuestionEncoder and a DPRContextEncoder,
    random with different seeds, without (0) and with a projection (16)."""
    pairs = {}
    for projection_dim in (0, 16):
        folder = tmp_path_factory.mktemp(f"dpr{projection_dim}")
        config = _dpr_config(tokenizer, projection_dim)
        torch.manual_seed(1)
        question = _save(_perturbed(transformers.DPRQuestionEncoder(config)), tokenizer, str(folder / "question"))
        torch.manual_seed(2)
        passage = _save(_perturbed(transformers.DPRContextEncoder(config)), tokenizer, str(folder / "passage"))
        pairs[projection_dim] = question, passage
    return pairs


def _dpr_vectors(folder, ids, mask):
    """DPR's own embedding (pooler_output: [CLS], through encode_proj), token types all 0."""
    (architecture,) = _read(f"{folder}/config.json")["architectures"]  # AutoModel would take any as a question encoder
    assert architecture in ("DPRQuestionEncoder", "DPRContextEncoder")
    model = getattr(transformers, architecture).from_pretrained(folder).eval()
    ids, mask = torch.from_numpy(np.asarray(ids, np.int64)), torch.from_numpy(np.asarray(mask, np.int64))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).pooler_output.numpy()


@pytest.mark.parametrize("projection_dim", [0, 16])
def test_dpr_folders_load_as_towers(dpr_pairs, tokenizer, projection_dim):
    question_dir, passage_dir = dpr_pairs[projection_dim]
    ids, mask = _batch(tokenizer, SENTENCES)
    vectors = {}
    for side, folder in (("question", question_dir), ("passage", passage_dir)):
        tower = load_bert(folder)
        cfg = tower.config
        assert cfg.projection == (projection_dim > 0) and not (cfg.projection and cfg.projection_norm)
        assert cfg.embedding_dim == (projection_dim or 32) and cfg.num_heads == 4 and not cfg.with_pooler
        want = _dpr_vectors(folder, ids, mask)
        assert want.shape == (len(SENTENCES), projection_dim or 32)
        _informative(want)
        vectors[side] = np.asarray(tower.embed_cls(ids, mask))
        np.testing.assert_allclose(vectors[side], want, rtol=0, atol=1e-5, err_msg=side)
    assert np.abs(vectors["question"] - vectors["passage"]).max() > 0.1, "the two towers are one"


def test_a_dpr_reader_folder_is_refused(tokenizer, tmp_path):
    torch.manual_seed(0)
    folder = _save(transformers.DPRReader(_dpr_config(tokenizer, 0)), tokenizer, str(tmp_path / "reader"))
    with pytest.raises(CheckpointError, match=r"DPRReader is not a retriever tower.*span_predictor"):
        load_bert(folder)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_an_exported_dpr_pair_is_what_dpr_and_sentence_transformers_compute(dpr_pairs, tmp_path):
    from sentence_transformers import SentenceTransformer

    projection_dim = 16
    question_dir, passage_dir = dpr_pairs[projection_dim]
    out = str(tmp_path / "export")
    export_retriever(load_bert(question_dir), load_bert(passage_dir), load_tokenizer(question_dir), out,
                     question_max_length=12, passage_max_length=40, provenance={"source": "dpr folders"})
    for side in ("question", "passage"):  # a BERT folder, and DPR's projection as a Dense without LayerNorm
        folder = f"{out}/{side}_encoder"
        assert _read(f"{folder}/config.json")["model_type"] == "bert"
        assert [m["type"].rsplit(".", 1)[1] for m in _read(f"{folder}/modules.json")] == [
            "Transformer", "Pooling", "Dense"]
        assert not os.path.exists(f"{folder}/3_LayerNorm")
        assert _read(f"{folder}/2_Dense/config.json") == {
            "in_features": 32, "out_features": projection_dim, "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity"}
    assert _read(f"{out}/art_jax_export.json")["shared_towers"] is False

    encoder = load_retriever(out)
    assert encoder.question.config.embedding_dim == encoder.passage.config.embedding_dim == projection_dim
    assert not encoder.question.config.projection_norm
    questions = SENTENCES[:4] + ["what did marie curie describe in lagos in 1977 and who painted the old castle"]
    tokens = tokenize_questions(encoder.tokenizer, questions, 12)
    assert tokens.mask.sum(1).max() == 12 and tokens.mask.sum(1).min() < 12, "no question is cut, or none padded"
    want = _dpr_vectors(question_dir, tokens.ids, tokens.mask)
    _informative(want)
    np.testing.assert_allclose(np.asarray(encoder.embed_questions(questions)), want, rtol=0, atol=1e-5)
    passages = tokenize_passages(encoder.tokenizer, TITLES, SENTENCES, 40)
    np.testing.assert_allclose(np.asarray(encoder.embed_passages(TITLES, SENTENCES)),
                               _dpr_vectors(passage_dir, passages.ids, passages.mask), rtol=0, atol=1e-5)

    model = SentenceTransformer(f"{out}/question_encoder", device="cpu")
    assert len(model) == 3 and model.max_seq_length == 12 and model.similarity_fn_name == "dot"
    np.testing.assert_allclose(model.encode(questions, convert_to_numpy=True), want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# facebookresearch/DPR's training checkpoints


def _bert(seed, hidden=32, heads=4, layers=2):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=300, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=48, max_position_embeddings=64,
                                     initializer_range=INIT)
    return _perturbed(transformers.BertModel(config))  # with its pooler, as DPR's HFBertEncoder


class _Tower(torch.nn.Module):
    """What DPR's HFBertEncoder holds: a BertModel's modules, and encode_proj when projection_dim > 0."""

    def __init__(self, bert, projection_dim):
        super().__init__()
        self.bert = bert
        if projection_dim:
            torch.manual_seed(100 + projection_dim)
            self.encode_proj = _perturbed(torch.nn.Linear(bert.config.hidden_size, projection_dim))

    def state_dict_as_dpr(self, prefix):
        own = {f"{prefix}{name}": value for name, value in self.bert.state_dict().items()}
        if hasattr(self, "encode_proj"):
            own.update({f"{prefix}encode_proj.{name}": value for name, value in self.encode_proj.state_dict().items()})
        return own

    def vectors(self, ids, mask):
        ids, mask = torch.from_numpy(np.asarray(ids, np.int64)), torch.from_numpy(np.asarray(mask, np.int64))
        with torch.no_grad():
            cls = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            cls = cls[:, 0]
            return (self.encode_proj(cls) if hasattr(self, "encode_proj") else cls).numpy()


def _checkpoint(towers, encoder_params, epoch=3):
    """DPR's CheckpointState._asdict() of a BiEncoder with these towers (prefix -> _Tower), with a
    real optimizer's and scheduler's states."""
    model_dict = {}
    for prefix, tower in towers.items():
        model_dict.update(tower.state_dict_as_dpr(prefix))
    parameters = [p for tower in towers.values() for p in tower.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sum(p.sum() for p in parameters).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return {"model_dict": model_dict, "optimizer_dict": optimizer.state_dict(),
            "scheduler_dict": scheduler.state_dict(), "offset": 128, "epoch": epoch, "encoder_params": encoder_params}


def _save_cp(path, state):
    torch.save(state, str(path))
    return str(path)


ENCODER_PARAMS = {"do_lower_case": True, "pretrained_model_cfg": "bert-base-uncased", "encoder_model_type": "hf_bert",
                  "pretrained_file": None, "projection_dim": 0, "sequence_length": 256, "num_attention_heads": 4}


@pytest.mark.parametrize("projection_dim", [0, 16])
def test_a_dpr_training_checkpoint_gives_its_towers(tokenizer, tmp_path, projection_dim):
    towers = {"question_model.": _Tower(_bert(11), projection_dim), "ctx_model.": _Tower(_bert(12), projection_dim)}
    params = {**ENCODER_PARAMS, "projection_dim": projection_dim}
    path = _save_cp(tmp_path / "dpr_biencoder.3", _checkpoint(towers, params))
    converted = read_dpr_checkpoint(path)
    assert converted.provenance == {"source": "dpr", "checkpoint": path, "epoch": 3, "offset": 128,
                                    "encoder_params": params}
    json.dumps(converted.provenance)

    ids, mask = _batch(tokenizer, SENTENCES)
    got = {}
    for side, prefix in (("question", "question_model."), ("passage", "ctx_model.")):
        tower = getattr(converted, side)
        # a real transformers BertConfig, and exactly a BertModel's tensors besides the head
        bert = transformers.BertModel(transformers.BertConfig(**tower.hf_config))
        bert.load_state_dict({k: torch.from_numpy(v) for k, v in tower.weights.items() if not k.startswith("head.")},
                             strict=True)
        assert {k for k in tower.weights if k.startswith("head.")} == (
            {"head.dense.weight", "head.dense.bias"} if projection_dim else set())
        model = bert_from_weights(tower.hf_config, tower.weights, source=path)
        cfg = model.config
        assert cfg.projection == (projection_dim > 0) and not (cfg.projection and cfg.projection_norm)
        assert cfg.embedding_dim == (projection_dim or 32) and cfg.num_heads == 4 and cfg.with_pooler
        want = towers[prefix].vectors(ids, mask)
        _informative(want)
        got[side] = np.asarray(model.embed_cls(ids, mask))
        np.testing.assert_allclose(got[side], want, rtol=0, atol=1e-5, err_msg=side)
    assert np.abs(got["question"] - got["passage"]).max() > 0.1, "the two towers are one"


def test_an_old_run_s_namespace_settings_without_the_number_of_heads(tokenizer, tmp_path):
    """An old run's argparse.Namespace of settings without the number of heads: hidden 128 gives
    BERT's 64-wide heads, 2 (a wrong count would change the vectors)."""
    towers = {"question_model.": _Tower(_bert(21, hidden=128, heads=2, layers=1), 0),
              "ctx_model.": _Tower(_bert(22, hidden=128, heads=2, layers=1), 0)}
    params = argparse.Namespace(pretrained_model_cfg="bert-base-uncased", projection_dim=0, sequence_length=256)
    path = _save_cp(tmp_path / "old.cp", _checkpoint(towers, params, epoch=0))
    converted = read_dpr_checkpoint(path)
    assert converted.provenance["epoch"] == 0
    assert converted.provenance["encoder_params"] == vars(params)
    assert "hidden_size / 64" in converted.provenance["num_attention_heads"]
    ids, mask = _batch(tokenizer, SENTENCES)
    for side, prefix in (("question", "question_model."), ("passage", "ctx_model.")):
        tower = getattr(converted, side)
        assert tower.hf_config["num_attention_heads"] == 2
        want = towers[prefix].vectors(ids, mask)
        _informative(want)
        model = bert_from_weights(tower.hf_config, tower.weights, source=path)
        np.testing.assert_allclose(np.asarray(model.embed_cls(ids, mask)), want, rtol=0, atol=1e-5, err_msg=side)


def test_a_hydra_run_checkpoint_with_omegaconf_settings(tokenizer, tmp_path):
    """DPR's hydra-era runs save {"do_lower_case", "encoder": DictConfig}: read without omegaconf's code
    (its containers as plain values), the towers as from any checkpoint."""
    from omegaconf import OmegaConf

    towers = {"question_model.": _Tower(_bert(41, hidden=128, heads=2, layers=1), 0),
              "ctx_model.": _Tower(_bert(42, hidden=128, heads=2, layers=1), 0)}
    settings = {"encoder_model_type": "hf_bert", "pretrained_model_cfg": "bert-base-uncased", "projection_dim": 0,
                "sequence_length": 256, "dropout": 0.1, "pretrained": True, "extra": [1, None]}
    params = {"do_lower_case": True, "encoder": OmegaConf.create({"encoder": settings}).encoder}
    path = _save_cp(tmp_path / "hydra.cp", _checkpoint(towers, params))
    converted = read_dpr_checkpoint(path)
    assert converted.provenance["encoder_params"] == {"do_lower_case": True, "encoder": settings}
    ids, mask = _batch(tokenizer, SENTENCES)
    for side, prefix in (("question", "question_model."), ("passage", "ctx_model.")):
        tower = getattr(converted, side)
        model = bert_from_weights(tower.hf_config, tower.weights, source=path)
        np.testing.assert_allclose(np.asarray(model.embed_cls(ids, mask)), towers[prefix].vectors(ids, mask),
                                   rtol=0, atol=1e-5, err_msg=side)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _good_state():
    towers = {"question_model.": _Tower(_bert(31, layers=1), 0), "ctx_model.": _Tower(_bert(32, layers=1), 0)}
    return _checkpoint(towers, dict(ENCODER_PARAMS))


def _without(key):
    def edit(state):
        del state["model_dict"][key]
        return state
    return edit


def _with(key, value):
    def edit(state):
        state["model_dict"][key] = value
        return state
    return edit


def _params(value):
    def edit(state):
        state["encoder_params"] = value
        return state
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda state: list(state["model_dict"].values()), r"not a DPR training checkpoint: it holds a list"),
    (lambda state: {"state_dict": state["model_dict"], "epoch": 1},
     r"no model_dict \(its keys: \['epoch', 'state_dict'\]"),
    (lambda state: {**state, "model_dict": {k.replace("question_model.", "encoder."): v
                                            for k, v in state["model_dict"].items()}},
     r"no question_model\.\* tensors \(a DPR BiEncoder saves both towers; .*\['ctx_model', 'encoder'\]"),
    (lambda state: {**state, "model_dict": {k: v for k, v in state["model_dict"].items()
                                            if k.startswith("question_model.")}},
     r"no ctx_model\.\* tensors \(a DPR BiEncoder saves both towers; its tensors start with \['question_model'\]"),
    (_without("ctx_model.embeddings.word_embeddings.weight"),
     r"model_dict has no ctx_model\.embeddings\.word_embeddings\.weight \(the ctx_model tower"),
    (_with("qa_outputs.weight", torch.zeros(2, 32)),
     r"outside question_model\.\* and ctx_model\.\*: qa_outputs\.weight"),
    (_with("question_model.encoder.layer.0.output.dense.bias", [0.0] * 32),
     r"question_model\.encoder\.layer\.0\.output\.dense\.bias\] is a list, not a tensor"),
    (_params(["hf_bert"]), r"encoder_params is a list"),
    (_params({"do_lower_case": True, "encoder": {"encoder_model_type": "fairseq_roberta"}}),
     r"encoder_model_type='fairseq_roberta'; only DPR's BERT"),
], ids=["not-a-dict", "no-model-dict", "no-question-model", "no-ctx-model", "tower-missing-a-tensor", "stray-tensor",
        "not-a-tensor", "encoder-params-not-a-dict", "not-bert"])
def test_bad_checkpoints_are_one_clear_error(tmp_path, edit, message):
    path = _save_cp(tmp_path / "bad.cp", edit(_good_state()))
    with pytest.raises(CheckpointError, match=message) as err:
        read_dpr_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_a_tower_missing_a_layer_tensor_is_refused_by_the_strict_loader(tmp_path):
    state = _without("ctx_model.encoder.layer.0.output.dense.weight")(_good_state())
    path = _save_cp(tmp_path / "partial.cp", state)
    converted = read_dpr_checkpoint(path)
    bert_from_weights(converted.question.hf_config, converted.question.weights, source=path)
    with pytest.raises(CheckpointError, match=r"missing weights: encoder\.layer\.0\.output\.dense\.weight"):
        bert_from_weights(converted.passage.hf_config, converted.passage.weights, source=path)


def test_unsafe_and_missing_files_are_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    state = _good_state()
    state["encoder_params"] = {"pretrained_model_cfg": _RunsACommand(marker)}
    path = _save_cp(tmp_path / "evil.cp", state)
    with pytest.raises(CheckpointError, match=r"refused: it holds objects beyond tensors") as err:
        read_dpr_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert not marker.exists(), "the checkpoint's code ran"
    with pytest.raises(CheckpointError, match="no such file"):
        read_dpr_checkpoint(str(tmp_path / "nowhere.cp"))
