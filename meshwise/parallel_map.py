"""``meshwise.map``: a data-parallel map over axis 0 of an array, order kept.

    out = mw.map(fn, array, workers=4)   # == fn(array) for a row-wise fn

The array (NumPy or torch) is cut into ``workers`` near-equal chunks along axis 0;
``fn`` runs on each chunk in a thread (torch and NumPy kernels release the GIL) or in a
process (``fn`` must then be picklable); the results are concatenated in chunk order.
An exception in a chunk is raised here as the original exception.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch

BACKENDS = ("thread", "process")


def map(fn: Callable[[Any], Any], array: Any, *, workers: int | None = None, backend: str = "thread") -> Any:  # noqa: A001
    """``fn`` applied to chunks of ``array`` along axis 0, in parallel, concatenated in order."""
    if not callable(fn):
        raise TypeError(f"map expects a function first, got {type(fn).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: use 'thread' or 'process'")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if type(workers) is not int or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid: it must be an integer >= 1")
    if isinstance(array, torch.Tensor):
        if array.dim() == 0:
            raise ValueError("map needs an array with an axis 0 to split; got a 0-d tensor")
        chunks = [c for c in array.tensor_split(workers) if len(c)]
    elif isinstance(array, np.ndarray):
        if array.ndim == 0:
            raise ValueError("map needs an array with an axis 0 to split; got a 0-d array")
        chunks = [c for c in np.array_split(array, workers) if len(c)]
    else:
        raise TypeError(f"map splits a NumPy array or a torch tensor, got {type(array).__name__}")
    if len(chunks) <= 1:
        return fn(array)
    with _executor(backend, len(chunks)) as pool:
        results = [f.result() for f in [pool.submit(fn, c) for c in chunks]]
    return _concat(results)


def _executor(backend: str, workers: int) -> Executor:
    if backend == "thread":
        return ThreadPoolExecutor(max_workers=workers)
    # Forking this process, which may already run torch's thread pools, is unsafe; a
    # forkserver is a clean process that imports torch once, so workers start in
    # milliseconds rather than spending seconds each importing torch as spawned ones do.
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy"])  # read when this process's server starts
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _concat(results: list[Any]) -> Any:
    head = results[0]
    if isinstance(head, torch.Tensor):
        return torch.cat(results)
    if isinstance(head, np.ndarray):
        return np.concatenate(results)
    if isinstance(head, builtins.list):
        return [item for part in results for item in part]
    raise TypeError(
        f"fn returned {type(head).__name__}; map concatenates tensors, NumPy arrays or lists "
        f"along axis 0: return one of those per chunk"
    )
