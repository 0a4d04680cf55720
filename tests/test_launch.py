"""Launchers: the exact gcloud commands of every tpu_pod.sh subcommand (--dry-run), SLURM → coordinator mapping,
the local multi-process runner's exit codes and signal forwarding, and static checks of every script."""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
POD = ["--name=pod1", "--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-32"]
SSH = "gcloud compute tpus tpu-vm ssh pod1 --zone=us-east5-a --project=proj --worker=all"


def run(script: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=60,
                          env=env if env is not None else os.environ)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def pod(*args: str) -> list[str]:
    return run("tpu_pod.sh", "--dry-run", *args).stdout.splitlines()


def test_scripts_parse_and_pass_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"tpu_pod.sh", "gpu_multinode.sh", "local_multiprocess.sh", "setup_vm.sh"}
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_multinode.sh", "local_multiprocess.sh", "setup_vm.sh"])
def test_help(script):
    out = run(script, "--help").stdout
    assert "--dry-run" in out and "Usage" not in out.splitlines()[0]
    if script == "tpu_pod.sh":
        for subcommand in ("create", "sync", "setup", "run", "logs", "stop", "delete"):
            assert f"\n  {subcommand} " in out, subcommand


def test_tpu_vm_subcommands():
    assert pod(*POD, "create") == [
        "gcloud compute tpus tpu-vm create pod1 --zone=us-east5-a --project=proj --accelerator-type=v5p-32 "
        "--version=v2-alpha-tpuv5"]
    assert pod(*POD, "sync") == [
        f"bash -c 'git -C {REPO} ls-files -z --cached --others --exclude-standard | tar -C {REPO} --null -T - -czf "
        f"{os.environ.get('TMPDIR', '/tmp')}/flexict_jax_src-pod1.tar.gz'",
        "gcloud compute tpus tpu-vm scp --zone=us-east5-a --project=proj --worker=all "
        f"{os.environ.get('TMPDIR', '/tmp')}/flexict_jax_src-pod1.tar.gz pod1:/tmp/flexict_jax_src.tar.gz",
        f"{SSH} --command='mkdir -p flexict_jax && tar -xzf /tmp/flexict_jax_src.tar.gz -C flexict_jax && "
        "rm -f /tmp/flexict_jax_src.tar.gz'"]
    assert pod(*POD, "setup", "--", "--extra", "tpu") == [
        f"{SSH} --command='cd flexict_jax && bash launch/setup_vm.sh --extra tpu'"]
    assert pod(*POD, "run", "--", "--config=configs/stage1.py", "--workdir=gs://b/runs/s1") == [
        f"{SSH} --command='cd flexict_jax && mkdir -p logs && "
        "if [ -f logs/train.pid ] && kill -0 \"$(cat logs/train.pid)\" 2>/dev/null; then "
        "echo \"$(hostname): a trainer is still running (pid $(cat logs/train.pid)); use stop first\" >&2; exit 1; fi; "
        "rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo rm -f /tmp/libtpu_lockfile; "
        "FLEXICT_DISTRIBUTED=auto OPENBLAS_NUM_THREADS=1 nohup .venv/bin/python -m flexict_jax.train "
        "--config=configs/stage1.py --workdir=gs://b/runs/s1 > logs/train-$(hostname).log 2>&1 < /dev/null & "
        "echo $! > logs/train.pid && "
        "echo \"$(hostname): trainer started (pid $!), log flexict_jax/logs/train-$(hostname).log\"'"]
    assert pod(*POD, "logs", "--lines=20", "--follow") == [
        f"{SSH} --command='cd flexict_jax && tail -n 20 -F logs/train-$(hostname).log | sed \"s/^/[$(hostname)] /\"'"]
    assert pod(*POD, "stop", "--timeout=60") == [
        f"{SSH} --command='cd flexict_jax && if [ -f logs/train.pid ] && kill -0 \"$(cat logs/train.pid)\" "
        "2>/dev/null; then pid=$(cat logs/train.pid); kill -TERM $pid; for _ in $(seq 60); do kill -0 $pid "
        "2>/dev/null || break; sleep 1; done; if kill -0 $pid 2>/dev/null; then echo \"$(hostname): trainer $pid "
        "still running after 60 s\" >&2; exit 1; fi; echo \"$(hostname): trainer $pid saved and exited\"; else "
        "echo \"$(hostname): no trainer running\"; fi'"]
    assert pod(*POD, "delete") == ["gcloud compute tpus tpu-vm delete pod1 --zone=us-east5-a --project=proj --quiet"]


