#!/usr/bin/env bash
# Cloud TPU VM / pod / multi-slice launcher: one command per stage of a run's life.
#
#   bash launch/tpu_pod.sh [options] create
#   bash launch/tpu_pod.sh [options] sync
#   bash launch/tpu_pod.sh [options] setup [-- <setup_vm.sh args>]
#   bash launch/tpu_pod.sh [options] run -- --config=configs/stage1.py --workdir=gs://BUCKET/runs/stage1 \
#       --config.data.dir=/home/$USER/gcs/slices [--config.KEY=VALUE ...]
#   bash launch/tpu_pod.sh [options] logs [--lines N] [--follow]
#   bash launch/tpu_pod.sh [options] stop [--timeout SECONDS]
#   bash launch/tpu_pod.sh [options] delete
#
# Subcommands:
#   create  a TPU VM (`tpu-vm create`), or a queued resource with --queued or --num-slices > 1
#   sync    copy this working tree (git-tracked and untracked, non-ignored files) to every worker
#   setup   run launch/setup_vm.sh on every worker (Python venv, jax[tpu], the project)
#   run     start the trainer on every worker at once, detached, with FLEXICT_DISTRIBUTED=auto (JAX discovers
#           the pod); removes a stale /tmp/libtpu_lockfile first and refuses if a trainer is still running;
#           each worker logs to REMOTE_DIR/logs/train-<hostname>.log and records its pid
#   logs    the last N lines (default 50) of every worker's log, prefixed with its hostname; --follow to stream
#   stop    SIGTERM to the trainer on every worker: all hosts save the same step and exit 0; waits until they
#           have exited (--timeout, default 900 s)
#   delete  delete the TPU VM / queued resource (and its slices)
#
# Options (before the subcommand; each also reads the environment variable shown):
#   --name NAME             TPU VM or queued-resource name                     ($FLEXICT_TPU_NAME)
#   --zone ZONE             e.g. us-east5-a                                     ($FLEXICT_TPU_ZONE)
#   --project PROJECT       default: gcloud's configured project                ($FLEXICT_TPU_PROJECT)
#   --accelerator-type T    e.g. v4-32, v5p-64, v6e-16 (create)                 ($FLEXICT_TPU_TYPE)
#   --runtime-version V     TPU software version (create); default from the type: v4 tpu-ubuntu2204-base,
#                           v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e ($FLEXICT_TPU_RUNTIME)
#   --num-slices K          K > 1: a multi-slice queued resource; the mesh's "data" axis then spans the slices
#                           (data parallelism over DCN)                         ($FLEXICT_TPU_SLICES, default 1)
#   --queued                use a queued resource for a single slice too        ($FLEXICT_TPU_QUEUED=1)
#   --spot                  spot capacity (create)                              ($FLEXICT_TPU_SPOT=1)
#   --remote-dir DIR        project directory on the workers, relative to the remote home
#                                                                               ($FLEXICT_TPU_REMOTE_DIR, default flexict_jax)
#   --coordinator-port P    JAX coordinator port (exported as JAX_COORDINATOR_PORT). jax >= 0.8.1 uses 8482;
#                           multi-slice firewalls that only open 8476 need --coordinator-port=8476
#                           (jax-ml/jax#35905)                                  ($FLEXICT_TPU_COORDINATOR_PORT)
#   --dry-run               print the exact commands instead of running them
#   -h, --help              this text
#
# Every worker must run the same subcommand together (gcloud --worker=all, and --node=all for queued resources):
# jax.distributed on a pod waits for all hosts (jax-ml/jax#22436).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

name="${FLEXICT_TPU_NAME:-}" zone="${FLEXICT_TPU_ZONE:-}" project="${FLEXICT_TPU_PROJECT:-}"
accelerator_type="${FLEXICT_TPU_TYPE:-}" runtime_version="${FLEXICT_TPU_RUNTIME:-}"
num_slices="${FLEXICT_TPU_SLICES:-1}" queued="${FLEXICT_TPU_QUEUED:-0}" spot="${FLEXICT_TPU_SPOT:-0}"
remote_dir="${FLEXICT_TPU_REMOTE_DIR:-flexict_jax}" coordinator_port="${FLEXICT_TPU_COORDINATOR_PORT:-}"
dry_run=0 subcommand=""

