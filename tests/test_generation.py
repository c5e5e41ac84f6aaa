"""Greedy and beam decoding (art_jax.models.generation) against transformers' ``generate`` on
the same FiD memory, and the key/value cache against re-running the decoder over the prefix.

transformers is given our memory as ``encoder_outputs`` (the reader's encoder is checked in
tests/test_reader_model.py), so that both decode one memory. Its own cache is built lazily
(``EncoderDecoderCache(DynamicCache(), DynamicCache())``): the one ``generate`` makes from the
config counts the encoder's layers (``num_layers``), and the fixtures' decoders have one more.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from art_jax.core.batching import pad_rows, round_up
from art_jax.core.sharding import batch_sharding, make_mesh
from art_jax.models.generation import CachedDecoder, beam_search, greedy_decode
from art_jax.models.hf import load_t5, load_tokenizer
from art_jax.models.reader import answer_log_probs, fid_encode, passage_memory_bias

transformers = pytest.importorskip("transformers")

MAX_NEW = 12
EOS, PAD = 1, 0
QUESTIONS = ["Who visited the bridge?", "When was the castle painted?", "Where is the harbour?", "Who crossed it?"]
PASSAGES = [["Ada Lovelace visited the bridge near Paris in 1851.", "the harbour",
             "Marie Curie painted the old castle near Kyoto in 1920."],
            ["The committee crossed the bridge near Lagos in 1977.", "a small brown fox", "Kyoto"],
            ["the river Thames described the harbour near Lagos in 1977.", "Paris in 1851",
             "The committee described the laboratory"],
            ["a small brown fox crossed the bridge near Kyoto in 1920.", "Lagos", "The committee"]]


@pytest.fixture(scope="module")
def t5_v10_lively_dir(t5_v10_dir, tmp_path_factory):
    """t5_v10_dir with the decoder's attention and feed-forward outputs scaled by 6. The random
    tied v1.0 model otherwise repeats one token whatever the memory (the token it reads back
    through the tied embedding outweighs what its blocks add), which would leave generation
    nothing to get wrong."""
    from safetensors.torch import load_file, save_file

    folder = str(tmp_path_factory.mktemp("t5_v10_lively"))
    shutil.copytree(t5_v10_dir, folder, dirs_exist_ok=True)
    weights = load_file(f"{folder}/model.safetensors")
    for name in weights:
        if name.startswith("decoder.") and name.endswith((".o.weight", ".wo.weight")):
            weights[name] = weights[name] * 6
    save_file(weights, f"{folder}/model.safetensors", metadata={"format": "pt"})
    return folder


@dataclasses.dataclass
class Setup:
    version: str
    folder: str
    model: object
    hf: object
    memory: np.ndarray  # [B, K * N, D], from our encoder
    memory_mask: np.ndarray
    ids: np.ndarray  # [B, K, N], the encoder's input


def _setup(version: str, folder: str) -> Setup:
    tok = load_tokenizer(folder)
    rows = [tok(f"question: {q} context: {p}")["input_ids"] for q, ps in zip(QUESTIONS, PASSAGES) for p in ps]
    ids, mask = pad_rows(rows, round_up(max(map(len, rows)), 8), PAD)
    shape = (len(QUESTIONS), len(PASSAGES[0]), ids.shape[1])
    model = load_t5(folder)
    memory, memory_mask = jax.device_get(jax.jit(fid_encode)(model, ids.reshape(shape), mask.reshape(shape)))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    return Setup(version, folder, model, hf, memory, memory_mask, ids.reshape(shape))


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def setup(request, t5_v10_lively_dir, t5_v11_dir) -> Setup:
    return _setup(request.param, t5_v10_lively_dir if request.param == "1.0" else t5_v11_dir)


def _up_to_eos(rows: np.ndarray) -> np.ndarray:
    """[B, MAX_NEW]: each row up to its first EOS (kept), PAD after it."""
    out = np.full((len(rows), MAX_NEW), PAD, np.int32)
    for i, row in enumerate(rows.tolist()):
        row = row[:row.index(EOS) + 1] if EOS in row else row
        out[i, :len(row)] = row
    return out


def _hf_generate(setup: Setup, **kwargs) -> np.ndarray:
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    with torch.no_grad():
        out = setup.hf.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=torch.tensor(setup.memory)),
            attention_mask=torch.tensor(setup.memory_mask).long(), max_new_tokens=MAX_NEW, do_sample=False,
            past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()), **kwargs)
    assert np.all(out[:, 0].numpy() == 0), "decoding starts from T5's start token"
    return _up_to_eos(out[:, 1:].numpy())


def _lengths(tokens: np.ndarray, eos: int = EOS) -> list[int]:
    return [row.index(eos) + 1 if eos in row else len(row) for row in tokens.tolist()]


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "use_cache"))
def _greedy(model, memory, memory_mask, memory_bias=None, *, max_new_tokens=MAX_NEW, use_cache=True):
    return greedy_decode(model, memory, memory_mask, max_new_tokens=max_new_tokens, memory_bias=memory_bias,
                         use_cache=use_cache)


@functools.partial(jax.jit, static_argnames=("beams", "early_stopping", "length_penalty", "use_cache"))
def _beam(model, memory, memory_mask, memory_bias=None, *, beams, early_stopping=False, length_penalty=1.0,
          use_cache=True):
    return beam_search(model, memory, memory_mask, beams=beams, max_new_tokens=MAX_NEW, memory_bias=memory_bias,
                       early_stopping=early_stopping, length_penalty=length_penalty, use_cache=use_cache)


def test_greedy_matches_transformers(setup):
    ours = np.asarray(_greedy(setup.model, setup.memory, setup.memory_mask))
    assert ours.dtype == np.int32 and ours.shape == (len(QUESTIONS), MAX_NEW)
    np.testing.assert_array_equal(ours, _hf_generate(setup))
    # not a vacuous match: the rows differ, and they say more than one token
    assert len({tuple(row) for row in ours.tolist()}) > 1 and max(_lengths(ours)) > 1
    np.testing.assert_array_equal(ours, _up_to_eos(ours))  # PAD after EOS


# early_stopping: transformers' default (stop once no running beam can beat the worst finished
# one, judged at the current length), True (once the beams are all finished) and "never"
# (judged at the longest length, for a positive penalty). (Penalties below 1 make the random
# v1.1 model's every best hypothesis a lone EOS: nothing to compare.) One beam: greedy, as there.
BEAM_CONFIGS = [(3, False, 1.0), (3, True, 1.0), (4, False, 2.0), (2, "never", 1.5), (1, False, 1.0)]


@pytest.mark.parametrize("beams,early_stopping,length_penalty", BEAM_CONFIGS)
def test_beam_search_matches_transformers(setup, beams, early_stopping, length_penalty):
    ours = np.asarray(_beam(setup.model, setup.memory, setup.memory_mask, beams=beams,
                            early_stopping=early_stopping, length_penalty=length_penalty))
    expected = _hf_generate(setup, num_beams=beams, early_stopping=early_stopping, length_penalty=length_penalty)
    np.testing.assert_array_equal(ours, expected)
    assert len({tuple(row) for row in ours.tolist()}) > 1 and max(_lengths(ours)) > 1


def test_beam_search_is_not_greedy(setup):
    """The beam configurations above reach hypotheses greedy decoding does not, and (v1.1: its
    random head puts EOS within reach) end some of them early, so that finishing is exercised."""
    greedy = np.asarray(_greedy(setup.model, setup.memory, setup.memory_mask))
    found = [np.asarray(_beam(setup.model, setup.memory, setup.memory_mask, beams=b, early_stopping=e,
                              length_penalty=p)) for b, e, p in BEAM_CONFIGS]
    assert any(not np.array_equal(tokens, greedy) for tokens in found)
    assert len({tokens.tobytes() for tokens in found}) > 2, "the configurations should matter"
    if setup.version == "1.1":
        lengths = [length for tokens in found for length in _lengths(tokens)]
        assert 1 < min(length for length in lengths if length > 1) < MAX_NEW and max(lengths) == MAX_NEW


def _bias(setup: Setup) -> jax.Array:
    passages = len(PASSAGES[0])
    weights = jax.random.normal(jax.random.key(0), (len(QUESTIONS), passages)) * 3
    return passage_memory_bias(weights, setup.memory.shape[1] // passages)


@jax.jit
def _step_logits(model, memory, memory_mask, memory_bias, tokens):
    """Logits [R, T, V] of teacher-forced ``tokens`` [R, T], one cached step per position."""
    decoder = CachedDecoder(model, memory, memory_mask, memory_bias, tokens.shape[1])

    def step(state, position):
        logits, state = decoder.step(state, tokens[:, position], position)
        return state, logits

    _, logits = jax.lax.scan(step, decoder.initial_state(tokens.shape[0]), jnp.arange(tokens.shape[1]))
    return jnp.swapaxes(logits, 0, 1)


def test_cached_steps_equal_the_full_decoder(setup):
    """Every cached step's logits equal T5.logits over the whole prefix, with a memory bias and
    three decoder rows per memory row (beams; one row per memory row is greedy decoding's,
    checked against transformers above)."""
    bias = _bias(setup)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (len(QUESTIONS) * 3, MAX_NEW), 0, 100))
    stepped = _step_logits(setup.model, setup.memory, setup.memory_mask, bias, tokens)
    full = jax.jit(lambda model, memory, mask, tokens, bias: model.logits(memory, mask, tokens, memory_bias=bias))
    expected = full(setup.model, setup.memory, setup.memory_mask, tokens, bias)
    assert np.max(np.abs(np.asarray(stepped) - np.asarray(expected))) <= 1e-4


def test_cached_decoding_equals_uncached(setup):
    bias = _bias(setup)
    args = (setup.model, setup.memory, setup.memory_mask, bias)
    greedy = np.asarray(_greedy(*args))
    np.testing.assert_array_equal(greedy, np.asarray(_greedy(*args, use_cache=False)))
    beams = np.asarray(_beam(*args, beams=3))
    np.testing.assert_array_equal(beams, np.asarray(_beam(*args, beams=3, use_cache=False)))
    # the bias took part
    assert not np.array_equal(greedy, np.asarray(_greedy(*args[:3]))) or not np.array_equal(
        beams, np.asarray(_beam(*args[:3], beams=3)))


def test_nnx_jit_remat_and_a_sharded_batch(t5_v11_dir):
    """nnx.jit with the sizes static gives the same tokens, and so does a model configured for
    rematerialisation (its blocks run inside the decoding loop); so does a batch sharded over
    the mesh's data axis with the parameters over its model axis (plain jit, no shard_map)."""
    setup = _setup("1.1", t5_v11_dir)
    expected_greedy = np.asarray(_greedy(setup.model, setup.memory, setup.memory_mask))
    expected_beams = np.asarray(_beam(setup.model, setup.memory, setup.memory_mask, beams=3))
    decode = nnx.jit(greedy_decode, static_argnames=("max_new_tokens",))
    np.testing.assert_array_equal(np.asarray(decode(setup.model, setup.memory, setup.memory_mask,
                                                    max_new_tokens=MAX_NEW)), expected_greedy)
    remat = load_t5(t5_v11_dir, remat=True)
    np.testing.assert_array_equal(np.asarray(_greedy(remat, setup.memory, setup.memory_mask)), expected_greedy)

    mesh = make_mesh(data=4, model=2)
    model = load_t5(setup.folder, mesh=mesh)
    memory = jax.device_put(setup.memory, batch_sharding(mesh, 3))
    memory_mask = jax.device_put(setup.memory_mask, batch_sharding(mesh, 2))
    greedy = _greedy(model, memory, memory_mask)
    beams = _beam(model, memory, memory_mask, beams=3)
    assert len(greedy.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(greedy), expected_greedy)
    np.testing.assert_array_equal(np.asarray(beams), expected_beams)


