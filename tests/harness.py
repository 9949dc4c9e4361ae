"""Multi-process test harness: run a function on N ranks under a deadline.

    results = harness.run(fn, world=2, args=(...,), deadline=60)   # [rank 0's, rank 1's, ...]

* Rendezvous without fixed ports: the parent hosts the TCPStore on an OS-chosen
  loopback port and the ranks join it the way torch's elastic agent's workers do
  (``TORCHELASTIC_USE_AGENT_STORE``), so ``init_process_group("env://")`` and
  ``meshwise.parallelize`` work unchanged.
* Ranks are forked from a forkserver that imported torch once (``_context``), not
  spawned: each spawned rank spent about 2 s of CPU importing torch, most of a small
  test's time on two cores. The forkserver is single-threaded and has run nothing but
  imports, so forking it is safe.
* One torch thread per rank (OMP_NUM_THREADS=1 before torch is imported).
* A rank that raises fails the test with its traceback; the other ranks are killed.
* At the deadline every rank still running has its Python stack dumped (faulthandler
  on SIGUSR1) and is killed; the error names the ranks that hung and shows where.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any


class RankFailed(AssertionError):
    """A rank raised; the message holds its traceback."""


class RankHung(TimeoutError):
    """Ranks were still running at the deadline; the message holds their stacks."""


def run(fn: Callable[..., Any], world: int, args: tuple[Any, ...] = (), *, deadline: float = 60.0,
        env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world`` ranks; return every rank's result in rank order."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="meshwise-test-") as tmp:
        base_env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        procs = []
        for rank in range(world):
            rank_env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            proc = ctx.Process(target=_rank_main, args=(fn, args, rank_env, tmp), name=f"rank{rank}", daemon=True)
            proc.start()
            procs.append(proc)
        try:
            _wait(procs, tmp, deadline)
            return [_load(os.path.join(tmp, f"result-{rank}.pkl")) for rank in range(world)]
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join(5)
            del store


# what a rank imports anyway, some of it lazily and slowly (torch._dynamo pulls in sympy
# when the first optimizer is made): imported once in the server instead of once per rank
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp",
            "torch.distributed.pipelining", "torch.distributed.checkpoint", "safetensors.torch", "numpy.random",
            "meshwise", "meshwise.pipeline", "meshwise.zero", "meshwise.split", "meshwise.trace",
            # test_hf's models (3 s per rank); a module that is not installed is skipped
            "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama",
            "transformers.models.bert.modeling_bert"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts: at the first run
    return ctx


def _wait(procs: list[Any], tmp: str, deadline: float) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            rank = min(failed, key=lambda r: _mtime(os.path.join(tmp, f"error-{r}.txt")))
            for p in procs:
                p.kill()
            trace = _read(os.path.join(tmp, f"error-{rank}.txt")) or (
                f"exit code {procs[rank].exitcode}, no traceback; native crash stack, if any:\n"
                f"{_read(os.path.join(tmp, f'stack-{rank}.txt'))}")
            raise RankFailed(f"rank {rank} of {len(procs)} failed:\n{trace}{_output(tmp, rank)}")
        if all(p.exitcode == 0 for p in procs):
            return
        time.sleep(0.02)
    hung = [r for r, p in enumerate(procs) if p.exitcode is None]
    for r in hung:
        os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(0.5)
    stacks = "\n".join(f"--- rank {r} ---\n{_read(os.path.join(tmp, f'stack-{r}.txt'))}{_output(tmp, r)}" for r in hung)
    for p in procs:
        p.kill()
    raise RankHung(f"rank(s) {hung} of {len(procs)} still running after the {deadline:.0f} s deadline; "
                   f"all ranks killed. Where they were:\n{stacks}")


def _rank_main(fn: Callable[..., Any], args: tuple[Any, ...], env: dict[str, str], tmp: str) -> None:
    os.environ.update(env)
    rank = env["RANK"]
    # a forked rank inherits the forkserver's stdout and stderr, not this test's: its output
    # goes to a file of its own, shown when the test fails
    out = os.open(os.path.join(tmp, f"out-{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    stack_file = open(os.path.join(tmp, f"stack-{rank}.txt"), "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    faulthandler.enable(file=stack_file, all_threads=True)  # native crashes too
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(*args)
    except BaseException:
        with open(os.path.join(tmp, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    with open(os.path.join(tmp, f"result-{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    stack_file.close()
    os._exit(0)  # skip the interpreter's teardown of torch's C++ state (see meshwise.worker._leave)


def _output(tmp: str, rank: int, lines: int = 30) -> str:
    text = _read(os.path.join(tmp, f"out-{rank}.txt")).rstrip().splitlines()[-lines:]
    return f"\n--- rank {rank}'s last output ---\n" + "\n".join(text) if text else ""


def _load(path: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return float("inf")
