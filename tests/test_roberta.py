"""RoBERTa retriever towers and the projection head (DPR-PAQ, Oguz et al. 2022), checked
against transformers' RobertaModel and sentence-transformers on PyTorch.

The tiny fixture is a random RobertaModel saved by transformers with a real byte-level BPE
tokenizer; its parity checks also run on a copy with every tensor perturbed (a random init's
LayerNorms are ones and zeros, its padding position row zero), and a projection head gets
perturbed too before it is compared, so that no mapping can hide behind equal values.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from art_jax.core.errors import UserError
from art_jax.core.sharding import make_mesh
from art_jax.data.tokenization import tokenize_passages, tokenize_questions
from art_jax.models import hf
from art_jax.models.bert import Bert, BertConfig
from art_jax.models.export import check_max_lengths, export_retriever
from art_jax.models.hf import CheckpointError, init_module, load_bert, load_tokenizer
from art_jax.retrieval.encoder import load_retriever, load_tower
from tests.hf_fixtures import CORPUS, make_roberta_checkpoint

transformers = pytest.importorskip("transformers")

# One jitted function (an NNX module is a pytree argument): equal configs and shapes share a compilation.
_forward = jax.jit(lambda tower, ids, mask: (tower(ids, mask), tower.embed_cls(ids, mask)))


def _cls(tower, tokens) -> np.ndarray:
    return np.asarray(_forward(tower, tokens.ids, tokens.mask)[1])

QUESTIONS = ["Who visited the bridge near Paris?", "which fox crossed the harbour", "When was the castle painted?",
             # longer than the question max length (16): cut
             "What did Marie Curie describe in Lagos in 1977 and who painted the old castle near Kyoto?"]
TITLES = ["Paris notes", "", "Kyoto", "A very long title about bridges and castles"]
TEXTS = [CORPUS[0], CORPUS[1], " ".join(CORPUS[2:12]), CORPUS[3]]  # the third is cut at any max length here


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """Initialised wider than 0.02 so that [CLS] depends on the input enough to tell inputs apart."""
    return make_roberta_checkpoint(str(tmp_path_factory.mktemp("roberta")), initializer_range=0.3)


@pytest.fixture(scope="module")
def perturbed_dir(roberta_dir, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("perturbed") / "roberta")
    shutil.copytree(roberta_dir, folder)
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    rng = np.random.default_rng(1)
    for key, value in weights.items():
        weights[key] = (value + 0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
    save_file(weights, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def headed(perturbed_dir):
    """The perturbed RoBERTa with a fresh projection head, itself perturbed."""
    tower = load_bert(perturbed_dir, projection=True, seed=5)
    rng = np.random.default_rng(2)
    for _, var in nnx.to_flat_state(nnx.state(tower.head, nnx.Param)):
        value = np.asarray(var.get_value())
        var.set_value(jax.numpy.asarray(value + 0.3 * rng.standard_normal(value.shape).astype(value.dtype)))
    return tower


@pytest.fixture(scope="module")
def exported(headed, perturbed_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "out")
    return export_retriever(headed, headed, load_tokenizer(perturbed_dir), out, question_max_length=16,
                            passage_max_length=48, provenance={"step": 3})


def _read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _params(tower) -> dict:
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(tower, nnx.Param))}


def _assert_same_params(got, want):
    got, want = _params(got), _params(want)
    assert got.keys() == want.keys()
    for path, value in want.items():
        assert got[path].dtype == value.dtype, path
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def _transformers_hidden(folder, ids, mask):
    model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    # (a masked LM's folder has no pooler, which the hidden states do not use)
    assert isinstance(model, transformers.RobertaModel) and not {
        k for k in info["missing_keys"] if not k.startswith("pooler.")}, info
    with torch.no_grad():
        return model.eval()(input_ids=torch.from_numpy(ids).long(),
                            attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()


# ---------------------------------------------------------------------------------------
# The tokenizer and the retriever's inputs


def test_the_retrievers_tokenization_works_with_a_roberta_tokenizer(roberta_dir):
    tokenizer = load_tokenizer(roberta_dir)
    assert type(tokenizer).__name__.startswith("RobertaTokenizer") and tokenizer.is_fast and tokenizer.pad_token_id == 1
    questions = tokenize_questions(tokenizer, QUESTIONS, 16)
    passages = tokenize_passages(tokenizer, TITLES, TEXTS, 40)
    for tokens, width in ((questions, 16), (passages, 40)):
        assert tokens.ids.shape[1] == width and (tokens.ids[tokens.mask == 0] == 1).all()  # padded with <pad>
        lengths = tokens.mask.sum(1)
        assert len(set(lengths.tolist())) > 1
        for row, n in zip(tokens.ids, lengths):
            assert row[0] == 0 and row[n - 1] == 2  # <s> ... </s>
    # informative: real merges, no unknown token, not characters one by one
    assert tokenizer.unk_token_id not in questions.ids and tokenizer.unk_token_id not in passages.ids
    assert tokenizer.tokenize(" Lovelace") == ["ĠLovelace"]
    # "<s> title </s></s> text </s>", only the text cut, its final </s> kept; an empty title too
    first = tokenizer(TITLES[0], add_special_tokens=False)["input_ids"]
    text = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    n = passages.mask[0].sum()
    assert passages.ids[0, :n].tolist() == [0, *first, 2, 2, *text, 2]
    assert passages.ids[1, :3].tolist() == [0, 2, 2]
    assert passages.mask[2].sum() == 40 and passages.ids[2, 39] == 2
    # a title too long for any text: cut too, the final </s> kept
    long_title = tokenize_passages(tokenizer, [" ".join(CORPUS[:4])], ["some text"], 16)
    assert long_title.mask.sum() == 16 and long_title.ids[0, 0] == 0 and long_title.ids[0, 15] == 2


# ---------------------------------------------------------------------------------------
# Parity with transformers' RobertaModel


@pytest.mark.parametrize("perturb", [False, True], ids=["as-saved", "perturbed"])
def test_roberta_matches_transformers(roberta_dir, perturbed_dir, perturb):
    folder = perturbed_dir if perturb else roberta_dir
    tower, tokenizer = load_bert(folder), load_tokenizer(folder)
    assert (tower.config.model_type, tower.config.type_vocab_size, tower.config.layer_norm_eps,
            tower.config.pad_token_id, tower.config.max_length) == ("roberta", 1, 1e-5, 1, 64)
    assert tower.head is None  # a Hugging Face folder: plain [CLS]
    batches = [tokenize_questions(tokenizer, QUESTIONS, 16),  # padded to 16
               tokenize_questions(tokenizer, QUESTIONS, 16, pad_to=64),  # far more padding than any row
               tokenize_passages(tokenizer, TITLES, TEXTS, 64, pad_to=64)]  # a row of 64 tokens: the last position
    assert batches[2].mask.sum(1).max() == 64
    for tokens in batches:
        expected = _transformers_hidden(folder, tokens.ids, tokens.mask)
        hidden, cls = (np.asarray(x) for x in _forward(tower, tokens.ids, tokens.mask))
        real = tokens.mask.astype(bool)
        np.testing.assert_allclose(hidden[real], expected[real], rtol=0, atol=1e-5)
        np.testing.assert_allclose(cls, expected[:, 0], rtol=0, atol=1e-5)
        assert np.abs(cls - cls.mean(0)).max() > 0.1, "every input gets the same vector: the test proves nothing"
    # the same questions under different padding: the same vectors
    np.testing.assert_allclose(_cls(tower, batches[1]), _cls(tower, batches[0]), rtol=0, atol=1e-5)


def test_a_masked_lm_checkpoint_loads_its_roberta_body(roberta_dir, tmp_path):
    """RobertaForMaskedLM's layout (roberta-base on the hub): 'roberta.' names, an lm_head, no pooler."""
    folder = str(tmp_path / "mlm")
    config = transformers.RobertaConfig.from_pretrained(roberta_dir)
    torch.manual_seed(1)
    transformers.RobertaForMaskedLM(config).save_pretrained(folder)
    load_tokenizer(roberta_dir).save_pretrained(folder)
    assert any(k.startswith("roberta.") for k in load_file(f"{folder}/model.safetensors"))
    tower = load_bert(folder)
    assert tower.pooler is None
    tokens = tokenize_questions(load_tokenizer(folder), QUESTIONS, 16)
    np.testing.assert_allclose(_cls(tower, tokens), _transformers_hidden(folder, tokens.ids, tokens.mask)[:, 0],
                               rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# The projection head: export, sentence-transformers, round trips


def test_export_with_a_head_is_what_sentence_transformers_computes(headed, perturbed_dir, exported, tmp_path):
    from sentence_transformers import SentenceTransformer

    encoder = load_retriever(exported)
    assert (encoder.question_max_length, encoder.passage_max_length) == (16, 48)
    for side in ("question", "passage"):
        folder = f"{exported}/{side}_encoder"
        assert [m["type"].rsplit(".", 1)[1] for m in _read(f"{folder}/modules.json")] == [
            "Transformer", "Pooling", "Dense", "LayerNorm"]
        assert _read(f"{folder}/2_Dense/config.json") == {
            "in_features": 32, "out_features": 32, "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity"}
        assert _read(f"{folder}/3_LayerNorm/config.json") == {"dimension": 32}
        # transformers: a RobertaModel folder with exactly the body's weights
        model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
        assert isinstance(model, transformers.RobertaModel)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        original = transformers.RobertaModel.from_pretrained(perturbed_dir).state_dict()
        assert model.state_dict().keys() == original.keys()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
    # round trip: the same parameters and config, both towers
    _assert_same_params(encoder.question, headed)
    _assert_same_params(encoder.passage, headed)
    assert encoder.question.config == encoder.passage.config == headed.config
    assert _read(f"{exported}/art_jax_export.json")["shared_towers"] is True

    # sentence-transformers gives the tower's embedding: Transformer, CLS, Dense, LayerNorm
    model = SentenceTransformer(f"{exported}/question_encoder", device="cpu")
    assert len(model) == 4 and model.max_seq_length == 16 and model.similarity_fn_name == "dot"
    want = np.asarray(encoder.embed_questions(QUESTIONS))
    assert len(encoder.tokenizer(QUESTIONS[-1])["input_ids"]) > 16, "the long question is not cut"
    np.testing.assert_allclose(model.encode(QUESTIONS, convert_to_numpy=True), want, rtol=0, atol=1e-5)
    tokens = tokenize_questions(encoder.tokenizer, QUESTIONS, 16)
    np.testing.assert_allclose(_cls(headed, tokens), want, rtol=0, atol=1e-5)
    # informative: the head changes the vector, and the vectors differ between questions
    plain = _transformers_hidden(perturbed_dir, tokens.ids, tokens.mask)[:, 0]
    assert np.abs(plain - want).max() > 0.1 and np.abs(want - want.mean(0)).max() > 0.1
    # passages as "title</s></s>text" (RoBERTa's pair), the text cut at the end
    passage_model = SentenceTransformer(f"{exported}/passage_encoder", device="cpu")
    got = passage_model.encode([f"{title}</s></s>{text}" for title, text in zip(TITLES, TEXTS)], convert_to_numpy=True)
    np.testing.assert_allclose(got, np.asarray(encoder.embed_passages(TITLES, TEXTS)), rtol=0, atol=1e-5)
    # the folder as sentence-transformers 6 saves it again (its own module names and configs) reads the same
    model.save(str(tmp_path / "resaved"))
    assert _read(f"{tmp_path}/resaved/1_Pooling/config.json").get("pooling_mode") == "cls"
    _assert_same_params(load_bert(str(tmp_path / "resaved")), headed)
    # an export with a head is a tower with a head wherever it is read
    assert load_tower(exported, "passage")[0].config.projection
    assert load_bert(f"{exported}/passage_encoder", projection=True).config.projection
    with pytest.raises(CheckpointError, match="projection=False"):
        load_bert(f"{exported}/question_encoder", projection=False)


def test_export_of_a_random_roberta_with_a_head_round_trips_exactly(tmp_path):
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                     max_position_embeddings=34, type_vocab_size=1, layer_norm_eps=1e-5, model_type="roberta",
                     pad_token_id=1, projection=True)
    model = init_module(Bert, cfg, seed=3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [leaf + jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)

    out = hf.export(model, None, str(tmp_path / "random"))
    assert _read(f"{out}/config.json")["model_type"] == "roberta"
    assert _read(f"{out}/sentence_bert_config.json")["max_seq_length"] == 32  # the positions' limit
    loaded = load_bert(out)
    assert loaded.config == cfg
    _assert_same_params(loaded, model)
    ids = np.array([[0, 10, 11, 12, 2, 1, 1, 1], [0, 20, 21, 22, 23, 24, 25, 2]] * 2, np.int32)
    mask = (ids != 1).astype(np.int32)
    hidden = _transformers_hidden(out, ids, mask)  # transformers reads the same numbers
    np.testing.assert_allclose(np.asarray(_forward(model, ids, mask)[0])[mask > 0], hidden[mask > 0], rtol=0,
                               atol=1e-4)


def test_a_fresh_head(roberta_dir):
    plain = load_bert(roberta_dir)
    head = load_bert(roberta_dir, projection=True)  # seed 0
    assert head.config == BertConfig(**{**plain.config.__dict__, "projection": True})
    _assert_same_params(nnx.merge(*nnx.split(head)), head)
    body = {p: v for p, v in _params(head).items() if p[0] != "head"}
    assert body.keys() == _params(plain).keys() and all(np.array_equal(v, _params(plain)[p]) for p, v in body.items())
    values = {p[1:]: v for p, v in _params(head).items() if p[0] == "head"}
    assert (values[("norm", "scale")] == 1).all() and (values[("norm", "bias")] == 0).all()
    assert (values[("dense", "bias")] == 0).all() and 0.15 < values[("dense", "kernel")].std() < 0.45  # 0.3
    _assert_same_params(load_bert(roberta_dir, projection=True), head)  # seeded
    assert not np.array_equal(_params(load_bert(roberta_dir, projection=True, seed=1))[("head", "dense", "kernel")],
                              values[("dense", "kernel")])
    assert load_bert(roberta_dir, projection=False).head is None
    # one head for both towers of a Hugging Face folder; on a mesh, the same numbers
    encoder = load_retriever(roberta_dir, projection=True)
    assert encoder.question is encoder.passage and encoder.question.config.projection
    mesh = make_mesh(devices=jax.devices())
    sharded = load_bert(roberta_dir, projection=True, mesh=mesh)
    tokens = tokenize_questions(load_tokenizer(roberta_dir), QUESTIONS, 16)
    np.testing.assert_allclose(_cls(sharded, tokens), _cls(head, tokens), rtol=0, atol=1e-5)


def test_max_lengths_are_roberta_positions(headed):
    check_max_lengths(headed, headed, 16, 64)
    with pytest.raises(UserError, match=r"1\.\.64 positions \(max_position_embeddings - 2\)"):
        check_max_lengths(headed, headed, 16, 65)


def test_heads_sentence_transformers_would_not_compute_are_refused(exported, tmp_path):
    def edited(name, path, edit):
        folder = str(tmp_path / name)
        shutil.copytree(f"{exported}/question_encoder", folder)
        value = _read(f"{folder}/{path}")
        with open(f"{folder}/{path}", "w") as f:
            json.dump(edit(value), f)
        return folder

    cases = [("tanh", "2_Dense/config.json", lambda c: {**c, "activation_function": "torch.nn.modules.activation.Tanh"},
              "activation Identity"),
             ("mean", "1_Pooling/config.json", lambda c: {**c, "pooling_mode_cls_token": False,
                                                          "pooling_mode_mean_tokens": True}, "CLS pooling"),
             ("normalized", "modules.json", lambda m: m + [{"idx": 4, "name": "4", "path": "4_Normalize",
                                                            "type": "sentence_transformers.models.Normalize"}],
              "Normalize")]
    for name, path, edit, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_bert(edited(name, path, edit))
    # sentence-transformers 6's own pooling config reads as CLS
    folder = edited("st6", "1_Pooling/config.json", lambda c: {"embedding_dimension": 32, "pooling_mode": "cls",
                                                                "include_prompt": True})
    assert load_bert(folder).config.projection
    folder = edited("gpt2", "config.json", lambda c: {**c, "model_type": "gpt2"})
    with pytest.raises(CheckpointError, match="'gpt2'.*expected 'bert' or 'roberta'"):
        load_bert(folder)


# ---------------------------------------------------------------------------------------
# A training run's checkpoint read back as towers


def test_a_runs_roberta_tower_with_its_head_is_read_back(headed, exported, tmp_path):
    from art_jax.core.checkpoints import Checkpoints
    from art_jax.workdir import copy_initial_models, tower_from_params

    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with open(f"{workdir}/config.json", "w") as f:
        f.write("{}")
    # the run started from the export, one shared tower: as the trainer saves its state
    copy_initial_models(workdir, exported, {"question": "shared", "passage": "shared"},
                        {"question": 16, "passage": 48})
    assert _read(f"{workdir}/models/question/config.json")["model_type"] == "roberta"
    checkpoints = Checkpoints(workdir, every=1, keep=1)
    checkpoints.save(7, {"params": {"shared": nnx.split(headed, nnx.Param)[1]}, "step": 7}, {}, force=True)
    checkpoints.close()

    tower, length = load_tower(workdir, "passage")
    assert length == 48 and tower.config == headed.config
    _assert_same_params(tower, headed)
    tokens = tokenize_questions(load_tokenizer(exported + "/passage_encoder"), QUESTIONS, 16)
    np.testing.assert_array_equal(_cls(tower, tokens), _cls(headed, tokens))
    # without a head in the params, none in the tower
    params = {"embeddings": {}, "layers": {}}
    for path, var in nnx.to_flat_state(nnx.state(headed, nnx.Param)):
        if path[0] in ("head", "pooler"):
            continue
        node = params
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = {"value": var.get_value()}
    plain = tower_from_params(f"{workdir}/models/question", params)
    assert plain.head is None and plain.pooler is None and plain.config.model_type == "roberta"
