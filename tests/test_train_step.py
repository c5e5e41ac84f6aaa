"""The ART objective and update: numpy KL, gradients into both towers only, frozen towers,
non-finite steps skipped, gradient accumulation, the learning-rate schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.sharding import make_mesh
from art_jax.methods import art
from art_jax.methods.art import unique_passages
from art_jax.models.bert import Bert, BertConfig
from art_jax.models.hf import init_module
from art_jax.objectives import art_loss
from art_jax.training.state import OptimConfig, ParamGroups, init_state, learning_rate_schedule, make_optimizer
from art_jax.training.update import jit_update, update


def _numpy_kl(q, p, teacher, m=1.0):
    def log_softmax(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    scores = np.einsum("bh,bkh->bk", q.astype(np.float64), p.astype(np.float64)) / (m * np.sqrt(q.shape[-1]))
    log_s, log_t = log_softmax(scores), log_softmax(teacher.astype(np.float64))
    return np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=1))


@pytest.mark.parametrize("m", [1.0, 0.5])
def test_art_loss_equals_numpy_kl(m):
    rng = np.random.default_rng(0)
    q, p = rng.standard_normal((6, 16)), rng.standard_normal((6, 8, 16))
    teacher = rng.standard_normal((6, 8)) * 3
    loss, metrics = art_loss(jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32), jnp.asarray(teacher), m)
    np.testing.assert_allclose(float(loss), _numpy_kl(q, p, teacher, m), rtol=1e-5)
    t = np.exp(teacher - teacher.max(1, keepdims=True))
    t /= t.sum(1, keepdims=True)
    np.testing.assert_allclose(float(metrics["teacher_entropy"]), -np.mean(np.sum(t * np.log(t), 1)), rtol=1e-5)
    # the KL is zero exactly when the student matches the teacher
    same, _ = art_loss(jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32),
                       jnp.einsum("bh,bkh->bk", q, p) / (m * 4.0), m)
    assert abs(float(same)) < 1e-5


def _towers(shared=False):
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                     max_position_embeddings=32)
    question = init_module(Bert, cfg, seed=0)
    passage = question if shared else init_module(Bert, cfg, seed=1)
    return ParamGroups.split({"question": question, "passage": passage})


def _batch(b=4, k=3, lq=6, lp=8, seed=0):
    """Every (question, slot) its own random passage: passage_index = arange(B x K), one micro-batch."""
    rng = np.random.default_rng(seed)
    return {"question_ids": jnp.asarray(rng.integers(5, 50, (b, lq)), jnp.int32),
            "question_mask": jnp.ones((b, lq), jnp.int32),
            "passage_ids": jnp.asarray(rng.integers(5, 50, (1, b * k, lp)), jnp.int32),
            "passage_mask": jnp.asarray(np.arange(lp)[None, None] < rng.integers(3, lp + 1, (1, b * k, 1)), jnp.int32),
            "passage_index": jnp.arange(b * k, dtype=jnp.int32).reshape(b, k),
            "teacher_scores": jnp.asarray(rng.standard_normal((b, k)) * 2, jnp.float32)}


def _setup(**optim):
    towers, params = _towers()
    cfg = OptimConfig(learning_rate=1e-2, total_steps=10, **optim)
    optimizer = make_optimizer(cfg, towers, params)
    step = jax.jit(lambda s, b: update(art.objective(towers, **_setup.kwargs), optimizer, learning_rate_schedule(cfg),
                                       s, b))
    return init_state(params, optimizer, seed=0), step


_setup.kwargs = {}


def _changed(before, after):
    return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_both_towers_learn_and_the_loss_falls():
    state, step = _setup()
    batch = _batch()
    first = state.params
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert _changed(first["question"], state.params["question"]) and _changed(first["passage"], state.params["passage"])
    assert losses[-1] < losses[0]
    assert int(state.step) == 5 and int(state.skipped) == 0


def test_no_gradient_reaches_the_teacher_scores():
    towers, params = _towers()
    batch = jax.tree.map(lambda x: x[0] if x.ndim == 3 else x, _batch())  # one micro-batch: [U, Lp]
    keys = jax.random.split(jax.random.key(0))
    grad = jax.grad(lambda t: art.loss(towers, 1.0, True, params, {**batch, "teacher_scores": t}, tuple(keys))[0])(
        batch["teacher_scores"])
    assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("frozen", ["question", "passage"])
def test_a_frozen_tower_stays_fixed(frozen):
    state, step = _setup(frozen_roles=(frozen,))
    before = state.params
    for _ in range(2):  # the first step has learning rate 0 (warmup starts there)
        state, _ = step(state, _batch())
    other = "passage" if frozen == "question" else "question"
    assert not _changed(before[frozen], state.params[frozen]) and _changed(before[other], state.params[other])


def test_a_non_finite_step_is_skipped_and_counted():
    state, step = _setup()
    before = state
    bad = {**_batch(), "teacher_scores": jnp.full((4, 3), jnp.nan)}
    state, metrics = step(state, bad)
    assert int(state.skipped) == 1 and int(state.step) == 1
    assert not _changed(before.params, state.params) and not _changed(before.opt_state, state.opt_state)
    for _ in range(2):  # training goes on
        state, _ = step(state, _batch())
    assert int(state.skipped) == 1 and int(state.step) == 3 and _changed(before.params, state.params)


def _towers_without_dropout():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                     max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
    return ParamGroups.split({"question": init_module(Bert, cfg, seed=0), "passage": init_module(Bert, cfg, seed=1)})


def _retrieved(b=8, k=4, n=10, lp=8, seed=0):
    """A corpus of ``n`` random passages and [B, K] retrieved rows with many repeats."""
    rng = np.random.default_rng(seed)
    corpus = rng.integers(5, 50, (n, lp)).astype(np.int32)
    corpus_mask = (np.arange(lp)[None] < rng.integers(3, lp + 1, (n, 1))).astype(np.int32)
    rows = np.stack([rng.choice(n, k, replace=False) for _ in range(b)])
    return corpus, corpus_mask, rows, {"question_ids": rng.integers(5, 50, (b, 6)).astype(np.int32),
                                       "question_mask": np.ones((b, 6), np.int32),
                                       "teacher_scores": (rng.standard_normal((b, k)) * 2).astype(np.float32)}


def _deduped_batch(corpus, corpus_mask, rows, questions, accumulation, multiple=8):
    unique_rows, positions = unique_passages(rows, accumulation, multiple)
    return {**questions, "passage_ids": corpus[unique_rows], "passage_mask": corpus_mask[unique_rows],
            "passage_index": positions}


def test_unique_passages_point_back_at_the_retrieved_rows():
    rows = np.array([[3, 1, 4], [1, 5, 9], [2, 6, 5], [3, 5, 8]])
    for accumulation in (1, 2, 4):
        unique_rows, positions = unique_passages(rows, accumulation, multiple=4)
        assert unique_rows.shape[0] == accumulation and unique_rows.shape[1] % 4 == 0
        for i in range(rows.shape[0]):  # every question finds its own rows in its micro-batch's list
            np.testing.assert_array_equal(unique_rows[i % accumulation][positions[i]], rows[i])
        assert len(set(unique_rows[0].tolist())) == len(set(rows[::accumulation].ravel().tolist()))


def test_deduplicated_passages_and_accumulation_give_the_direct_gradient():
    """Without dropout: the update from each micro-batch's unique passages (A = 1 and 2)
    steps by the gradient of the loss with every (question, slot) embedded on its own
    (plain SGD with rate 1, so the parameter change is minus the gradient)."""
    towers, params = _towers_without_dropout()
    corpus, corpus_mask, rows, questions = _retrieved()
    b, k = rows.shape

    def direct_loss(p):  # the recipe's computation, straight: B x K passages embedded one by one
        q = towers.module(p, "question").embed_cls(questions["question_ids"], questions["question_mask"])
        d = towers.module(p, "passage").embed_cls(corpus[rows.ravel()], corpus_mask[rows.ravel()])
        return art_loss(q, d.reshape(b, k, -1), questions["teacher_scores"])[0]

    direct = jax.grad(direct_loss)(params)
    optimizer = optax.sgd(1.0)
    for accumulation in (1, 2):
        batch = _deduped_batch(corpus, corpus_mask, rows, questions, accumulation, multiple=2)
        assert batch["passage_ids"].shape[1] < b * k // accumulation  # repeats were embedded once
        state = init_state(params, optimizer, 0)
        new, metrics = jax.jit(lambda s, x: update(art.objective(towers, accumulation=accumulation), optimizer,
                                                   optax.constant_schedule(1.0), s, x))(state, batch)
        np.testing.assert_allclose(float(metrics["loss"]), float(direct_loss(params)), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(direct)), rtol=1e-4)
        # float32 sums in another order: differences of a few ulps on gradients of order 1
        for got, old, grad in zip(jax.tree.leaves(new.params), jax.tree.leaves(params), jax.tree.leaves(direct)):
            np.testing.assert_allclose(np.asarray(old) - np.asarray(got), grad, rtol=1e-5, atol=1e-5)


def test_schedule_warms_up_then_decays_to_zero():
    schedule = learning_rate_schedule(OptimConfig(learning_rate=2e-5, total_steps=1000, warmup_fraction=0.01))
    assert float(schedule(0)) == 0 and float(schedule(10)) == pytest.approx(2e-5)
    assert float(schedule(505)) == pytest.approx(1e-5, rel=1e-3) and float(schedule(1000)) == pytest.approx(0, abs=1e-12)


def test_weight_decay_skips_biases_and_layer_norm():
    towers, params = _towers()
    cfg = OptimConfig(learning_rate=1.0, total_steps=10, warmup_fraction=0.0, weight_decay=0.5, clip_norm=1e9)
    optimizer = make_optimizer(cfg, towers, params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)  # zero gradient: only decay moves
    for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params)):
        moved = bool(np.any(np.asarray(u) != 0))
        assert moved == (p.ndim >= 2), (jax.tree_util.keystr(path), p.shape)


def _jit_update_like_the_trainer(towers, optimizer, schedule, mesh, accumulation):
    """The Trainer's compiled update (``jit_update``), given a private copy of the state on
    every call: donation deletes the state it is given, and device_put may hand back (or
    alias) the caller's own buffers, which the next call still needs."""
    batch_sharding = art.batch_shardings(mesh)
    step = jit_update(art.objective(towers, accumulation=accumulation), optimizer, schedule, mesh, batch_sharding)
    replicated = NamedSharding(mesh, P())
    return lambda state, batch: step(jax.device_put(jax.tree.map(np.array, jax.device_get(state)), replicated),
                                     jax.device_put(batch, batch_sharding))


