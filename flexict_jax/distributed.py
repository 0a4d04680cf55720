"""Multi-process start-up: one code path for a laptop, a CPU test cluster on 127.0.0.1 and a TPU pod.

`jax.distributed.initialize()` without arguments only works where JAX can discover the cluster (TPU VMs,
SLURM); on a plain CPU box it raises (docs/jax_notes.md §A6). So we initialise only when asked to:
- `FLEXICT_COORDINATOR=host:port FLEXICT_NUM_PROCESSES=N FLEXICT_PROCESS_ID=i` (launch/local_multiprocess.sh,
  multi-GPU launchers): explicit initialisation, gloo collectives on CPU;
- `FLEXICT_DISTRIBUTED=auto` (launch/tpu_pod.sh): let JAX discover the pod.

After that, the trainer's multi-host contract is: every process feeds its own rows of each global batch
(`jax.make_array_from_process_local_data`), draws the same step variant from (seed, step), meets the others at
`barrier` after compiling a variant, saves checkpoints together (Orbax), and stops at the step JAX's
preemption sync service picks when any process gets SIGTERM.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

# Long enough for the slowest host to compile a ViT-L step variant from scratch.
BARRIER_TIMEOUT_S = 1800


def maybe_initialize() -> None:
    if jax.distributed.is_initialized():
        return
    coordinator = os.environ.get("FLEXICT_COORDINATOR")
    if coordinator:
        try:
            num_processes = int(os.environ["FLEXICT_NUM_PROCESSES"])
            process_id = int(os.environ["FLEXICT_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise ValueError("FLEXICT_COORDINATOR is set, so FLEXICT_NUM_PROCESSES and FLEXICT_PROCESS_ID must be "
                             f"integers too: {e}") from e
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=300)
    elif os.environ.get("FLEXICT_DISTRIBUTED") == "auto":
        jax.distributed.initialize(initialization_timeout=300)


def barrier(name: str, *, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Blocks until every process has reached the barrier `name`; a no-op in a single process.

    A coordination-service barrier, not a device collective: CPU (gloo) collectives give up when a peer has not
    joined within 30 s (jaxlib's fixed rendezvous timeout), which a host still compiling a step variant easily
    exceeds, so hosts meet here between compiling and running. A name that differs between hosts (e.g. they drew
    different variants) makes every host time out with that name in the error instead of hanging in a step.
    """
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def process_sum(value: int) -> int:
    """The sum of a host-side count over all processes (every process must call it at the same point)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


def all_gather_text(name: str, text: str, *, timeout_s: int = BARRIER_TIMEOUT_S) -> list[str]:
    """`text` from every process, in process order; `[text]` in a single process. `name` must be unique per call.

    Through the coordination service's key-value store rather than a device collective, so a process that got
    here late (e.g. after an Orbax restore that failed on another host and left this one waiting in Orbax's own
    barrier) is still heard instead of tripping the 30 s CPU collective rendezvous.
    """
    if jax.process_count() == 1:
        return [text]
    client = ocp.multihost.get_jax_distributed_client()
    client.key_value_set(f"flexict/{name}/{jax.process_index()}", text)
    return [client.blocking_key_value_get(f"flexict/{name}/{i}", timeout_s * 1000)
            for i in range(jax.process_count())]
