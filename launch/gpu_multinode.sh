#!/usr/bin/env bash
# Multi-node GPU training under SLURM: run as one task per node; each task sees all GPUs of its node and
# joins the JAX cluster through a coordinator on the job's first node.
#
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 bash launch/gpu_multinode.sh -- \
#       --config=configs/stage1.py --workdir=/shared/runs/stage1 --config.data.dir=/shared/slices
#
# Options (before --):
#   --coordinator-port P   port on the first node (default $FLEXICT_COORDINATOR_PORT, else 29500 + the
#                          job id modulo 1000, so two jobs sharing a first node do not collide)
#   --module M             Python module to run (default flexict_jax.train)
#   --dry-run              print the environment mapping and the command, start nothing
#   -h, --help             this text
#
# SLURM → flexict_jax/distributed.py: SLURM_PROCID → FLEXICT_PROCESS_ID, SLURM_NTASKS → FLEXICT_NUM_PROCESSES,
# first host of SLURM_JOB_NODELIST (`scontrol show hostnames`, or parsed here when scontrol is absent) →
# FLEXICT_COORDINATOR=host:port. The trainer's SIGTERM handling (scancel, preemption) makes every process save
# the same step and exit 0. Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }

port="${FLEXICT_COORDINATOR_PORT:-}" module="flexict_jax.train" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --coordinator-port) port="${2:?--coordinator-port needs a value}"; shift 2 ;;
    --coordinator-port=*) port="${1#*=}"; shift ;;
    --module) module="${2:?--module needs a value}"; shift 2 ;;
    --module=*) module="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown argument $1: put the trainer's arguments after --" ;;
  esac
done

for var in SLURM_PROCID SLURM_NTASKS SLURM_JOB_NODELIST; do
  [[ -n "${!var:-}" ]] || die "$var is not set: run this under srun (one task per node)"
done
[[ -n "$port" ]] || port=$((29500 + ${SLURM_JOB_ID:-0} % 1000))
[[ "$port" =~ ^[0-9]+$ ]] || die "--coordinator-port must be a number, got '$port'"

# First host of a SLURM node list such as "gpu-[003-005,010],login1" → "gpu-003".
first_host() {
  local list="$1" head prefix inner suffix
  if command -v scontrol > /dev/null; then
    scontrol show hostnames "$list" | head -n 1
    return
  fi
  head="${list%%,*}"
  if [[ "$list" =~ ^([^,\[]*)\[([^]]*)\]([^,]*) ]]; then
    prefix="${BASH_REMATCH[1]}" inner="${BASH_REMATCH[2]}" suffix="${BASH_REMATCH[3]}"
    inner="${inner%%,*}"
    head="$prefix${inner%%-*}$suffix"
  fi
  echo "$head"
}

coordinator_host="$(first_host "$SLURM_JOB_NODELIST")"
[[ -n "$coordinator_host" ]] || die "could not read the first host of SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
export FLEXICT_COORDINATOR="$coordinator_host:$port"
export FLEXICT_NUM_PROCESSES="$SLURM_NTASKS"
export FLEXICT_PROCESS_ID="$SLURM_PROCID"
export OPENBLAS_NUM_THREADS=1

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
cmd=("$python" -m "$module" "$@")

if [[ "$dry_run" == 1 ]]; then
  echo "FLEXICT_COORDINATOR=$FLEXICT_COORDINATOR"
  echo "FLEXICT_NUM_PROCESSES=$FLEXICT_NUM_PROCESSES"
  echo "FLEXICT_PROCESS_ID=$FLEXICT_PROCESS_ID"
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
cd "$repo"
echo "gpu_multinode.sh: process $FLEXICT_PROCESS_ID of $FLEXICT_NUM_PROCESSES on $(hostname), coordinator $FLEXICT_COORDINATOR" >&2
# exec: SIGTERM from srun/scancel reaches the trainer itself.
exec "${cmd[@]}"
