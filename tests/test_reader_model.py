"""The Fusion-in-Decoder reader (art_jax.models.reader) against transformers on PyTorch CPU.

The oracle encodes every (question, passage) input on its own with transformers' T5 encoder,
unpadded, lays the K outputs end to end by hand (zeros at padding), and runs transformers'
decoder over that memory. The cross-attention bias has no argument in transformers: it goes in
as the encoder attention mask, a 4-D float mask [B, 1, 1, M] (0 or the float32 minimum at
padding, plus the bias) that transformers' eager attention adds to the logits as they are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from art_jax.core.batching import pad_rows, round_up
from art_jax.models.hf import load_t5, load_tokenizer
from art_jax.models.reader import answer_log_probs, fid_encode, passage_memory_bias

transformers = pytest.importorskip("transformers")

QUESTIONS = ["Who visited the bridge?", "When was the castle painted?"]
PASSAGES = [["Ada Lovelace visited the bridge near Paris in 1851.", "the harbour",
             "Marie Curie painted the old castle near Kyoto in 1920."],
            ["The committee crossed the bridge near Lagos in 1977.", "Kyoto",
             "a small brown fox described the laboratory"]]
ANSWERS = ["Ada Lovelace", "in 1920 near Kyoto, the old castle"]
# passage weights, as joint top-K gives lambda * p(z | q): far from uniform, so they matter
WEIGHTS = np.array([[2.0, -1.5, 0.5], [-0.5, 1.0, 3.0]], np.float32)


@dataclasses.dataclass
class Case:
    folder: str
    model: object  # ours, float32
    hf: object  # transformers' T5ForConditionalGeneration, eager attention
    ids: np.ndarray  # [B, K, N]
    mask: np.ndarray
    labels: np.ndarray  # [B, T], 0 after </s>
    label_mask: np.ndarray
    memory: torch.Tensor  # the oracle's [B, K * N, D]


def _inputs(folder: str):
    """(ids, mask) [B, K, N] of the question + passage inputs, each question's passages of
    different lengths, and (labels, label_mask) [B, T] of answers of different lengths."""
    tok = load_tokenizer(folder)
    rows = [tok(f"question: {q} context: {p}")["input_ids"] for q, ps in zip(QUESTIONS, PASSAGES) for p in ps]
    answers = tok(ANSWERS)["input_ids"]
    passages = len(PASSAGES[0])
    assert all(len({len(r) for r in rows[i:i + passages]}) == passages for i in range(0, len(rows), passages))
    assert len({len(a) for a in answers}) > 1
    ids, mask = pad_rows(rows, round_up(max(map(len, rows)), 8), 0)
    labels, label_mask = pad_rows(answers, round_up(max(map(len, answers)), 8), 0)
    shape = (len(QUESTIONS), passages, ids.shape[1])
    return ids.reshape(shape), mask.reshape(shape), labels, label_mask


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def case(request, t5_v10_dir, t5_v11_dir) -> Case:
    folder = t5_v10_dir if request.param == "1.0" else t5_v11_dir
    ids, mask, labels, label_mask = _inputs(folder)
    batch, passages, length = ids.shape
    hf = transformers.T5ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    memory = torch.zeros(batch, passages, length, hf.config.d_model)
    with torch.no_grad():
        for b, k in np.ndindex(batch, passages):  # each input alone, unpadded
            row = torch.from_numpy(ids[b, k, :mask[b, k].sum()])[None].long()
            memory[b, k, :row.shape[1]] = hf.encoder(input_ids=row).last_hidden_state[0]
    memory = memory.reshape(batch, passages * length, -1)
    return Case(folder, load_t5(folder), hf, ids, mask, labels, label_mask, memory)


def _nll(log_probs, label_mask):
    return -jnp.sum(log_probs * label_mask)


@jax.jit
def _forward(model, ids, mask, labels, memory_bias):
    memory, memory_mask = fid_encode(model, ids, mask)
    return memory, memory_mask, answer_log_probs(model, memory, memory_mask, labels, memory_bias=memory_bias)


@jax.jit
def _nll_and_weight_grads(model, ids, mask, labels, label_mask, weights):
    def loss(model, weights):
        memory, memory_mask = fid_encode(model, ids, mask)
        bias = passage_memory_bias(weights, ids.shape[-1])
        return _nll(answer_log_probs(model, memory, memory_mask, labels, memory_bias=bias), label_mask)

    return jax.value_and_grad(loss, argnums=(0, 1))(model, weights)


def _torch_log_probs(case: Case, encoder_mask: torch.Tensor):
    """transformers' per-token log-probs [B, T] and summed NLL of the labels over the oracle's memory."""
    labels = torch.from_numpy(np.where(case.label_mask > 0, case.labels, -100)).long()
    out = case.hf(encoder_outputs=(case.memory,), attention_mask=encoder_mask, labels=labels)
    log_probs = torch.gather(torch.log_softmax(out.logits, -1), -1, labels.clamp(min=0)[..., None])[..., 0]
    return log_probs, out.loss * int(case.label_mask.sum())


def _float_mask(case: Case, weights: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The 4-D additive encoder mask: padding at the float32 minimum, plus each passage's weight."""
    mask = torch.from_numpy(case.mask.reshape(len(case.mask), -1))
    weights = torch.as_tensor(weights)
    padding = torch.where(mask > 0, 0.0, torch.finfo(torch.float32).min)
    return (padding + torch.repeat_interleave(weights, case.ids.shape[-1], dim=-1))[:, None, None, :]


