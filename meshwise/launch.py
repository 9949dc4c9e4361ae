"""Start workers: ``meshwise run`` for scripts, ``meshwise.launch`` for functions.

Both are torch's elastic agent (``torch.distributed.launcher``, the engine behind
``torchrun``): it starts the workers, sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
MASTER_PORT, watches them, and stops every worker as soon as one fails. What meshwise
adds:

* local runs rendezvous on loopback on a port the OS picks (``127.0.0.1:0``), so two
  runs on one machine never collide; multi-host runs use a static rendezvous at
  ``--rdzv-endpoint`` with ``--node-rank`` deciding which host serves it;
* one CPU thread budget split between local workers (cores // nproc each);
* a failure is reported once: the first rank that raised, with its traceback, not one
  traceback per rank and not the agent's log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from meshwise.dist import DEVICE_ENV, PLAN_ENV
from meshwise.plan import Plan

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
LAUNCHER_PID_ENV = "MESHWISE_LAUNCHER_PID"


@dataclass(frozen=True)
class Job:
    """Where and how many workers run; the launcher's half of the configuration."""

    nproc: int = 1
    """Workers on this host."""
    nnodes: int = 1
    """Hosts in the job; each runs ``meshwise run`` with the same arguments."""
    node_rank: int = 0
    """This host's index, 0..nnodes-1; host 0 serves the rendezvous."""
    rdzv_endpoint: str | None = None
    """HOST:PORT of host 0's rendezvous; required when nnodes > 1."""
    max_restarts: int = 0
    """Times the agent restarts all workers after a failure before giving up."""

    def __post_init__(self) -> None:
        for name, least in (("nproc", 1), ("nnodes", 1), ("node_rank", 0), ("max_restarts", 0)):
            value = getattr(self, name)
            if type(value) is not int or value < least:
                raise ValueError(f"{name.replace('_', '-')}={value!r} is invalid: it must be an integer >= {least}")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node-rank={self.node_rank} is invalid for nnodes={self.nnodes}: use 0..{self.nnodes - 1}")
        if self.nnodes > 1:
            if not self.rdzv_endpoint:
                raise ValueError(f"nnodes={self.nnodes} needs --rdzv-endpoint HOST:PORT of host 0, reachable by every host")
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rdzv-endpoint={self.rdzv_endpoint!r} is invalid: write HOST:PORT, e.g. 10.0.0.1:29500")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


class WorkerFailed(RuntimeError):
    """A worker failed; ``rank``, ``exitcode`` and the worker's ``traceback`` say how."""

    def __init__(self, rank: int, exitcode: int, trace: str, others: int) -> None:
        self.rank, self.exitcode, self.traceback, self.others = rank, exitcode, trace, others
        lines = trace.strip().splitlines()
        what = f": {lines[-1]}" if lines else ""
        also = f" ({others} other rank(s) stopped)" if others else ""
        body = f"\n{trace}".rstrip() if len(lines) > 1 else ""
        super().__init__(f"rank {rank} failed with exit code {exitcode}{also}{what}{body}")


def _config(job: Job, run_dir: str) -> Any:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    if job.nnodes == 1:
        backend, endpoint, rdzv = "c10d", "127.0.0.1:0", {"is_host": True}
        local_addr = "127.0.0.1"
    else:
        backend, endpoint, rdzv = "static", job.rdzv_endpoint, {"rank": job.node_rank}
        local_addr = None
    # shutdown_timeout (seconds between SIGTERM and SIGKILL for workers) is newer than torch 2.11
    newer = {"shutdown_timeout": 5} if "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)} else {}
    return LaunchConfig(
        min_nodes=job.nnodes,
        max_nodes=job.nnodes,
        nproc_per_node=job.nproc,
        run_id=f"meshwise-{uuid.uuid4().hex[:12]}" if job.nnodes == 1 else "meshwise",
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs={**rdzv, "timeout": 300},
        max_restarts=job.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        local_addr=local_addr,
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(run_dir, "logs")),
        **newer,
    )


LOOPBACK = ("127.0.0.1", "localhost")


