"""What a run leaves behind and shows: its run directory and rank 0's progress bar.

Only rank 0 writes shared files and prints; other ranks get no-op stand-ins, so calling
code needs no ``if rank == 0`` of its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any


def write_json(path: str, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` whole: a temporary name, then a rename, so a
    reader never sees half of it."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


class RunDir:
    """A demo's summary in its run directory (``summary.json``), written on rank 0 only
    (``enabled``); the engine records the steps themselves (``Recorder``)."""

    def __init__(self, path: str, *, enabled: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.enabled = enabled
        if enabled:
            os.makedirs(self.path, exist_ok=True)

    def summary(self, **summary: Any) -> None:
        if self.enabled:
            write_json(os.path.join(self.path, "summary.json"), summary)


RUNS_ENV = "MESHWISE_RUNS"
"""Where run directories go by default (``runs`` in the working directory)."""


def default_run_dir(name: str, root: str | None = None, *, by_job: bool = True) -> str:
    """``runs/NAME-YYYYmmdd-HHMMSS-XXXX`` (under ``MESHWISE_RUNS`` if set): XXXX keeps two
    runs started in one second apart. Under a launcher (torchrun) the job's id replaces
    time and XXXX, so that every rank, and a restarted job, picks the same directory."""
    root = root or os.environ.get(RUNS_ENV) or "runs"
    job = os.environ.get("TORCHELASTIC_RUN_ID", "") if by_job else ""
    if job and job != "none":
        return os.path.join(root, f"{name}-{job}")
    return os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")


class Progress:
    """A progress bar on stderr on rank 0 (``enabled``); silent elsewhere and under --quiet.

    ``write`` prints a line above the bar without breaking it.
    """

    def __init__(self, total: int | None, *, enabled: bool, desc: str = "") -> None:
        self._bar = None
        enabled = enabled and not quiet()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
        self.enabled = enabled

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


RUN_DIR_ENV = "MESHWISE_RUN_DIR"
"""The run directory ``meshwise run`` made for this job; every engine records into it."""
QUIET_ENV, VERBOSE_ENV = "MESHWISE_QUIET", "MESHWISE_VERBOSE"
"""Set to 1 by ``--quiet`` (no progress bars, no meshwise notes) and ``--verbose``."""
TENSORBOARD_ENV = "MESHWISE_TENSORBOARD"
"""Set to 1 by ``--tensorboard``: metrics also go to RUN_DIR/tensorboard as event files."""
VERIFY_ENV = "MESHWISE_VERIFY"
"""``DIR:STEPS``, set by ``meshwise verify`` for its runs: record into DIR, stop after STEPS steps."""
PROGRESS_ENV = "MESHWISE_PROGRESS"
"""Set to 1 by ``meshwise run``: rank 0 shows a bar of training steps (demos have their own)."""


def quiet() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


def note(text: str) -> None:
    """A meshwise note on stdout (plans chosen, resumes, measurements); silent under --quiet."""
    if not quiet():
        print(text, flush=True)


def host_facts() -> dict[str, Any]:
    """This host and its devices, for a run's record."""
    import platform
    import socket

    import torch

    try:
        from importlib.metadata import version

        ours = version("meshwise")
    except Exception:  # noqa: BLE001  (run from a source tree without installing)
        ours = "unknown"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "meshwise": ours, "cpus": len(os.sched_getaffinity(0)),
            "threads_per_process": torch.get_num_threads(), "gpus": gpus}


_statm: int | None = None