def _adam(state) -> optax.ScaleByAdamState:
    (adam,) = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(x, optax.ScaleByAdamState)]
    return adam


@pytest.mark.parametrize("accumulation", [1, 2])
def test_eight_devices_give_the_single_device_step(accumulation):
    """Data parallel over 8 devices changes only the order of float32 sums: loss, gradients
    and the AdamW-updated state equal one device's for the same global batch, dropout on.
    Dropout masks come from the state's key: JAX's random bits are a function of the key and
    the global shape, not of the sharding (with the partitionable threefry, the default, each
    device also draws only its own shard's bits; the other mode gives other, equally
    sharding-independent bits, and passes this test too)."""
    towers, params = _towers()  # dropout 0.1 in both towers
    cfg = OptimConfig(learning_rate=1e-2, total_steps=10)
    optimizer, schedule = make_optimizer(cfg, towers, params), learning_rate_schedule(cfg)
    corpus, corpus_mask, rows, questions = _retrieved(b=16, k=4, n=24)
    batch = _deduped_batch(corpus, corpus_mask, rows, questions, accumulation, multiple=8)  # U splits over 8
    one = _jit_update_like_the_trainer(towers, optimizer, schedule, make_mesh(devices=jax.devices()[:1]),
                                       accumulation)
    eight = _jit_update_like_the_trainer(towers, optimizer, schedule, make_mesh(), accumulation)
    assert make_mesh().shape["data"] == 8

    state = init_state(params, optimizer, seed=0)
    for _ in range(2):  # steps 0 and 1, each from the same state: the second's AdamW has moments to read
        single, single_metrics = one(state, batch)
        sharded, sharded_metrics = eight(state, batch)
        assert all(len(x.devices()) == 8 for x in jax.tree.leaves(sharded))  # it did run on the 8-device mesh
        # float32 partial sums over 8 shards added in another order: ~1e-7 relative apart
        # (measured), so 1e-5 leaves room; other dropout masks move the loss by ~5e-2 (below),
        # a wrong reduction (one shard's gradient, a sum instead of a mean) by far more
        for name in ("loss", "grad_norm", "student_entropy", "argmax_agreement"):
            np.testing.assert_allclose(float(sharded_metrics[name]), float(single_metrics[name]),
                                       rtol=1e-5, atol=1e-6, err_msg=name)
        single, sharded = jax.device_get(single), jax.device_get(sharded)
        assert int(sharded.step) == int(single.step) and int(sharded.skipped) == int(single.skipped) == 0
        np.testing.assert_array_equal(sharded.rng, single.rng)

        # gradients, through AdamW's moments: mu and nu are running means of the clipped gradient
        # and its square. The rounding of a sum is relative to its terms, not to the result, so
        # the absolute tolerance follows the largest gradient: a gradient that is zero in exact
        # arithmetic (softmax ignores key biases; the KL ignores a shift shared by all passage
        # embeddings, the passage tower's last LayerNorm bias) is ~1e-9 of noise in both
        a_adam, b_adam = _adam(single), _adam(sharded)
        for moment in ("mu", "nu"):
            a_flat = jax.tree_util.tree_leaves_with_path(getattr(a_adam, moment))
            largest = max(np.abs(x).max() for _, x in a_flat)
            for (path, a), b in zip(a_flat, jax.tree.leaves(getattr(b_adam, moment))):
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * largest,
                                           err_msg=f"{moment}{jax.tree_util.keystr(path)}")

        # updated params. AdamW steps by lr x m / (sqrt(v) + eps), eps = 1e-8: where the gradient
        # is that noise, or a true gradient not far above it (0 < sqrt(v) < 3 eps), it turns the
        # rounding into an arbitrary step of up to a few lr, different on each mesh (5e-4 here
        # on the passage LayerNorm bias; the loss does not depend on it). Those elements (~1%)
        # are held only to Adam's bound, (1 - b1) / sqrt(1 - b2) = 3.2 lr per step on each side;
        # every other element, exact-zero gradients included, to 1e-5
        lr = float(single_metrics["learning_rate"])
        bias_correction = 1 - 0.999 ** int(a_adam.count)
        noisy_count = 0
        for (path, a), b, nu_a, nu_b in zip(jax.tree_util.tree_leaves_with_path(single.params),
                                            jax.tree.leaves(sharded.params), jax.tree.leaves(a_adam.nu),
                                            jax.tree.leaves(b_adam.nu)):
            scale = np.sqrt(np.maximum(nu_a, nu_b) / bias_correction)
            noisy = (scale > 0) & (scale < 3e-8)
            noisy_count += noisy.sum()
            np.testing.assert_allclose(np.asarray(b)[~noisy], np.asarray(a)[~noisy], rtol=1e-5, atol=1e-6,
                                       err_msg=jax.tree_util.keystr(path))
            assert np.all(np.abs(np.asarray(b) - a)[noisy] <= 2 * 3.2 * lr * 1.01), jax.tree_util.keystr(path)
        assert noisy_count < 0.02 * sum(x.size for x in jax.tree.leaves(params))  # the exemption stays narrow
        assert _changed(state.params, single.params)
        state = single

    # dropout was on: the same step with another seed's masks gives another loss (by 0.04-0.1)
    _, other_metrics = one(init_state(params, optimizer, seed=1), batch)
    _, first_metrics = one(init_state(params, optimizer, seed=0), batch)
    assert abs(float(other_metrics["loss"]) - float(first_metrics["loss"])) > 1e-4