def test_reader_matches_transformers(case):
    memory, memory_mask, ours = jax.device_get(_forward(case.model, case.ids, case.mask, case.labels, None))
    concatenated_mask = case.mask.reshape(len(case.mask), -1)
    np.testing.assert_array_equal(memory_mask, concatenated_mask)
    real = concatenated_mask.astype(bool)
    assert np.max(np.abs(memory[real] - case.memory.numpy()[real])) <= 1e-4

    with torch.no_grad():
        expected, expected_nll = _torch_log_probs(case, torch.from_numpy(concatenated_mask).long())
    in_answer = case.label_mask.astype(bool)
    assert np.max(np.abs(ours[in_answer] - expected.numpy()[in_answer])) <= 1e-4
    assert abs(-np.sum(ours * case.label_mask) - expected_nll.item()) <= 1e-4
    assert np.all(ours[in_answer] < 0) and np.std(ours[in_answer]) > 0.01


def test_memory_bias_matches_torch(case):
    bias = passage_memory_bias(jnp.asarray(WEIGHTS), case.ids.shape[-1])
    np.testing.assert_array_equal(np.asarray(bias),
                                  np.broadcast_to(WEIGHTS[..., None], case.ids.shape).reshape(len(WEIGHTS), -1))
    _, _, ours = jax.device_get(_forward(case.model, case.ids, case.mask, case.labels, bias))
    _, _, unbiased = jax.device_get(_forward(case.model, case.ids, case.mask, case.labels, None))

    with torch.no_grad():
        expected, _ = _torch_log_probs(case, _float_mask(case, WEIGHTS))
        # the 4-D float route itself: with no bias, transformers' own 0/1 mask
        zero_bias, _ = _torch_log_probs(case, _float_mask(case, np.zeros_like(WEIGHTS)))
        plain, _ = _torch_log_probs(case, torch.from_numpy(case.mask.reshape(2, -1)).long())
    in_answer = case.label_mask.astype(bool)
    assert torch.equal(zero_bias, plain)
    assert np.max(np.abs(ours[in_answer] - expected.numpy()[in_answer])) <= 1e-4
    assert np.max(np.abs(ours[in_answer] - unbiased[in_answer])) > 1e-2, "the bias changed nothing"


def test_memory_bias_gradient_matches_torch(case):
    nll, (_, weight_grads) = _nll_and_weight_grads(case.model, case.ids, case.mask, case.labels,
                                                   case.label_mask, jnp.asarray(WEIGHTS))
    weights = torch.from_numpy(WEIGHTS).requires_grad_()
    _, expected_nll = _torch_log_probs(case, _float_mask(case, weights))
    expected_nll.backward()
    assert abs(float(nll) - expected_nll.item()) <= 1e-4
    assert np.max(np.abs(np.asarray(weight_grads) - weights.grad.numpy())) <= 1e-4
    assert np.min(np.abs(weights.grad.numpy())) > 1e-3, "every passage's weight should matter"


@jax.jit
def _training_loss_and_grads(model, ids, mask, labels, label_mask, weights, key):
    """A FiD loss with the decoder's dropout on (the encoder's would only add compile time), its
    gradients for the parameters and the passage weights."""
    def loss(model, weights):
        memory, memory_mask = fid_encode(model, ids, mask)
        log_probs = answer_log_probs(model, memory, memory_mask, labels, dropout_key=key,
                                     memory_bias=passage_memory_bias(weights, ids.shape[-1]))
        return _nll(log_probs, label_mask)

    return jax.value_and_grad(loss, argnums=(0, 1))(model, weights)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_is_identical(t5_v11_dir, policy):
    """Rematerialisation, whatever it keeps, is version-independent: one fixture (the compilations
    are the slow part)."""
    ids, mask, labels, label_mask = _inputs(t5_v11_dir)
    model, remat = load_t5(t5_v11_dir), load_t5(t5_v11_dir, remat=True, remat_policy=policy)
    assert remat.decoder.remat and remat.encoder.remat and not model.decoder.remat
    assert remat.decoder.remat_policy == policy
    args = (ids, mask, labels, label_mask, jnp.asarray(WEIGHTS), jax.random.key(3))
    plain = jax.device_get(_training_loss_and_grads(model, *args))
    rematerialised = jax.device_get(_training_loss_and_grads(remat, *args))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematerialised)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # dropout was on: the loss is not the evaluation loss
    _, _, log_probs = _forward(model, ids, mask, labels, passage_memory_bias(jnp.asarray(WEIGHTS), ids.shape[-1]))
    assert abs(float(plain[0]) - float(_nll(log_probs, label_mask))) > 1e-2