while [[ $# -gt 0 && -z "$subcommand" ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name|--zone|--project|--accelerator-type|--runtime-version|--num-slices|--remote-dir|--coordinator-port)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      set -- "$1=$2" "${@:3}" ;;
    --name=*) name="${1#*=}"; shift ;;
    --zone=*) zone="${1#*=}"; shift ;;
    --project=*) project="${1#*=}"; shift ;;
    --accelerator-type=*) accelerator_type="${1#*=}"; shift ;;
    --runtime-version=*) runtime_version="${1#*=}"; shift ;;
    --num-slices=*) num_slices="${1#*=}"; shift ;;
    --remote-dir=*) remote_dir="${1#*=}"; shift ;;
    --coordinator-port=*) coordinator_port="${1#*=}"; shift ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) subcommand="$1"; shift ;;
  esac
done
[[ -n "$subcommand" ]] || { usage >&2; die "no subcommand given"; }
case "$subcommand" in create|sync|setup|run|logs|stop|delete) ;; *) die "unknown subcommand '$subcommand' (see --help)" ;; esac
[[ -n "$name" ]] || die "--name (or FLEXICT_TPU_NAME) is required"
[[ -n "$zone" ]] || die "--zone (or FLEXICT_TPU_ZONE) is required"
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$num_slices'"
[[ -z "$coordinator_port" || "$coordinator_port" =~ ^[0-9]+$ ]] || die "--coordinator-port must be a number"
((num_slices == 1)) || queued=1