def test_the_logged_learning_rate_is_the_one_applied():
    """optax's step count skips a non-finite step, so the schedule's next rate is applied at
    the step after it: the log must show that rate, not the one at the step's number."""
    state, step = _setup(warmup_fraction=0.5)  # a rate that changes every step
    schedule = learning_rate_schedule(OptimConfig(learning_rate=1e-2, total_steps=10, warmup_fraction=0.5))
    state, _ = step(state, _batch())
    state, _ = step(state, {**_batch(), "teacher_scores": jnp.full((4, 3), jnp.nan)})  # skipped
    count = int(_adam(state).count)
    assert (int(state.step), count) == (2, 1)
    state, metrics = step(state, _batch())
    assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(count)))
    assert float(metrics["learning_rate"]) != pytest.approx(float(schedule(2)))


def test_a_method_may_bring_its_own_gradient_scheme():
    """The update takes a method's own way to the gradients (``Objective.gradients``): here a
    two-pass cached-gradient scheme (GradCache: representations without gradient, the loss's
    gradient with respect to them, then each chunk's backward pass) for an in-batch contrastive
    loss, which plain micro-batch accumulation cannot split. Same step as the direct gradient."""
    from art_jax.training.update import Objective

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}
    batch = {"questions": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
             "passages": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)}

    def contrastive(q, p):  # each question's own passage among all of the batch's
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(q @ p.T, axis=-1))), {}

    def loss(params, batch, keys):
        return contrastive(batch["questions"] @ params["w"], batch["passages"] @ params["w"])

    def cached(params, batch, keys, chunks=4):
        encode = lambda p, x: x @ p["w"]  # noqa: E731
        q, d = (jnp.concatenate([encode(params, x) for x in jnp.split(batch[name], chunks)])
                for name in ("questions", "passages"))
        (value, metrics), (dq, dd) = jax.value_and_grad(contrastive, argnums=(0, 1), has_aux=True)(q, d)
        grads = jax.tree.map(jnp.zeros_like, params)
        for name, cotangent in (("questions", dq), ("passages", dd)):
            for x, c in zip(jnp.split(batch[name], chunks), jnp.split(cotangent, chunks)):
                _, vjp = jax.vjp(lambda p: encode(p, x), params)  # noqa: B023
                grads = jax.tree.map(jnp.add, grads, vjp(c)[0])
        return (value, metrics), grads

    optimizer, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    state = init_state(params, optimizer, seed=0)
    plain, plain_metrics = jax.jit(lambda s, b: update(Objective(loss), optimizer, schedule, s, b))(state, batch)
    mine, my_metrics = jax.jit(lambda s, b: update(Objective(loss, gradients=cached), optimizer, schedule, s, b))(
        state, batch)
    np.testing.assert_allclose(float(my_metrics["loss"]), float(plain_metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mine.params["w"]), np.asarray(plain.params["w"]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(mine.params["w"]), np.asarray(params["w"]))  # it did step