def _memory_mb(device: Any) -> float:
    """Peak CUDA memory allocated so far (GPU; the user's own peak statistics are left
    alone), else this process's resident memory now."""
    import torch

    global _statm
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if _statm is None:
        _statm = os.open("/proc/self/statm", os.O_RDONLY)  # kept open: read every step
    return int(os.pread(_statm, 128, 0).split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def instrument(engine: Any, run_dir: str | None, tensorboard: bool | None, predicted: dict[str, Any] | None) -> None:
    """Wrap ``engine.step`` to record the run into ``run_dir`` (default: the one ``meshwise
    run`` made), or under ``meshwise verify`` to probe it instead (meshwise.verify)."""
    verifying = os.environ.get(VERIFY_ENV)
    if verifying:
        from meshwise.verify import Probe

        engine.step = Probe(engine, verifying).wrap(engine.step)
        return
    run_dir = run_dir if run_dir is not None else os.environ.get(RUN_DIR_ENV) or None
    if run_dir and run_dir.startswith(AGREE):
        run_dir = _agreed_run_dir(run_dir[len(AGREE):], engine.is_main)
    if not run_dir:
        if tensorboard:
            raise ValueError("tensorboard=True writes into the run directory: pass run_dir=DIR (meshwise run makes one)")
        return
    board = tensorboard if tensorboard is not None else os.environ.get(TENSORBOARD_ENV) == "1"
    engine.run_record = Recorder(engine, run_dir, tensorboard=board, predicted=predicted,
                                 progress=os.environ.get(PROGRESS_ENV) == "1")
    engine.step = engine.run_record.wrap(engine.step)


AGREE = "?"
"""A run directory spelled ``?ROOT`` is a new one under ROOT whose name rank 0 picks and
every rank takes (``meshwise run --nnodes N``: the hosts' launchers cannot agree on a
name by themselves; on a filesystem every host sees, all ranks record in one place)."""


def _agreed_run_dir(root: str, is_main: bool) -> str:
    """Rank 0's new directory under ``root``, on every rank (a collective), once per process."""
    import torch.distributed as dist

    chosen = [default_run_dir("run", root, by_job=False) if is_main else None]  # a fresh name: broadcast
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    os.environ[RUN_DIR_ENV] = chosen[0]  # later engines of this script record there too
    if is_main:
        note(f"meshwise: recording the run in {chosen[0]}")
    return chosen[0]


FLUSH_S = 1.0
"""Seconds between writes of the recorded lines to disk (and at exit)."""
STATE_STEPS, STATE_EVERY = 3, 100
"""Model state is measured at the first steps (the optimizer makes its state there), then
every 100 steps: walking every tensor each step costs as much as a small model's step."""


class Recorder:
    """Records an engine's steps into a run directory (see docs/report.md for the format).

    Rank 0 writes ``run.json`` (plan, mesh, stages, host, prediction) and ``metrics.jsonl``
    (loss, throughput, step time, memory per step); every rank writes ``rank-R.jsonl`` (its
    step time and memory). With ``tensorboard`` rank 0 also writes the metrics as TensorBoard
    event files; with ``progress`` it shows a bar of steps on stderr.
    """

    def __init__(self, engine: Any, path: str, *, tensorboard: bool = False, progress: bool = False,
                 predicted: dict[str, Any] | None = None) -> None:
        self.engine, self.path = engine, os.path.abspath(path)
        self.main = engine.is_main
        self.start = time.perf_counter()
        self._state, self._flushed, self._count = 0.0, 0.0, 0
        os.makedirs(self.path, exist_ok=True)
        self._rank_file = open(os.path.join(self.path, f"rank-{engine.rank}.jsonl"), "a")  # noqa: SIM115
        self._metrics = self._board = self._bar = self._stdout = None
        if self.main:
            write_json(os.path.join(self.path, "run.json"), self._facts(predicted))
            self._metrics = open(os.path.join(self.path, "metrics.jsonl"), "a")  # noqa: SIM115
            if tensorboard:
                self._board = _tensorboard(os.path.join(self.path, "tensorboard"))
            if progress and not quiet():
                from tqdm import tqdm

                self._bar = tqdm(desc="training", unit="step", file=sys.stderr, dynamic_ncols=True, leave=False,
                                 disable=None)
                if not self._bar.disable:  # the script's own prints go above the bar, not into it
                    self._stdout, sys.stdout = sys.stdout, _AboveBar(sys.stdout, self._bar)
        import atexit

        atexit.register(self.close)  # the bar cleared, the last events and lines written

    def wrap(self, step: Any) -> Any:
        from meshwise import data

        def recorded(batch: Any) -> float:
            t0 = time.perf_counter()
            loss = step(batch)
            now = time.perf_counter()
            rows = self.engine.last_rows
            first = data.first_tensor(data.unpack(batch)[0])
            tokens = rows * first.shape[1] if first is not None and first.dim() >= 2 and not (
                first.is_floating_point() or first.is_complex()) else None
            self._record(loss, rows, tokens, now - t0, now, data.position(batch))
            return loss

        return recorded

    def _record(self, loss: float, rows: int, tokens: int | None, seconds: float, now: float,
                position: tuple[int, int, int] | None) -> None:
        engine = self.engine
        self._count += 1  # steps recorded here: a resumed engine's count starts past zero
        if self._count <= STATE_STEPS or self._count % STATE_EVERY == 0:  # settled once the optimizer has state
            self._state = sum(engine.state_bytes().values()) / 2**20
        state = self._state
        mine = {"step": engine.steps, "step_s": seconds, "memory_mb": _memory_mb(engine.device), "state_mb": state}
        self._rank_file.write(json.dumps(mine) + "\n")
        if self.main:
            self._main_record(loss, rows, tokens, seconds, now, position, mine["memory_mb"], state)
        if now - self._flushed >= FLUSH_S:  # whole lines, at most a second behind: a live run can be read
            self._flushed = now
            self._rank_file.flush()
            if self._metrics is not None:
                self._metrics.flush()

    def _main_record(self, loss: float, rows: int, tokens: int | None, seconds: float, now: float,
                     position: tuple[int, int, int] | None, memory_mb: float, state: float) -> None:
        engine = self.engine
        record = {"step": engine.steps, "time_s": now - self.start, "loss": loss, "rows": rows, "tokens": tokens,
                  "step_s": seconds, "samples_per_s": rows / seconds,
                  "tokens_per_s": tokens / seconds if tokens else None,
                  "memory_mb": memory_mb, "state_mb": state}
        self._metrics.write(json.dumps(record) + "\n")  # type: ignore[union-attr]
        if self._board is not None:
            for key in ("loss", "samples_per_s", "tokens_per_s", "step_s", "memory_mb", "state_mb"):
                if record[key] is not None:
                    self._board.add_scalar(key, record[key], engine.steps)
        if self._bar is not None:
            if position is not None:
                self._bar.total, self._bar.n = position[2], position[1]
                self._bar.set_description(f"epoch {position[0]}", refresh=False)
            else:
                self._bar.n += 1
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self._bar.refresh()

    def _facts(self, predicted: dict[str, Any] | None) -> dict[str, Any]:
        engine, plan = self.engine, self.engine.plan
        stages = None
        part = getattr(engine, "partition", None)
        if part is not None:
            stages = [{"stage": s, "pp_rank": s % plan.pp, "layers": [x.name for x in part.stage_layers(s)],
                       "params": sum(x.params for x in part.stage_layers(s)), "ms": part.stage_ms(s)}
                      for s in range(len(part.bounds))]
        split = getattr(engine, "tensor_plan", None)
        tensor = ({"split": len(split.sharded), "modules": len(getattr(split, "decisions", split.sharded))}
                  if split is not None else None)
        return {"command": _command(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "plan": str(plan), "world_size": engine.world_size, "mesh": plan.resolved().to_dict(),
                "layout": "rank = (dp_rank * pp + pp_rank) * tp + tp_rank", "stages": stages, "tensor": tensor,
                "host": {**host_facts(), "device": engine.device.type}, "predicted": predicted}

    def close(self) -> None:
        if self._stdout is not None:
            sys.stdout.flush()
            sys.stdout, self._stdout = self._stdout, None
        for handle in (self._rank_file, self._metrics, self._board, self._bar):
            if handle is not None:
                handle.close()
        self._rank_file = self._metrics = self._board = self._bar = None


class _AboveBar:
    """rank 0's stdout while a progress bar is drawn: whole lines, written above the bar."""

    def __init__(self, stream: Any, bar: Any) -> None:
        self._stream, self._bar, self._pending = stream, bar, ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, _, self._pending = self._pending.rpartition("\n")
            self._bar.clear()
            self._stream.write(lines + "\n")
            self._stream.flush()
            self._bar.refresh()
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _command() -> list[str] | None:
    argv = getattr(sys, "argv", None)
    return list(argv) if argv else None


def _tensorboard(path: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RuntimeError(
            f"--tensorboard needs the tensorboard package, which is not installed ({error}); "
            f"install it with: pip install 'meshwise[tensorboard]'") from error
    return SummaryWriter(path)


class RankStream:
    """A text stream that marks each line with the rank that wrote it: ``[rank 3] ...``."""

    def __init__(self, stream: Any, rank: int) -> None:
        import threading

        self._stream, self._prefix, self._pending = stream, f"[rank {rank}] ", ""
        self._at_start = True  # whether the next character begins a line (a flush may cut one)
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            if lines:
                out = [f"{'' if i == 0 and not self._at_start else self._prefix}{line}\n" for i, line in enumerate(lines)]
                self._stream.write("".join(out))
                self._stream.flush()  # whole lines at once, so ranks' lines do not interleave
                self._at_start = True
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._stream.write((self._prefix if self._at_start else "") + self._pending)
                self._pending, self._at_start = "", False
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def mark_ranks() -> None:
    """In a worker: lines from ranks other than 0 say which rank wrote them (all ranks'
    under --verbose); under --quiet other ranks' stdout is dropped, their warnings and
    errors (stderr) kept."""
    rank = int(os.environ.get("RANK", "0") or 0)
    verbose = os.environ.get(VERBOSE_ENV) == "1"
    if rank == 0 and not verbose:
        return
    if quiet() and rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    else:
        sys.stdout = RankStream(sys.stdout, rank)
    sys.stderr = RankStream(sys.stderr, rank)
