"""flexict_jax.host_heap: glibc keeps XLA:CPU's per-step temporaries (docs/jax_notes.md §A7), and only where it
should. Each case runs in a child process, since the setting lasts for the life of a process."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
from run_utils import REPO

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="host_heap acts only on Linux with glibc")

# Sets the heap up as the train CLI does, then reports (1) whether a 256 MiB malloc on a new thread (the way
# XLA:CPU allocates a step's temporaries) was served by mmap (bit 2 of glibc's chunk header) and (2) with
# `jit`, the fewest minor page faults of a call of a jitted function with 128 MB of temporaries, over 8 calls after
# the first (the kept heap still grows now and then: a call's temporaries can be allocated before the previous
# call's are freed).
CHILD = r"""
import ctypes, json, resource, sys, threading
from flexict_jax import host_heap
heap = host_heap.keep_step_buffers()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
found = {}
def allocate():
    block = libc.malloc(256 << 20)
    found["mmapped"] = bool(ctypes.c_size_t.from_address(block - 8).value & 2)
    libc.free(block)
thread = threading.Thread(target=allocate)
thread.start()
thread.join()
faults = None
if sys.argv[1] == "jit":
    import jax, jax.numpy as jnp
    @jax.jit
    def f(x):
        y = jax.lax.optimization_barrier(x * 2.0)  # materialised: 128 MB of temporaries
        z = jax.lax.optimization_barrier(jnp.flip(y, 0) + 1.0)
        return jnp.sum(jnp.flip(z, 1) * y)
    x = jnp.ones((4096, 4096), jnp.float32)
    f(x).block_until_ready()
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = min(faults)
print(json.dumps({"heap": heap, "faults": faults, **found}))
"""


def child(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**clean, "PYTHONPATH": str(REPO), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cpu_steps_keep_their_temporaries_and_glibc_defaults_do_not():
    kept = child("jit", JAX_PLATFORMS="cpu")
    assert kept["heap"].startswith("glibc malloc keeps"), kept
    assert not kept["mmapped"]
    # The user's own malloc setting wins: here one that leaves glibc's mmap of large blocks as it is.
    default = child("jit", JAX_PLATFORMS="cpu", GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert default["heap"] == "left alone: GLIBC_TUNABLES sets the user's own malloc options", default
    assert default["mmapped"]
    # Each call of the default process faults in its temporaries afresh (128 MB: 32,768 4-KiB pages); the kept
    # heap reuses them.
    assert default["faults"] > 20_000, default
    assert kept["faults"] < default["faults"] / 10, (kept, default)


@pytest.mark.parametrize("env,reason", [({"MALLOC_ARENA_MAX": "4", "JAX_PLATFORMS": "cpu"}, "MALLOC_ARENA_MAX"),
                                        ({"JAX_PLATFORMS": "tpu"}, "the steps run on an accelerator")])
def test_left_alone(env, reason):
    found = child("malloc", **env)
    assert reason in found["heap"] and found["heap"].startswith("left alone"), found
    assert found["mmapped"]
