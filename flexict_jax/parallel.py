"""Host-side work over items in spawned worker processes, results in input order (data preparation, DICOM
discovery). Spawn, not fork: TensorStore runs threads in the parent, and forking a threaded process can
deadlock."""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import multiprocessing
from collections.abc import Callable, Iterable, Iterator


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """`workers` spawned processes."""
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items, results in input order; with workers > 1 in spawned processes, a bounded window of
    2·workers items ahead (`fn` must be a module-level function, so the workers can unpickle it)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with process_pool(workers) as pool:
        items = iter(items)
        pending = collections.deque(pool.submit(fn, item) for item in itertools.islice(items, 2 * workers))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(items, 1):
                pending.append(pool.submit(fn, item))
            yield result