@contextmanager
def _loopback_stores() -> Iterator[None]:
    """While a one-host job runs, the stores the agent serves listen on loopback only.

    torch's elastic agent opens its rendezvous and worker stores on every interface, even
    for an address of 127.0.0.1: anyone on the network could reach them. Here each store
    served at a loopback address is handed a socket bound to 127.0.0.1 (TCPStore's
    ``master_listen_fd``)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    base = dist.TCPStore

    class LoopbackStore(base):  # type: ignore[misc, valid-type]
        def __init__(self, host_name: str, port: int, *args: Any, **kwargs: Any) -> None:
            is_master = kwargs.get("is_master", args[1] if len(args) > 1 else False)
            if is_master and host_name in LOOPBACK and kwargs.get("master_listen_fd") is None:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", port))
                listener.listen(1024)
                # the store takes the socket over, and closes it
                port, kwargs["master_listen_fd"] = listener.getsockname()[1], listener.detach()
            super().__init__(host_name, port, *args, **kwargs)

    dist.TCPStore = LoopbackStore  # type: ignore[misc]
    c10d_rendezvous_backend.TCPStore = LoopbackStore  # type: ignore[attr-defined]
    try:
        yield
    finally:
        dist.TCPStore = base  # type: ignore[misc]
        c10d_rendezvous_backend.TCPStore = base  # type: ignore[attr-defined]


@contextmanager
def _environment(job: Job, plan: Plan | str | None, device: str | None) -> Iterator[str]:
    """Set the variables workers inherit, quiet the agent's log, clean up afterwards."""
    saved = dict(os.environ)
    run_dir = tempfile.mkdtemp(prefix="meshwise-launch-")
    import torch.distributed.launcher.api  # noqa: F401  (creates the agent's loggers, each with its own level)

    agent_logs = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
                  if name.startswith("torch.distributed.elastic")]
    saved_levels = [log.level for log in agent_logs]
    try:
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # workers' parent: see die_with_parent
        os.environ.pop(PLAN_ENV, None)  # a launch nested in a launched worker must not inherit its plan
        if plan is not None:
            os.environ[PLAN_ENV] = "auto" if plan == "auto" else str(plan if isinstance(plan, Plan) else Plan.parse(plan))
        if device is not None:
            os.environ[DEVICE_ENV] = device
        if "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // job.nproc))
        if not os.environ.get("MESHWISE_VERBOSE"):
            for log in agent_logs:
                log.setLevel(logging.CRITICAL)
        with _loopback_stores() if job.nnodes == 1 else nullcontext():
            yield run_dir
    finally:
        for log, level in zip(agent_logs, saved_levels):
            log.setLevel(level)
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(run_dir, ignore_errors=True)


# Errors a rank raises because a peer went away: a consequence, not the cause.
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "DistNetworkError", "DistBackendError")


def _first_failure(error: Any) -> WorkerFailed:
    """The rank that caused the failure, chosen once from all the failed ranks.

    In order: a rank that raised (its own error, earliest first); one that exited with a
    non-zero code; one killed by a signal the agent does not send (SIGKILL from the
    out-of-memory killer, SIGSEGV); a rank whose error only says a peer went away; last,
    ranks the agent stopped with SIGTERM.
    """
    failures = error.failures  # {rank: ProcessFailure}

    def severity(item: tuple[int, Any]) -> tuple[int, float, int]:
        rank, failure = item
        info = _read_error_file(failure.error_file)
        stamp = info.get("meshwise_time")
        when = float(stamp) if stamp is not None else float("inf")
        if info and not any(marker in (info.get("traceback") or "") for marker in _SECONDARY):
            return (0, when, rank)
        if failure.exitcode > 0 and not info:
            return (1, when, rank)
        if failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM:
            return (2, when, rank)
        return (3 if info else 4, when, rank)

    rank, failure = min(failures.items(), key=severity)
    info = _read_error_file(failure.error_file)
    trace = info.get("traceback") or ""
    code = failure.exitcode
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # real-time signals have no name
            name = f"signal {-code}"
        trace = trace or f"killed by signal {name} (the out-of-memory killer, a crash, or killed from outside)"
        code = 128 - code
    elif not trace:
        trace = f"exited with code {code} without a Python exception (sys.exit or os._exit)"
    return WorkerFailed(rank, code, trace, len(failures) - 1)


