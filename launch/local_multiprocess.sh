#!/usr/bin/env bash
# N processes of one multi-process JAX job on this machine, over 127.0.0.1 with CPU devices and
# gloo collectives: for tests, and for trying multi-host code paths without a cluster.
#
#   launch/local_multiprocess.sh 2 -- python -m fdh_jax.main --config=configs/demo.py --workdir=/tmp/mp
#
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by
# fdh_jax.parallel.initialize_distributed) and DEVICES_PER_PROCESS fake CPU devices (default 1).
# COORDINATOR_PORT picks the port (default: a free one). Output lines are prefixed `[i]`.
# A SIGTERM/SIGINT to this script is passed on to every process (a preemption notice); if a
# process fails, the others are killed and this script exits with the first failure's status.
set -uo pipefail

if [[ $# -lt 3 || "$2" != "--" ]]; then
  echo "usage: $0 NUM_PROCESSES -- COMMAND [ARGS...]" >&2
  exit 2
fi
num_processes=$1
shift 2
port=${COORDINATOR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
devices=${DEVICES_PER_PROCESS:-1}

declare -A index_of
pids=()
for ((i = 0; i < num_processes; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$num_processes" \
    JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
    "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=("$!")
  index_of[$!]=$i
done

forward() { kill -"$1" "${running[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  wait -n -p finished "${running[@]}"
  code=$?
  [[ -z "${finished:-}" ]] && continue # a trapped signal interrupted the wait
  running=("${running[@]/$finished/}")
  read -ra running <<<"${running[*]}"
  if ((code != 0 && status == 0)); then
    status=$code
    echo "local_multiprocess: process ${index_of[$finished]} exited with $code" >&2
    # The others would wait for it in the next collective: stop them now.
    ((${#running[@]} > 0)) && kill -KILL "${running[@]}" 2>/dev/null
  fi
  unset finished
done
wait # the output prefixers
exit "$status"
