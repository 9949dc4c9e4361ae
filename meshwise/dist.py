"""This process's place in the job: rank, world, device, and the default process group.

Workers started by ``meshwise run``, ``meshwise.launch`` or plain ``torchrun`` find their
rank in the environment torch's elastic agent sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). A plain ``python script.py`` is a world of one: it gets an
in-memory store, so the same code path (process group, DDP) runs without any port.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# What the launcher (``meshwise run --plan/--device``, ``launch(plan=, device=)``) hands
# its workers; read once, by ``parallelize``, never deeper in the code.
PLAN_ENV = "MESHWISE_PLAN"
DEVICE_ENV = "MESHWISE_DEVICE"
TIMEOUT_ENV = "MESHWISE_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
"""Seconds a collective may wait for the other ranks before the job fails (``--timeout``)."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes shared files."""
        return self.rank == 0


def pick_device(choice: str | torch.device | None, local_rank: int, local_world: int = 1) -> torch.device:
    """One GPU per local rank where CUDA has enough GPUs, else the CPU; ``"cpu"`` forces it.

    ``"auto"`` with fewer GPUs than local processes runs on the CPU, and rank 0 says so
    (NCCL cannot put two ranks on one GPU); ``"cuda"`` then is an error.
    """
    if isinstance(choice, torch.device):
        return choice
    choice = choice or "auto"
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"device={choice!r} is invalid: use one of {', '.join(DEVICE_CHOICES)}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available here; use --device cpu")
    count = torch.cuda.device_count()
    if count < local_world:
        if choice == "cuda":
            raise ValueError(f"{local_world} processes on this host need one GPU each but it has {count}; "
                             f"use --nproc {count} or --device cpu")
        global _told_cpu_fallback
        if local_rank == 0 and not _told_cpu_fallback:
            _told_cpu_fallback = True
            print(f"meshwise: {local_world} processes on this host but {count} GPU(s): running on the CPU; "
                  f"use --nproc {count} for the GPUs, or --device cpu to silence this", file=sys.stderr)
        return torch.device("cpu")
    if local_rank >= count:
        raise ValueError(f"local rank {local_rank} needs GPU {local_rank} but this host has {count}; "
                         f"run at most {count} processes per host or use --device cpu")
    return torch.device("cuda", local_rank)


_told_cpu_fallback = False


def _attempt_store() -> dist.Store | None:
    """The elastic agent's store, seen through a prefix private to this restart attempt.

    Workers of the elastic agent (``meshwise run``, ``torchrun``) share its store across
    restarts, but ``init_process_group("env://")`` does not prefix keys per attempt: a
    restarted worker could read a dead peer's address or a stale barrier count, which
    shows up as "Connection refused" in gloo's connectFullMesh or as a hang. None
    outside the agent (env:// then works as usual).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=5))
    return dist.PrefixStore(f"meshwise/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init(device: str | torch.device | None = None, timeout: float | None = None) -> Context:
    """Join the job's default process group (once per process) and return this rank's Context.

    gloo serves CPU tensors; on GPUs the group is ``cpu:gloo,cuda:nccl`` so that both
    device and host collectives work. A collective that waits more than ``timeout``
    seconds (default: ``--timeout``, else 600) for the other ranks fails.
    """
    seconds = collective_timeout(timeout)
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ  # by a launcher; else a world of one
    env_world = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    dev = pick_device(device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched else 1)
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(
                backend,
                store=(store := _attempt_store()),
                rank=int(os.environ["RANK"]),
                world_size=env_world,
                device_id=dev if dev.type == "cuda" else None,
                timeout=timedelta(seconds=seconds),
            )
            global _progress_store
            _progress_store = store
            # groups made later (device meshes, pipeline groups) take torch's default timeout
            # (30 min for gloo), not the default group's: make it this job's
            from torch.distributed import distributed_c10d

            for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
                if isinstance(getattr(distributed_c10d, name, None), timedelta):
                    setattr(distributed_c10d, name, timedelta(seconds=seconds))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            atexit.register(_destroy)  # ours to close: NCCL warns of leaked resources otherwise
    elif dev.type == "cuda" and "nccl" not in dist.get_backend():
        raise ValueError(
            f"the process group was created with backend {dist.get_backend()!r}, which cannot "
            f"reduce tensors on {dev}; create it with 'cpu:gloo,cuda:nccl' or pass device='cpu'"
        )
    return Context(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=dist.get_backend(),
    )


def collective_timeout(timeout: float | None = None) -> float:
    """The collective timeout in seconds: ``timeout``, else ``MESHWISE_TIMEOUT``, else 600."""
    value: Any = timeout if timeout is not None else os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"timeout={value!r} is invalid: give the seconds a collective may wait, > 0 (e.g. 600)")
    return seconds


_progress_store: Any = None


def mark_progress(rank: int, step: int) -> None:
    """Note in the job's store that ``rank`` began ``step`` (for the message if a collective
    times out). Only under a launcher's store; costs one store write a step."""
    if _progress_store is not None:
        _progress_store.set(f"progress/{rank}", str(step))


def progress(world: int) -> dict[int, int] | None:
    """The step each rank last began, from the store (None without one or if it fails)."""
    if _progress_store is None:
        return None
    try:
        return {r: int(_progress_store.get(f"progress/{r}")) for r in range(world)
                if _progress_store.check([f"progress/{r}"])}
    except Exception:  # the store's host may be gone with the failed job
        return None


def collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that timed out or lost a peer (gloo, NCCL)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        w in text for w in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                            "communicator was aborted"))


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def match_layouts(params: list[torch.nn.Parameter]) -> None:
    """Give each split weight's gradient the weight's own layout (a row-parallel embedding's
    comes back whole), so that optimizers and sums see shards that match."""
    for p in params:
        if p.grad is not None and hasattr(p.grad, "placements") and p.grad.placements != p.placements:
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)


def sum_gradients(params: list[torch.nn.Parameter], group: Any, device: torch.device) -> None:
    """All-reduce (sum) the gradients of ``params`` over ``group`` in one flat fp32 buffer.

    A DTensor's gradient contributes its local shard. A parameter without a gradient sends
    zeros and a flag, so every rank sends the same layout; it gets one afterwards only if
    another rank had one (and stays without if none did).
    """
    match_layouts(params)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    grads = [None if p.grad is None else p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
             for p in params]
    flags = torch.tensor([float(g is not None) for g in grads], device=device)
    flat = torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1).float() for g, t in zip(grads, local)]
                     + [flags])  # summed in fp32, whatever the parameters' dtype
    dist.all_reduce(flat, group=group)
    offset = 0
    for p, g, t, flag in zip(params, grads, local, flat[-len(params):].tolist()):
        part = flat[offset:offset + t.numel()]
        offset += t.numel()
        if not flag:
            continue
        if g is not None:
            g.copy_(part.view_as(g))
        elif hasattr(p, "to_local"):  # this replica had no rows (an uneven last batch): the others' sum
            from torch.distributed.tensor import DTensor

            p.grad = DTensor.from_local(part.view_as(t).to(p.dtype), p.device_mesh, p.placements, run_check=False)
        else:
            p.grad = part.view_as(p).to(p.dtype)


@contextlib.contextmanager
def quiet_gathers() -> Iterator[None]:
    """Silence DTensor's note that gathering a 2-D sharded tensor (FSDP over tensor-parallel
    shards) takes two all-gathers: true, expected, and of no use to the user."""
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
