"""One CPU budget for both sides of a benchmark. ``--threads N``: the process keeps its first N CPUs
(set as its affinity before jax starts its CPU client, since XLA:CPU sizes its thread pool by the
affinity) and torch gets N threads; without it, both take every CPU the process may use."""

from __future__ import annotations

import argparse
import os


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="CPUs for both sides (the process's affinity and torch's "
                        "threads; default: every CPU it may use)")


def pin_cpus(threads: int | None) -> int:
    """Keeps the process on its first ``threads`` CPUs (all when None); call before jax starts.
    Returns the CPUs both sides use: what torch.set_num_threads takes."""
    if threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    return len(os.sched_getaffinity(0))