def test_the_checkpoints_own_special_tokens(t5_v10_lively_dir, tmp_path):
    """A checkpoint whose config names another decoder start and eos (a T5 with BERT's
    vocabulary has its [CLS]/[SEP]): decoding starts from and stops at those, as transformers'
    generate does with the same config; log-likelihoods shift the labels with that start."""
    import json

    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    base = _setup("1.0", t5_v10_lively_dir)
    start = 3

    def hf_tokens(hf, **kwargs):
        with torch.no_grad():
            return hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=torch.tensor(base.memory)),
                               attention_mask=torch.tensor(base.memory_mask).long(), max_new_tokens=MAX_NEW,
                               do_sample=False, past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
                               **kwargs).numpy()

    # as eos, a token said in the middle of some row but first in none, so that stopping is exercised
    said = hf_tokens(base.hf, decoder_start_token_id=start, eos_token_id=EOS)[:, 1:]
    eos = int(next(token for token in said[:, 2:-2].ravel() if token not in said[:, :2]))
    folder = tmp_path / "t5"
    shutil.copytree(t5_v10_lively_dir, folder)
    for name in ("config.json", "generation_config.json"):
        if (folder / name).exists():
            record = json.loads((folder / name).read_text())
            record.update(decoder_start_token_id=start, eos_token_id=eos)
            (folder / name).write_text(json.dumps(record))
    model = load_t5(str(folder))
    assert (model.config.decoder_start_token_id, model.config.eos_token_id) == (start, eos)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(folder)).eval()
    expected = hf_tokens(hf)
    assert np.all(expected[:, 0] == start)
    ours = np.asarray(_greedy(model, base.memory, base.memory_mask))
    width = expected.shape[1] - 1
    np.testing.assert_array_equal(ours[:, :width], expected[:, 1:])
    assert np.all(ours[:, width:] == PAD) and 2 < min(_lengths(ours, eos)) < MAX_NEW
    labels = jnp.asarray(ours[:1, :4])
    got = model.label_log_probs(jnp.asarray(base.memory[:1]), jnp.asarray(base.memory_mask[:1]), labels)
    with torch.no_grad():
        logits = hf(encoder_outputs=BaseModelOutput(last_hidden_state=torch.tensor(base.memory[:1])),
                    attention_mask=torch.tensor(base.memory_mask[:1]).long(),
                    labels=torch.tensor(np.asarray(labels)).long()).logits
    reference = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(np.asarray(labels))[..., None].long())
    np.testing.assert_allclose(np.asarray(got), reference[..., 0].numpy(), atol=1e-4)


