"""One multi-controller JAX program across processes: ``jax.distributed.initialize`` before any
JAX computation, from explicit flags, from the cluster's environment (SLURM, TPU VM), or not at
all for a single process.

Every process then runs the same command; arrays span the devices of all of them, and
process 0 alone prints and writes metrics.
"""

from __future__ import annotations

import os
import sys
import threading

from art_jax.core.errors import UserError

# ART_JAX_DISTRIBUTED=auto asks jax to find the cluster itself (what launch/tpu_vm.sh sets:
# on a TPU VM slice the workers come from the metadata server); =off forces one process
AUTO_ENV = "ART_JAX_DISTRIBUTED"


def cluster_detected(environ=os.environ) -> bool:
    """True inside a multi-process SLURM step or a multi-host TPU slice."""
    if environ.get(AUTO_ENV) == "auto":
        return True
    if environ.get(AUTO_ENV) == "off":
        return False
    slurm = all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"))
    if slurm and int(environ.get("SLURM_NTASKS", environ.get("SLURM_STEP_NUM_TASKS", "1"))) > 1:
        return True
    return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> bool:
    """Joins this process to the job, and says whether there is one. Explicit arguments win;
    without them a detected cluster is joined through jax's own detection; otherwise nothing
    happens (one process).

    An unreachable coordinator or processes that disagree on the job's size end in a
    ``UserError`` after ``timeout_s`` instead of a hang."""
    explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
                "--process_id": process_id}
    given = [name for name, value in explicit.items() if value is not None]
    if given and len(given) < 3:
        missing = sorted(set(explicit) - set(given))
        raise UserError(f"{', '.join(given)} given without {', '.join(missing)}: a multi-process job needs all three")
    if not given and not cluster_detected():
        return False
    if given:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
        if num_processes == 1:
            return False
    import jax

    # CPU processes talk through gloo (the local rehearsal); GPU/TPU backends ignore this
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = coordinator_address or "the coordinator found in the cluster environment"
    problem = (f"jax.distributed could not start within {timeout_s}s (coordinator {where}, "
               f"--num_processes={num_processes}, --process_id={process_id}): is the coordinator reachable from "
               "every process, are all processes started, and do they give the same --num_processes?")
    # jax aborts the whole process from C++ when registration times out; a watchdog that fires
    # first turns that into this one message and exit status 2
    watchdog = threading.Timer(timeout_s, _give_up, args=(problem,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s + 30)
    except Exception as err:  # noqa: BLE001 - jax raises RuntimeError/XlaRuntimeError/ValueError
        raise UserError(f"{problem} ({err})") from None
    finally:
        watchdog.cancel()
    # the coordinator's count wins silently in jax; a process that expected another is misconfigured
    if num_processes is not None and jax.process_count() != num_processes:
        raise UserError(f"--num_processes={num_processes}, but the coordinator at {where} runs a job of "
                        f"{jax.process_count()} processes: give every process the same --num_processes")
    return True


def is_lead() -> bool:
    """Process 0: the one that writes shared files, prints and logs."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for in one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def lead_value(value: int | None) -> int | None:
    """Process 0's ``value`` (a non-negative int, a bool or None) on every process: for decisions
    that must be the same everywhere but come from what each process sees (a shared filesystem)."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    agreed = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if value is None else value)))
    return None if agreed < 0 else agreed


def lead_floats(values: dict[str, float]) -> dict[str, float]:
    """Process 0's metric values on every process (the same names on all): decisions taken
    from them (the best checkpoint, a collective save) must not depend on one host's rounding."""
    import jax

    if jax.process_count() == 1 or not values:
        return values
    import numpy as np
    from jax.experimental import multihost_utils

    names = sorted(values)
    agreed = multihost_utils.broadcast_one_to_all(np.asarray([values[n] for n in names], np.float64))
    return {name: float(value) for name, value in zip(names, np.asarray(agreed))}


def any_process(flag: bool) -> bool:
    """True on every process when it is true on any (a signal that reached some processes)."""
    import jax

    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.int32(flag)).max())


def process_share(count: int) -> range:
    """This process's contiguous share of ``count`` items (the first ``count % processes`` get one more)."""
    import jax

    processes, index = jax.process_count(), jax.process_index()
    size, extra = divmod(count, processes)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def process_sum(values):
    """The elementwise sum of the float32 array ``values`` over every process, on every process."""
    import jax
    import numpy as np

    values = np.asarray(values, np.float32)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).sum(0)


def _give_up(problem: str) -> None:
    print(f"art-jax: error: {problem}", file=sys.stderr, flush=True)
    os._exit(2)  # the main thread is blocked inside jax; nothing else would end it cleanly