def test_remat_lowers_the_compiled_memory_of_a_training_step():
    """The compiler's own figure (as benchmarks/reader.py's at T5-base scale): a FiD step's
    temporaries with remat well under half of those without, for 6 + 6 narrow blocks over 8
    passages of 128 tokens (where each block's attention tensors dominate). Unrolled remat saved
    nothing here; the scanned blocks do. The policies in between keep more for less recomputation:
    the dense layers' outputs (measured 16.7 MB against 12.8 with nothing kept), every matmul's more."""
    from art_jax.models.hf import abstract_module
    from art_jax.models.t5 import T5, T5Config

    def temporaries(remat: bool, policy: str = "nothing_saveable") -> int:
        cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=6, num_decoder_layers=6,
                       num_heads=4, dropout_rate=0.1, remat=remat, remat_policy=policy)
        ids = jax.ShapeDtypeStruct((1, 8, 128), jnp.int32)
        labels = jax.ShapeDtypeStruct((1, 4), jnp.int32)
        args = (abstract_module(T5, cfg), ids, ids, labels, labels, jax.ShapeDtypeStruct((1, 8), jnp.float32),
                jax.random.key(0))
        return _training_loss_and_grads.lower(*args).compile().memory_analysis().temp_size_in_bytes

    plain, rematerialised = temporaries(False), temporaries(True)
    assert rematerialised < plain / 2, (plain, rematerialised)
    dense, dots = (temporaries(True, policy) for policy in ("dots_with_no_batch_dims_saveable", "dots_saveable"))
    # keeping every matmul (attention's [K x N]^2 scores too) can need more than no remat here: 29.7 MB, 27.5
    assert rematerialised < dense < min(dots, plain), (rematerialised, dense, dots, plain)


def test_bfloat16_compute_is_close(case):
    bf16 = load_t5(case.folder, dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    bias = passage_memory_bias(jnp.asarray(WEIGHTS), case.ids.shape[-1])
    memory16, _, ours16 = _forward(bf16, case.ids, case.mask, case.labels, bias)
    _, _, ours32 = jax.device_get(_forward(case.model, case.ids, case.mask, case.labels, bias))
    assert memory16.dtype == jnp.bfloat16 and ours16.dtype == jnp.float32
    in_answer = case.label_mask.astype(bool)
    difference = np.abs(np.asarray(ours16)[in_answer] - ours32[in_answer])
    assert 0 < np.max(difference) <= 0.05, difference
    nll, grads = _nll_and_weight_grads(bf16, case.ids, case.mask, case.labels, case.label_mask,
                                       jnp.asarray(WEIGHTS))
    _, grads32 = _nll_and_weight_grads(case.model, case.ids, case.mask, case.labels, case.label_mask,
                                       jnp.asarray(WEIGHTS))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads32[1]), atol=0.05)


def test_reads_facebook_fid_checkpoints(t5_v11_dir, tmp_path):
    """FiD's FiDT5 saves its encoder wrapped twice (encoder.encoder.block.N.module.X): such a
    folder loads as the T5 it wraps."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "fid_reader"
    shutil.copytree(t5_v11_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    wrapped = {name.replace("encoder.block.", "encoder.encoder.block.", 1).replace(".layer.", ".module.layer.", 1)
               if name.startswith("encoder.block.") else name.replace("encoder.", "encoder.encoder.", 1)
               if name.startswith("encoder.") else name: value for name, value in weights.items()}
    assert "encoder.encoder.block.0.module.layer.0.SelfAttention.q.weight" in wrapped
    save_file(wrapped, str(folder / "model.safetensors"), metadata={"format": "pt"})
    plain, fid = load_t5(t5_v11_dir), load_t5(str(folder))
    ids, mask = np.array([[5, 9, 13, 1]]), np.ones((1, 4), np.int32)
    np.testing.assert_array_equal(fid.encode(ids, mask), plain.encode(ids, mask))
    for ours, theirs in zip(jax.tree.leaves(nnx.state(fid)), jax.tree.leaves(nnx.state(plain))):
        np.testing.assert_array_equal(ours, theirs)
