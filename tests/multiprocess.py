"""Running a job as 2 real processes x 2 CPU devices (jax.distributed on localhost)."""

import os
import re
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite's models are tiny: compiling is most of a test's time. LLVM's optimisation passes were most
# of it (tests/test_train_step.py: 179 s -> 114 s without them), then XLA:CPU's fusion emitters (a 4-step
# training test: 44 s -> 34 s with the elemental emitters). The computation is the same but for float
# rounding where the two emitters fuse differently: one program run twice still gives bitwise the same.
COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def child_env(devices: int | None = None, *, compile_fast: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a process the suite starts: the suite's XLA flags but its 8 devices (JAX's
    ``devices`` CPU devices, else one), without ``COMPILE_FAST`` for a run that times or learns
    (a demo runs as on a fresh machine), and ``extra``."""
    env = dict(os.environ, **extra)
    flags = _DEVICE_COUNT.sub("", env.pop("XLA_FLAGS", ""))
    if not compile_fast:
        flags = flags.replace(COMPILE_FAST, "")
    if flags.strip():
        env["XLA_FLAGS"] = " ".join(flags.split())
    if devices:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(job: str, *args: str) -> None:
    """Runs ``tests/multiprocess_worker.py JOB ARGS`` as processes 0 and 1; ``{i}`` in an
    argument becomes the process id. Fails with the workers' output if either fails."""
    port = str(_free_port())
    env = child_env()  # 2 devices each (tests.multiprocess_worker), not 8
    workers = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", port, str(i), job,
                                 *(a.replace("{i}", str(i)) for a in args)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for i, (w, output) in enumerate(zip(workers, outputs)):
        assert w.returncode == 0, f"process {i} failed:\n{output}"


LOCAL = os.path.join(ROOT, "launch", "local.sh")


def art_jax_job(*args: str, devices: int, processes: int = 1, check: bool = True, timeout: int = 600,
                compile_fast: bool = True) -> subprocess.CompletedProcess:
    """`art-jax ARGS` as one process with ``devices`` CPU devices, or through launch/local.sh as
    ``processes`` processes with ``devices`` each (``compile_fast``: as ``child_env``); returns the
    completed process (with ``check``, one that succeeded)."""
    # the suite's 8 devices are not theirs
    env = child_env(devices if processes == 1 else None, compile_fast=compile_fast)
    if processes == 1:
        command = [sys.executable, "-m", "art_jax", *args]
    else:
        command = [LOCAL, str(processes), *args]
        env.update(ART_JAX=f"{sys.executable} -m art_jax", ART_JAX_LOCAL_DEVICES=str(devices))
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done
