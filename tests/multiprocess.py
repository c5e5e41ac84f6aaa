"""Running a job as 2 real processes x 2 CPU devices (jax.distributed on localhost)."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(job: str, *args: str) -> None:
    """Runs ``tests/multiprocess_worker.py JOB ARGS`` as processes 0 and 1; ``{i}`` in an
    argument becomes the process id. Fails with the workers' output if either fails."""
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 2 devices each, not 8
    workers = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", port, str(i), job,
                                 *(a.replace("{i}", str(i)) for a in args)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for i, (w, output) in enumerate(zip(workers, outputs)):
        assert w.returncode == 0, f"process {i} failed:\n{output}"