def _read_error_file(path: str | None) -> dict[str, Any]:
    try:
        with open(path or "") as f:
            message = json.load(f)["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(message, dict):
        return {}
    extra = message.get("extraInfo", {})
    return {"traceback": extra.get("py_callstack"), "meshwise_time": extra.get("meshwise_time")}


def record_failure(exc: BaseException, skip: Callable[[str], bool] = lambda filename: False) -> None:
    """Write a worker's exception where the agent looks for it (its error file).

    Leading traceback frames whose file name ``skip`` accepts (the launcher's own) are left out.
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and skip(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    trace = "".join(traceback.format_exception(type(exc), exc, tb))
    data = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {"py_callstack": trace, "timestamp": str(int(time.time())), "meshwise_time": time.time()},
        }
    }
    # whole or not at all: the agent reads the file as soon as it exists, and an empty one made it
    # crash (JSONDecodeError) while a dying rank was still writing
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w") as f:
        json.dump(data, f)
    os.replace(partial, path)


def run_command(argv: list[str], job: Job, *, plan: Plan | str | None = None, device: str | None = None,
                trace: str | None = None) -> int:
    """Run ``python ARGV...`` on ``job.nproc`` local workers; the exit code of the job.

    ``trace=DIR`` makes pipelined engines record their timeline; the per-rank files are
    merged into DIR/trace.json and DIR/trace.png when the job succeeds."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    with _environment(job, plan, device) as run_dir:
        if trace is not None:
            from meshwise.pipeline import TRACE_ENV

            os.environ[TRACE_ENV] = os.path.abspath(trace)
        try:
            elastic_launch(_config(job, run_dir), sys.executable)("-m", "meshwise.worker", *argv)
        except ChildFailedError as error:
            failed = _first_failure(error)
            print(f"meshwise: {failed}", file=sys.stderr)
            return failed.exitcode
        except SignalException as stop:  # Ctrl-C or a kill of the launcher: workers are stopped by the agent
            print(f"meshwise: stopped by {stop.sigval.name}; all workers were stopped", file=sys.stderr)
            return 128 + int(stop.sigval)
        except KeyboardInterrupt:  # Ctrl-C before the agent installed its handler
            print("meshwise: stopped by SIGINT", file=sys.stderr)
            return 130
    if trace is not None:
        from meshwise import trace as timeline

        figures = timeline.merge(trace, title=f"plan {plan}" if plan else "")
        from meshwise.observe import note

        note(f"meshwise: {timeline.summary_line(figures)}" if figures else
             f"meshwise: --trace {trace}: no pipeline timeline was recorded (the plan has no pipeline, pp=1)")
    return 0


def launch(
    fn: Callable[..., Any],
    nproc: int = 1,
    args: tuple[Any, ...] = (),
    *,
    plan: Plan | str | None = None,
    device: str | None = None,
) -> Any:
    """Run ``fn(*args)`` on ``nproc`` local workers and return rank 0's result.

    ``fn`` must be picklable (defined at module top level): workers are started fresh
    (spawn), so a calling script needs the ``if __name__ == "__main__":`` guard. If a
    worker raises, every worker is stopped and the first exception is raised here, with
    the worker's traceback attached as a note.
    """
    job = Job(nproc=nproc)
    if not callable(fn):
        raise TypeError(f"launch expects a function, got {type(fn).__name__}")
    if plan is not None:
        plan = plan if isinstance(plan, Plan) else Plan.parse(plan)
        if plan.world_size != nproc:
            raise ValueError(f"plan {plan} needs {plan.world_size} processes but launch was given nproc={nproc}; "
                             f"make them equal")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    with _environment(job, plan, device) as run_dir:
        try:
            results = elastic_launch(_config(job, run_dir), _call)(fn, tuple(args), run_dir)
        except ChildFailedError as error:
            failed = _first_failure(error)
            original = _load_exception(run_dir, failed.rank)
            if original is None:
                raise failed from None
            original.add_note(f"(raised on rank {failed.rank} of {nproc}; worker traceback:)\n{failed.traceback}")
            raise original from None
    return results[0]


def _call(fn: Callable[..., Any], args: tuple[Any, ...], run_dir: str) -> Any:
    """A worker of ``launch``: run fn; on failure leave the exception for the parent and exit 1.

    Exiting by SystemExit (not by re-raising) keeps the worker from printing its own
    traceback: the parent reports it once.
    """
    die_with_parent()
    try:
        return fn(*args)
    except Exception as exc:
        record_failure(exc)
        try:
            with open(os.path.join(run_dir, f"exception-{os.environ.get('RANK', '0')}.pkl"), "wb") as f:
                pickle.dump(exc, f)
        except Exception:  # an exception that does not pickle is reported by its traceback
            pass
        raise SystemExit(1) from None
    finally:
        leave_group()


def _load_exception(run_dir: str, rank: int) -> BaseException | None:
    # The file was written by our own worker into a private (0700) temporary directory.
    try:
        with open(os.path.join(run_dir, f"exception-{rank}.pkl"), "rb") as f:
            exc = pickle.load(f)
    except Exception:
        return None
    return exc if isinstance(exc, BaseException) else None


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its launcher dies, so no worker outlives it.

    torch's agent starts workers in sessions of their own, out of reach of a signal to
    the launcher's process group; without this, ``kill -9`` of ``meshwise run`` leaves
    them running. A launcher that died before this call (during the worker's start-up)
    is caught by comparing the parent with the launcher's pid. SIGKILL, not SIGTERM: a
    script's own SIGTERM handler (logging libraries install them) must not keep an
    orphan alive.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and os.getppid() != int(launcher):
        os._exit(1)


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
