"""Model FLOPs for MFU: the matrix products of a function's jaxpr, counted the same on every backend.

XLA's own count of a compiled GPU program leaves out the products it hands to cuBLAS or Triton
(their custom calls count as zero: a T0-3B forward read as 1% MFU on an H200), and an HLO
while loop (a ``lax.scan``) counts its body once. Counting ``dot_general`` in the jaxpr, with
each scan's body times its length, gives the model's FLOPs (2 per multiply-add), as MFU means
them; elementwise work is left out, as it is in the papers' MFU. A ``while_loop`` (its trip
count unknown to the jaxpr) or a ``shard_map`` (its body one device's share) is refused rather
than undercounted: the train steps and the teacher forward measured have neither.
"""

from __future__ import annotations

import math

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr


def matmul_flops(fn, *args, **kwargs) -> float:
    """FLOPs of every matrix product ``fn(*args, **kwargs)`` runs (traced, not run)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
            continue
        if eqn.primitive.name in ("while", "shard_map"):
            raise ValueError(f"matmul_flops: a {eqn.primitive.name} would be undercounted")
        inner = [_jaxpr_flops(sub) for sub in _subjaxprs(eqn.params)]
        if eqn.primitive.name == "cond":
            total += max(inner, default=0.0)  # one branch runs
        else:
            total += sum(inner) * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else sum(inner)
    return total


def _subjaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item


def rate_line(flop_rate: float, peak_tflops: float | None) -> str:
    """``flop_rate`` (FLOP/s) in TFLOP/s, with its MFU against ``peak_tflops`` when given."""
    return f"{flop_rate / 1e12:.3g} TFLOP/s" + (
        f", MFU {flop_rate / (peak_tflops * 1e12):.1%} of {peak_tflops:g} TFLOP/s" if peak_tflops else "")
