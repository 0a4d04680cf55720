#!/usr/bin/env bash
# Runs N trainer processes on this machine, joined through a JAX coordinator on 127.0.0.1: the same multi-host
# code path as a TPU pod (per-host data shards, global arrays, collective checkpoints, preemption sync), on CPU.
#
#   bash launch/local_multiprocess.sh [options] N -- <train args>
#   bash launch/local_multiprocess.sh 2 --cpu-devices 4 -- --config=configs/stage1.py:tiny --workdir=runs/mp \
#       --config.data.dir=data/slices
#
# Options (before or after N, all before --):
#   --cpu-devices D   fake CPU devices per process (default 1; N*D devices in the global mesh)
#   --port P          coordinator port (default: a free port)
#   --module M        Python module to run (default flexict_jax.train)
#   --log-dir DIR     also write each process's output to DIR/process_<i>.log
#   --dry-run         print the per-process environment and command, start nothing
#   -h, --help        this text
#
# Each process gets FLEXICT_COORDINATOR=127.0.0.1:P, FLEXICT_NUM_PROCESSES=N, FLEXICT_PROCESS_ID=i (read by
# flexict_jax/distributed.py), JAX_PLATFORMS=cpu and its own device count. Output lines are prefixed "[i] ".
# SIGTERM/SIGINT to this script is forwarded to every process (they save the same step and exit 0). If a
# process fails, the others are stopped, since collectives would wait for it forever. The exit code is the
# first non-zero exit code among the processes, else 0. Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "local_multiprocess.sh: $*" >&2; exit 2; }

num_processes="" cpu_devices=1 port="" module="flexict_jax.train" log_dir="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cpu-devices) cpu_devices="${2:?--cpu-devices needs a value}"; shift 2 ;;
    --cpu-devices=*) cpu_devices="${1#*=}"; shift ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --module) module="${2:?--module needs a value}"; shift 2 ;;
    --module=*) module="${1#*=}"; shift ;;
    --log-dir) log_dir="${2:?--log-dir needs a value}"; shift 2 ;;
    --log-dir=*) log_dir="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$num_processes" ]] || die "unexpected argument $1: put the trainer's arguments after --"
       num_processes="$1"; shift ;;
  esac
done
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "N (the number of processes) must be a positive integer, got '${num_processes}'"
[[ "$cpu_devices" =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices must be a positive integer, got '$cpu_devices'"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

# Later XLA flags override earlier ones, so appending keeps the caller's other flags.
xla_flags="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$cpu_devices"
process_env() {
  printf '%s\n' "FLEXICT_COORDINATOR=127.0.0.1:$port" "FLEXICT_NUM_PROCESSES=$num_processes" \
    "FLEXICT_PROCESS_ID=$1" "JAX_PLATFORMS=cpu" "XLA_FLAGS=${xla_flags# }" "PYTHONUNBUFFERED=1"
}

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    mapfile -t env_vars < <(process_env "$i")
    printf 'cd %q && env' "$repo"
    printf ' %q' "${env_vars[@]}" "$python" -m "$module" "$@"
    printf '\n'
  done
  exit 0
fi

[[ -z "$log_dir" ]] || mkdir -p "$log_dir"
pids=()
stop_all() {  # $1: signal
  local pid
  for pid in "${pids[@]}"; do kill -"$1" "$pid" 2>/dev/null || true; done
}
trap 'echo "local_multiprocess.sh: forwarding SIGTERM to ${#pids[@]} processes" >&2; stop_all TERM' TERM
trap 'echo "local_multiprocess.sh: forwarding SIGINT as SIGTERM" >&2; stop_all TERM' INT

cd "$repo"
for ((i = 0; i < num_processes; i++)); do
  mapfile -t env_vars < <(process_env "$i")
  if [[ -n "$log_dir" ]]; then
    env "${env_vars[@]}" "$python" -m "$module" "$@" \
      > >(tee "$log_dir/process_$i.log" | sed -u "s/^/[$i] /") 2>&1 &
  else
    env "${env_vars[@]}" "$python" -m "$module" "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  fi
  pids+=("$!")
  echo "local_multiprocess.sh: process $i of $num_processes: pid $! (coordinator 127.0.0.1:$port)"
done

exit_code=0 killer=""
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished=""
  # `wait -n` also returns (status > 128, no pid) when a trapped signal arrives; then just wait again.
  if wait -n -p finished "${running[@]}"; then status=0; else status=$?; fi
  [[ -n "${finished:-}" ]] || continue
  for i in "${!pids[@]}"; do [[ "${pids[$i]}" == "$finished" ]] && index=$i; done
  for i in "${!running[@]}"; do [[ "${running[$i]}" == "$finished" ]] && unset 'running[i]'; done
  running=("${running[@]}")
  if ((status != 0)); then
    echo "local_multiprocess.sh: process $index (pid $finished) exited with status $status" >&2
    if ((exit_code == 0)); then
      exit_code=$status
      stop_all TERM
      # A process blocked in a collective with the failed one never reaches its SIGTERM check.
      (
        trap 'kill "$sleeper" 2> /dev/null; exit 0' TERM
        sleep 60 & sleeper=$!
        wait "$sleeper"
        stop_all KILL
      ) > /dev/null 2>&1 &
      killer=$!
    fi
  fi
done
[[ -z "$killer" ]] || kill "$killer" 2>/dev/null || true
wait  # the output filters
exit "$exit_code"
