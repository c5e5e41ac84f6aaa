"""benchmarks/flops.py's model FLOPs (the matrix products of a jaxpr) against XLA's own count
on the CPU, where XLA counts every product, and against hand counts of loops and branches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.flops import matmul_flops


def xla_flops(fn, *args) -> float:
    """HLO cost analysis of the program as lowered (before XLA simplifies it)."""
    return jax.jit(fn).lower(*args).cost_analysis()["flops"]


def test_products_count_as_xla_counts_them_on_the_cpu():
    rng = np.random.default_rng(0)
    x, w, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 6, 8), (8, 5), (4, 5, 6)))

    def products(x, w, v):  # a batched matmul, a plain one and a contraction over two axes
        y = jnp.einsum("bsd,de->bse", x, w)
        return y, jnp.einsum("bse,bes->b", y, v), x.reshape(-1, 8) @ w

    assert matmul_flops(products, x, w, v) == xla_flops(products, x, w, v) == 2 * (4 * 6 * 8 * 5 * 2 + 4 * 5 * 6)


def test_a_scan_counts_its_body_once_per_step_and_a_cond_its_larger_branch():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
    one = 2 * 8 * 16 * 16

    def loop(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0].sum()

    assert matmul_flops(loop, x, w) == 5 * one
    assert matmul_flops(jax.grad(loop, argnums=1), x, w) == 3 * 5 * one  # forward, and two products back
    assert matmul_flops(lambda x: jax.lax.cond(x.sum() > 0, lambda: x @ w @ w, lambda: x @ w), x) == 2 * one
    assert matmul_flops(jax.jit(jax.checkpoint(lambda x: x @ w)), x) == one
    with pytest.raises(ValueError, match="while would be undercounted"):
        matmul_flops(lambda x: jax.lax.while_loop(lambda c: c.sum() < 1e9, lambda c: c @ w, x), x)


T5_SHAPES = dict(model_type="t5", vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
PAIRS = [jax.ShapeDtypeStruct(s, jnp.int32) for s in ((4, 32), (4, 32), (4, 8), (4, 8))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_t5_teacher_forward_is_counted_whole(dtype):
    """XLA:CPU counts the products too, plus the elementwise work: the two agree to a few percent."""
    from art_jax.models.shapes import abstract_t5
    from art_jax.teachers.t5 import teacher_scores

    model = abstract_t5(T5_SHAPES, dtype=dtype, param_dtype=dtype)
    ours, xla = matmul_flops(teacher_scores, model, *PAIRS), xla_flops(teacher_scores, model, *PAIRS)
    assert 0.95 * xla < ours <= xla


def test_a_t5_gradient_counts_its_backward_products_and_remat_its_recomputation():
    """The gradient through the models' own dense layers (a custom VJP) is about three forwards,
    as XLA counts it; under remat the recomputed forward adds one more (what MFU leaves out)."""
    from flax import nnx

    from art_jax.models.shapes import abstract_t5
    from art_jax.teachers.t5 import teacher_scores

    def gradient(model):  # (the scores' sum's gradient in the parameters, its arguments)
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        return jax.grad(lambda p, *pairs: teacher_scores(nnx.merge(graph, p, rest), *pairs).sum()), params, *PAIRS

    plain, remat = (abstract_t5({**T5_SHAPES, "num_layers": 4}, remat=on) for on in (False, True))
    forward = matmul_flops(teacher_scores, plain, *PAIRS)
    backward, recomputed = matmul_flops(*gradient(plain)), matmul_flops(*gradient(remat))
    assert 0.95 * xla_flops(*gradient(plain)) < backward <= xla_flops(*gradient(plain))
    assert 2.9 * forward < backward < 3.1 * forward
    assert backward < recomputed < backward + forward