# A command as one copy-pasteable line: values with shell metacharacters are single-quoted (--flag='value').
show() {
  local out="" word flag value
  for word in "$@"; do
    flag="" value="$word"
    if [[ "$word" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then flag="${BASH_REMATCH[1]}" value="${BASH_REMATCH[2]}"; fi
    if [[ "$value" =~ ^[A-Za-z0-9_@%+=:,./-]*$ ]]; then out+=" $word"
    else out+=" $flag'${value//\'/\'\\\'\'}'"; fi
  done
  echo "${out# }"
}
execute() {
  if [[ "$dry_run" == 1 ]]; then show "$@"; else "$@"; fi
}

location=("--zone=$zone")
[[ -z "$project" ]] || location+=("--project=$project")
if [[ "$queued" == 1 ]]; then
  ssh_cmd=(gcloud compute tpus queued-resources ssh "$name" "${location[@]}" --node=all --worker=all)
  scp_cmd=(gcloud compute tpus queued-resources scp "${location[@]}" --node=all --worker=all)
else
  ssh_cmd=(gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=all)
  scp_cmd=(gcloud compute tpus tpu-vm scp "${location[@]}" --worker=all)
fi
on_all_workers() { execute "${ssh_cmd[@]}" "--command=$1"; }
quote_args() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "${out# }"; }
remote_cd="cd $(printf '%q' "$remote_dir")"
pid_file="logs/train.pid"
alive="[ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null"

case "$subcommand" in
  create)
    [[ -n "$accelerator_type" ]] || die "create needs --accelerator-type (or FLEXICT_TPU_TYPE), e.g. v5p-32"
    if [[ -z "$runtime_version" ]]; then
      case "$accelerator_type" in
        v4-*) runtime_version=tpu-ubuntu2204-base ;;
        v5p-*) runtime_version=v2-alpha-tpuv5 ;;
        v5litepod-*) runtime_version=v2-alpha-tpuv5-lite ;;
        v6e-*) runtime_version=v2-alpha-tpuv6e ;;
        *) die "no default runtime version for --accelerator-type=$accelerator_type; pass --runtime-version" ;;
      esac
    fi
    extra=()
    [[ "$spot" != 1 ]] || extra+=(--spot)
    if [[ "$queued" == 1 ]]; then
      if ((num_slices > 1)); then nodes=("--node-count=$num_slices" "--node-prefix=$name")
      else nodes=("--node-id=$name"); fi
      execute gcloud compute tpus queued-resources create "$name" "${location[@]}" \
        "--accelerator-type=$accelerator_type" "--runtime-version=$runtime_version" "${nodes[@]}" "${extra[@]}"
    else
      execute gcloud compute tpus tpu-vm create "$name" "${location[@]}" \
        "--accelerator-type=$accelerator_type" "--version=$runtime_version" "${extra[@]}"
    fi
    ;;
  sync)
    [[ $# -eq 0 ]] || die "sync takes no arguments"
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    archive="${TMPDIR:-/tmp}/flexict_jax_src-$name.tar.gz"
    remote_archive="/tmp/flexict_jax_src.tar.gz"
    pack="git -C $(printf '%q' "$repo") ls-files -z --cached --others --exclude-standard | tar -C $(printf '%q' "$repo") --null -T - -czf $(printf '%q' "$archive")"
    execute bash -c "$pack"
    execute "${scp_cmd[@]}" "$archive" "$name:$remote_archive"
    on_all_workers "mkdir -p $(printf '%q' "$remote_dir") && tar -xzf $remote_archive -C $(printf '%q' "$remote_dir") && rm -f $remote_archive"
    ;;
  setup)
    [[ "${1:-}" != "--" ]] || shift
    on_all_workers "$remote_cd && bash launch/setup_vm.sh${*:+ $(quote_args "$@")}"
    ;;
  run)
    [[ "${1:-}" == "--" ]] || die "run needs the trainer's arguments after --, e.g. run -- --config=configs/stage1.py --workdir=gs://..."
    shift
    [[ $# -gt 0 ]] || die "run: no trainer arguments after --"
    env_vars="FLEXICT_DISTRIBUTED=auto OPENBLAS_NUM_THREADS=1"
    [[ -z "$coordinator_port" ]] || env_vars+=" JAX_COORDINATOR_PORT=$coordinator_port"
    # Only one process may own the TPU: a crashed run leaves its lock file behind (jax-ml/jax#13043), but a
    # live trainer must not be doubled.
    on_all_workers "$remote_cd && mkdir -p logs && if $alive; then echo \"\$(hostname): a trainer is still running (pid \$(cat $pid_file)); use stop first\" >&2; exit 1; fi; rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo rm -f /tmp/libtpu_lockfile; $env_vars nohup .venv/bin/python -m flexict_jax.train $(quote_args "$@") > logs/train-\$(hostname).log 2>&1 < /dev/null & echo \$! > $pid_file && echo \"\$(hostname): trainer started (pid \$!), log $remote_dir/logs/train-\$(hostname).log\""
    ;;
  logs)
    lines=50 follow=0
    while [[ $# -gt 0 ]]; do
      case "$1" in
        --lines) lines="${2:?--lines needs a value}"; shift 2 ;;
        --lines=*) lines="${1#*=}"; shift ;;
        --follow) follow=1; shift ;;
        *) die "logs: unknown argument $1" ;;
      esac
    done
    [[ "$lines" =~ ^[0-9]+$ ]] || die "--lines must be a number"
    tail_flags="-n $lines"
    [[ "$follow" != 1 ]] || tail_flags+=" -F"
    on_all_workers "$remote_cd && tail $tail_flags logs/train-\$(hostname).log | sed \"s/^/[\$(hostname)] /\""
    ;;
  stop)
    timeout=900
    while [[ $# -gt 0 ]]; do
      case "$1" in
        --timeout) timeout="${2:?--timeout needs a value}"; shift 2 ;;
        --timeout=*) timeout="${1#*=}"; shift ;;
        *) die "stop: unknown argument $1" ;;
      esac
    done
    [[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"
    on_all_workers "$remote_cd && if $alive; then pid=\$(cat $pid_file); kill -TERM \$pid; for _ in \$(seq $timeout); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; if kill -0 \$pid 2>/dev/null; then echo \"\$(hostname): trainer \$pid still running after ${timeout} s\" >&2; exit 1; fi; echo \"\$(hostname): trainer \$pid saved and exited\"; else echo \"\$(hostname): no trainer running\"; fi"
    ;;
  delete)
    if [[ "$queued" == 1 ]]; then
      execute gcloud compute tpus queued-resources delete "$name" "${location[@]}" --force --quiet
    else
      execute gcloud compute tpus tpu-vm delete "$name" "${location[@]}" --quiet
    fi
    ;;
esac
