#!/usr/bin/env bash
# usage: launch/local.sh N COMMAND [ARGS...]
#
# Runs `art-jax COMMAND ARGS` as N processes of one multi-controller JAX job on this machine,
# each with ART_JAX_LOCAL_DEVICES (default 2) CPU devices, talking through gloo collectives:
# the rehearsal of a multi-host run, and what the multi-process tests use. Process 0 prints
# as usual; the others' lines are prefixed with [i]. If any process fails, the rest are
# stopped and its exit status is returned.
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N COMMAND [ARGS...]   (N processes of 'art-jax COMMAND ARGS')" >&2
  exit 2
fi
processes=$1
shift
art_jax=${ART_JAX:-art-jax}
port=${ART_JAX_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
# SIGTERM first (a trainer saves a checkpoint and stops); whatever still runs after the grace
# period - a process blocked in a collective with a dead peer - is killed
stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  for ((waited = 0; waited < ${ART_JAX_KILL_AFTER:-10}; waited++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
trap stop_all INT TERM

# XLA_FLAGS may force another CPU device count (the test suite's 8): each process gets its own, and
# keeps the other flags
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
for ((i = 0; i < processes; i++)); do
  env XLA_FLAGS="$xla_flags" JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="${ART_JAX_LOCAL_DEVICES:-2}" \
    $art_jax "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$processes" --process_id="$i" \
    > >(if ((i == 0)); then cat; else sed -u "s/^/[$i] /"; fi) 2>&1 &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  finished=""
  wait -n -p finished "${running[@]}" || status=$?
  left=()
  for pid in "${running[@]}"; do [[ $pid == "$finished" ]] || left+=("$pid"); done
  running=("${left[@]}")
  if ((status != 0)); then
    echo "launch/local.sh: a process exited with status $status; stopping the others" >&2
    stop_all
    break
  fi
done
wait || true
exit "$status"
