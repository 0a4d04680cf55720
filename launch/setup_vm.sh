#!/usr/bin/env bash
# Prepares one worker (TPU VM, GPU node) to run the trainer from this directory: a Python >= 3.11 venv in
# .venv with the project and its accelerator extra. Run on every worker (launch/tpu_pod.sh setup does that).
#
#   bash launch/setup_vm.sh [--extra tpu|cuda|cuda13|none] [--python 3.12] [--gcsfuse BUCKET[:MOUNT_DIR]] [--dry-run]
#
#   --extra      pyproject extra to install: tpu (jax[tpu], libtpu; default), cuda (jax[cuda12]), cuda13
#                (jax[cuda13]) or none (CPU)
#   --python     Python version for the venv (default 3.12, which gets jax 0.11; 3.11 gets jax 0.10:
#                docs/jax_notes.md §C9). TPU VM images ship Python 3.10, so the venv is made by uv, which
#                fetches a managed interpreter; uv itself is installed to ~/.local/bin if missing.
#   --gcsfuse    mount gs://BUCKET at MOUNT_DIR (default ~/gcs/BUCKET) with gcsfuse, installing it if needed:
#                Grain reads ArrayRecord shards through the mount (reading gs:// directly is slow, docs/jax_notes.md §A6)
#   --dry-run    print the commands instead of running them
#
# Re-running is safe: an existing .venv is reused and only missing or changed packages are installed.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "setup_vm.sh: $*" >&2; exit 2; }

extra=tpu python_version=3.12 gcsfuse="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --extra) extra="${2:?--extra needs a value}"; shift 2 ;;
    --extra=*) extra="${1#*=}"; shift ;;
    --python) python_version="${2:?--python needs a value}"; shift 2 ;;
    --python=*) python_version="${1#*=}"; shift ;;
    --gcsfuse) gcsfuse="${2:?--gcsfuse needs a value}"; shift 2 ;;
    --gcsfuse=*) gcsfuse="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$extra" in tpu|cuda|cuda13|none) ;; *) die "--extra must be tpu, cuda, cuda13 or none, got '$extra'" ;; esac

execute() {
  if [[ "$dry_run" == 1 ]]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export PATH="$HOME/.local/bin:$PATH"

if ! command -v uv > /dev/null; then
  echo "== installing uv to ~/.local/bin"
  execute bash -c 'curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh'
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "== creating .venv with Python $python_version"
  execute uv venv --python "$python_version" .venv
fi
target="."
[[ "$extra" == none ]] || target=".[$extra]"
echo "== installing $target into .venv"
execute uv pip install --python .venv/bin/python -e "$target"
# Importing jax does not touch the accelerator (only one process may own a TPU), so this is safe to run
# while another process on the worker holds it.
execute .venv/bin/python -c 'import flax, grain, jax, orbax.checkpoint as ocp; print(f"jax {jax.__version__}, flax {flax.__version__}, orbax {ocp.__version__}, grain {grain.__version__}")'

if [[ -n "$gcsfuse" ]]; then
  bucket="${gcsfuse%%:*}"
  mount_dir="$HOME/gcs/$bucket"
  [[ "$gcsfuse" != *:* ]] || mount_dir="${gcsfuse#*:}"
  if ! command -v gcsfuse > /dev/null; then
    echo "== installing gcsfuse"
    # shellcheck disable=SC2016  # $(lsb_release) is for the inner shell
    execute bash -c 'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse'
  fi
  if mountpoint -q "$mount_dir" 2> /dev/null; then
    echo "== gs://$bucket is already mounted at $mount_dir"
  else
    echo "== mounting gs://$bucket at $mount_dir"
    execute mkdir -p "$mount_dir"
    # Metadata caching makes Grain's many small opens cheap; listing once warms it (MaxText's advice).
    execute gcsfuse --implicit-dirs --metadata-cache-ttl-secs=-1 --stat-cache-max-size-mb=-1 \
      --type-cache-max-size-mb=-1 "$bucket" "$mount_dir"
    execute find "$mount_dir" -fprint /dev/null
  fi
fi
echo "== ready: $repo/.venv"