def test_the_packed_encoder_skips_the_padding_alone(setup):
    """The encoder over each question's real tokens packed (``packed_fid_encode``, what `answer`
    runs) equals the padded encoder at every real token, and its gradient is the same; so does the
    remat model (its scanned blocks), and a capacity with spare slots. The decoder reading that
    packed memory gives the padded memory's answers: greedy and beam search, with and without a
    per-passage bias (a Joint top-K reader's, taken to the slots)."""
    from art_jax.evaluation.predict import encoder_capacity, generate
    from art_jax.models.packing import Packing, packed_capacity
    from art_jax.models.reader import packed_fid_encode

    ids, mask = setup.ids, setup.memory_mask.reshape(setup.ids.shape)
    assert mask.mean() < 0.8  # a quarter of the inputs is padding: there is something to skip
    real = setup.memory_mask.astype(bool)
    counts = real.sum(axis=1)
    encode = nnx.jit(packed_fid_encode, static_argnames=("capacity",))
    exact = packed_capacity(mask, 1)
    assert exact == counts.max() < encoder_capacity(mask) < mask[0].size and counts.min() < exact
    remat = load_t5(setup.folder, remat=True)
    for model in (setup.model, remat):
        for capacity in (exact, encoder_capacity(mask)):
            memory, filled, _ = jax.device_get(encode(model, ids, mask, capacity=capacity))
            np.testing.assert_array_equal(filled, np.arange(capacity) < counts[:, None])
            for row in range(len(ids)):  # the real tokens in order, then spare slots
                np.testing.assert_allclose(memory[row, :counts[row]], setup.memory[row][real[row]], rtol=1e-5,
                                           atol=1e-6)

    answers = {}  # (bias?, beams) -> the padded memory's answers
    for memory_bias in (None, _bias(setup)):
        args = (setup.model, setup.memory, setup.memory_mask, memory_bias)
        for count in (1, 3):
            want = np.asarray(_greedy(*args) if count == 1 else _beam(*args, beams=count))
            answers[memory_bias is not None, count] = want
            for capacity in (None, encoder_capacity(mask)):
                np.testing.assert_array_equal(np.asarray(generate(setup.model, ids, mask, memory_bias,
                                                                  max_new_tokens=MAX_NEW, beams=count,
                                                                  capacity=capacity)), want)
    assert len(set(map(tuple, answers[False, 1].tolist()))) > 1  # the answers differ with their passages
    # the bias changes the answers: a packed bias in the wrong slots would show
    assert any(not np.array_equal(answers[True, count], answers[False, count]) for count in (1, 3))
    # closer than answers can tell: the bias in each real token's slot, and the decoder's log-probabilities
    # of the same labels over the packed memory equal the padded memory's
    bias, labels = _bias(setup), jnp.asarray(answers[True, 3])
    memory, filled, packed_bias = encode(setup.model, ids, mask, memory_bias=bias, capacity=encoder_capacity(mask))
    for row in range(len(ids)):
        np.testing.assert_array_equal(np.asarray(packed_bias)[row, :counts[row]], np.asarray(bias)[row][real[row]])
    log_probs = jax.jit(answer_log_probs)
    np.testing.assert_allclose(log_probs(setup.model, memory, filled, labels, memory_bias=packed_bias),
                               log_probs(setup.model, setup.memory, setup.memory_mask, labels, memory_bias=bias),
                               rtol=1e-5, atol=1e-5)

    weights = np.random.default_rng(0).normal(size=setup.memory.shape).astype(np.float32) * real[..., None]

    def padded_loss(model):
        return jnp.sum(fid_encode(model, ids, mask)[0] * weights)

    def packed_loss(model, capacity):  # the same weights on the same tokens, in their slots
        packing = Packing.of(jnp.asarray(mask).reshape(-1, mask.shape[-1]), len(ids), capacity)
        return jnp.sum(packing.unpack(packed_fid_encode(model, ids, mask, capacity)[0]) *
                       weights.reshape(-1, mask.shape[-1], weights.shape[-1]))

    padded = jax.tree.leaves(nnx.grad(padded_loss)(setup.model))
    for model, capacity in ((setup.model, exact), (remat, encoder_capacity(mask))):
        for a, b in zip(padded, jax.tree.leaves(nnx.grad(packed_loss)(model, capacity)), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)  # (remat: float32 reassociation)
