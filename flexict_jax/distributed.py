"""Multi-process start-up: one code path for a laptop, a CPU test cluster on 127.0.0.1 and a TPU pod.

`jax.distributed.initialize()` without arguments only works where JAX can discover the cluster (TPU VMs,
SLURM); on a plain CPU box it raises (jax_stack.md §A6). So we initialise only when asked to:
- `FLEXICT_COORDINATOR=host:port FLEXICT_NUM_PROCESSES=N FLEXICT_PROCESS_ID=i` (launch/local_multiprocess.sh,
  multi-GPU launchers): explicit initialisation, gloo collectives on CPU;
- `FLEXICT_DISTRIBUTED=auto` (launch/tpu_pod.sh): let JAX discover the pod.
"""
from __future__ import annotations

import os

import jax


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