def test_multislice_queued_resource_subcommands(monkeypatch):
    flags = ["--name", "big", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--num-slices", "2",
             "--spot", "--coordinator-port", "8476", "--remote-dir", "work/fx"]
    ssh = "gcloud compute tpus queued-resources ssh big --zone=us-central2-b --node=all --worker=all"
    assert pod(*flags, "create") == [
        "gcloud compute tpus queued-resources create big --zone=us-central2-b --accelerator-type=v4-32 "
        "--runtime-version=tpu-ubuntu2204-base --node-count=2 --node-prefix=big --spot"]
    assert pod(*flags, "sync")[1] == (
        "gcloud compute tpus queued-resources scp --zone=us-central2-b --node=all --worker=all "
        f"{os.environ.get('TMPDIR', '/tmp')}/flexict_jax_src-big.tar.gz big:/tmp/flexict_jax_src.tar.gz")
    run_cmd, = pod(*flags, "run", "--", "--workdir=gs://b/r", "--config.note=two words")
    assert run_cmd.startswith(f"{ssh} --command='cd work/fx && mkdir -p logs && ")
    assert ("FLEXICT_DISTRIBUTED=auto OPENBLAS_NUM_THREADS=1 JAX_COORDINATOR_PORT=8476 nohup .venv/bin/python -m "
            "flexict_jax.train --workdir=gs://b/r --config.note=two\\ words > logs/train-$(hostname).log") in run_cmd
    assert pod(*flags, "delete") == [
        "gcloud compute tpus queued-resources delete big --zone=us-central2-b --force --quiet"]
    # Options from the environment; --queued for a single slice; the node id names the single node.
    monkeypatch.setenv("FLEXICT_TPU_NAME", "one")
    monkeypatch.setenv("FLEXICT_TPU_ZONE", "europe-west4-a")
    assert pod("--queued", "--accelerator-type=v6e-8", "create") == [
        "gcloud compute tpus queued-resources create one --zone=europe-west4-a --accelerator-type=v6e-8 "
        "--runtime-version=v2-alpha-tpuv6e --node-id=one"]


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "create"], "--name"),
    (["--name=n", "--zone=z", "create"], "--accelerator-type"),
    (["--name=n", "--zone=z", "--accelerator-type=tpu7-x", "create"], "--runtime-version"),
    (["--name=n", "--zone=z", "run", "--config=x"], "after --"),
    (["--name=n", "--zone=z", "launch"], "unknown subcommand"),
    (["--name=n", "--zone=z", "--num-slices=0", "delete"], "--num-slices"),
])
def test_pod_bad_arguments_fail_clearly(args, message):
    proc = run("tpu_pod.sh", "--dry-run", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("nodelist, host", [
    ("gpu-[003-005,010],login1", "gpu-003"), ("node7", "node7"), ("a1,b2", "a1"), ("n[1-2]-ib,x", "n1-ib")])
def test_gpu_multinode_maps_slurm_env(nodelist, host):
    env = {"PATH": "/usr/bin:/bin", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": nodelist,
           "SLURM_JOB_ID": "1234", "PYTHON": "python3"}
    out = run("gpu_multinode.sh", "--dry-run", "--", "--workdir=/runs/a b", env=env).stdout.splitlines()
    assert out == [f"FLEXICT_COORDINATOR={host}:29734", "FLEXICT_NUM_PROCESSES=4", "FLEXICT_PROCESS_ID=3",
                   "python3 -m flexict_jax.train --workdir=/runs/a\\ b"]
    assert run("gpu_multinode.sh", "--dry-run", "--coordinator-port=7000", env=env).stdout.startswith(
        f"FLEXICT_COORDINATOR={host}:7000\n")
    proc = run("gpu_multinode.sh", "--", "x", env={"PATH": "/usr/bin:/bin"}, check=False)
    assert proc.returncode == 2 and "SLURM_PROCID is not set" in proc.stderr


def test_local_multiprocess_dry_run(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    monkeypatch.setenv("PYTHON", "python3")
    out = run("local_multiprocess.sh", "--dry-run", "--port=4321", "--cpu-devices=4", "2", "--",
              "--config=configs/stage1.py:tiny").stdout.splitlines()
    assert out == [f"cd {REPO} && env FLEXICT_COORDINATOR=127.0.0.1:4321 FLEXICT_NUM_PROCESSES=2 "
                   f"FLEXICT_PROCESS_ID={i} JAX_PLATFORMS=cpu XLA_FLAGS=--xla_cpu_use_thunk_runtime=true\\ "
                   "--xla_force_host_platform_device_count=4 PYTHONUNBUFFERED=1 python3 -m flexict_jax.train "
                   "--config=configs/stage1.py:tiny" for i in range(2)]
    proc = run("local_multiprocess.sh", "--dry-run", "zero", check=False)
    assert proc.returncode == 2 and "positive integer" in proc.stderr


# A stand-in for the trainer (no jax import, so it starts in milliseconds): installs its SIGTERM handler, records
# its environment, then exits with the code named for its process id once every process is up, or waits for
# SIGTERM and exits 0.
FAKE_TRAINER = """
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
pid, count = int(os.environ["FLEXICT_PROCESS_ID"]), int(os.environ["FLEXICT_NUM_PROCESSES"])
signal.signal(signal.SIGTERM, lambda *_: ((out / f"term_{pid}").write_text("saved"), sys.exit(0)))
(out / f"env_{pid}").write_text(" ".join(os.environ[k] for k in
                                          ("FLEXICT_COORDINATOR", "FLEXICT_NUM_PROCESSES", "XLA_FLAGS")))
codes = dict(item.split("=") for item in sys.argv[2:])
if str(pid) in codes:
    while len(list(out.glob("env_*"))) < count:
        time.sleep(0.05)
    sys.exit(int(codes[str(pid)]))
print("ready", flush=True)
time.sleep(120)
sys.exit(5)
"""


def start_fake(tmp_path, n: int, *codes: str) -> subprocess.Popen:
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHON=sys.executable)
    return subprocess.Popen(["bash", str(LAUNCH / "local_multiprocess.sh"), str(n), "--module=fake_trainer",
                             f"--log-dir={tmp_path / 'logs'}", "--", str(tmp_path), *codes],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_local_multiprocess_propagates_failure_and_stops_the_rest(tmp_path):
    proc = start_fake(tmp_path, 3, "1=7")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, err
    assert "process 1 (pid" in err and "exited with status 7" in err
    assert sorted(p.name for p in tmp_path.glob("term_*")) == ["term_0", "term_2"]  # the others were stopped
    coordinator, count, xla = (tmp_path / "env_2").read_text().split(" ", 2)
    assert coordinator.startswith("127.0.0.1:") and count == "3"
    assert xla.endswith("--xla_force_host_platform_device_count=1")
    assert (tmp_path / "logs" / "process_0.log").exists()


def test_local_multiprocess_forwards_sigterm_and_exits_zero(tmp_path):
    proc = start_fake(tmp_path, 2)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("env_*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sorted(p.name for p in tmp_path.glob("term_*")) == ["term_0", "term_1"]
    assert "[0] ready" in out and "[1] ready" in out
