"""glibc's heap keeps XLA:CPU's per-step temporaries between steps (docs/jax_notes.md §A7).

XLA:CPU allocates all of a step's temporaries as one block (3.5 GB for a ViT-B 2D step) with malloc on a worker
thread; by default glibc maps such a block fresh and unmaps it on free, so every step page-faults all of it
again (10-13 % of a CPU step). `keep_step_buffers` makes glibc serve it from the heap and keep it: one arena,
no mmap for allocations, no trimming. It must run before JAX creates its backend (a worker thread that has
already allocated keeps its own arena, which maps large blocks regardless), so the command-line programs that
run steps call it first thing. It acts only on Linux with glibc, only where the steps run on the CPU, and never
over the user's own malloc settings.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import platform
import sys

import jax

# mallopt(3) parameters (malloc.h); mallopt's value is an int, which is why the mmap threshold (capped below
# 2 GB, under the 2D step's block) is not the knob: no mmap at all is.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
# Device files of the accelerators JAX would pick over the CPU when JAX_PLATFORMS does not choose.
_ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def _user_setting() -> str | None:
    """The user's own malloc setting (a glibc.malloc tunable or a MALLOC_* variable), if any."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return next((name for name in sorted(os.environ) if name.startswith("MALLOC_")), None)


def _runs_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without creating a backend."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def keep_step_buffers() -> str:
    """Set glibc malloc to keep large freed blocks (see the module docstring); returns what was done, one line."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "left alone: not Linux with glibc"
    user = _user_setting()
    if user:
        return f"left alone: {user} sets the user's own malloc options"
    if not _runs_on_cpu():
        return "left alone: the steps run on an accelerator"
    libc = ctypes.CDLL(None)
    if not all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS):
        return "left alone: mallopt refused"
    return "glibc malloc keeps freed blocks (arena_max 1, mmap_max 0, trim_threshold -1)"


def add_argument(parser: argparse.ArgumentParser) -> None:
    """`--host-heap keep|glibc` for the programs that time steps (benchmarks): keep (the default, as the train CLI
    does) or glibc's own defaults, to measure what keeping the heap is worth."""
    parser.add_argument("--host-heap", choices=("keep", "glibc"), default="keep",
                        help="keep: glibc keeps XLA:CPU's per-step temporaries, as the train CLI sets it "
                             "(flexict_jax.host_heap); glibc: its defaults")


def apply_argument(choice: str) -> str:
    """What `--host-heap` asks for, done before JAX starts its backend; returns what was done, one line."""
    return keep_step_buffers() if choice == "keep" else "left alone: --host-heap glibc"
