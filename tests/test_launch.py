"""The launcher: one script, three ways to run it; concurrency; failures; bad arguments."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

import meshwise as mw
from meshwise import cli

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "scripts", "train_tiny.py")
BIN = os.path.dirname(sys.executable)
DEADLINE = 90  # seconds for any one launched job; a hang fails the test, never the suite


def start(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(proc: subprocess.Popen, deadline: float = DEADLINE) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} still running after {deadline} s (killed):\n{err[-3000:]}")
    return proc.returncode, out, err


def params(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_script_under_meshwise_run_torchrun_two_hosts_and_python(tmp_path) -> None:
    """All at once: two local meshwise runs (each picks its own loopback port, so they do
    not collide), torchrun, a two-host job (both hosts on loopback) and plain python."""
    runs = [start(f"{BIN}/meshwise", "run", "--nproc", "2", SCRIPT, str(tmp_path / f"mw{i}.pt")) for i in range(2)]
    torchrun = start(f"{BIN}/torchrun", "--standalone", "--nproc-per-node", "2", SCRIPT, str(tmp_path / "tr.pt"))
    endpoint = f"127.0.0.1:{free_port()}"
    hosts = [start(f"{BIN}/meshwise", "run", "--nnodes", "2", "--node-rank", str(r), "--nproc", "1",
                   "--rdzv-endpoint", endpoint, SCRIPT, str(tmp_path / "hosts.pt")) for r in (1, 0)]
    plain = start(sys.executable, SCRIPT, str(tmp_path / "py.pt"))
    for proc in [*runs, torchrun, *hosts, plain]:
        code, out, err = finish(proc)
        assert code == 0, f"{proc.args}:\n{err[-3000:]}"
    report = json.loads(out.strip().splitlines()[-1])  # the plain run's
    assert report["world"] == 1 and report["plan"] == "dp=1" and report["steps"] == 8

    mw0, mw1, tr, hosts, py = (params(tmp_path / f) for f in ("mw0.pt", "mw1.pt", "tr.pt", "hosts.pt", "py.pt"))
    for name in mw0:
        assert all(torch.equal(mw0[name], other[name]) for other in (mw1, tr, hosts)), name
        # dp=2 vs one process: the same update up to summation order (fp32)
        torch.testing.assert_close(mw0[name], py[name], rtol=0, atol=1e-5)


def test_plan_flag_sets_world_and_plan(tmp_path) -> None:
    code, out, err = finish(start(f"{BIN}/meshwise", "run", "--plan", "dp=2,microbatches=2", "--device", "cpu",
                                  SCRIPT, str(tmp_path / "p.pt")))
    assert code == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["world"] == 2 and report["plan"] == "dp=2,microbatches=2"


def test_a_failing_rank_stops_the_job_reports_once_and_leaves_nothing(tmp_path) -> None:
    token = uuid.uuid4().hex  # marks this job's processes in /proc
    begin = time.monotonic()
    code, out, err = finish(start(f"{BIN}/meshwise", "run", "--nproc", "2", SCRIPT, str(tmp_path / token), "1"), 60)
    elapsed = time.monotonic() - begin
    assert code != 0
    assert elapsed < 30, f"the job took {elapsed:.1f} s to fail"
    assert err.count("planted failure on rank 1 at step 3") == 2, err  # traceback's last line + summary line
    assert err.count("Traceback (most recent call last)") == 1, err
    assert "rank 1 failed" in err
    time.sleep(0.5)
    assert not _processes_with(token), "worker processes were left running"


def test_a_stalled_rank_fails_the_job_within_the_timeout_and_is_named() -> None:
    stall = os.path.join(HERE, "scripts", "stall.py")  # rank 1 sleeps for an hour before step 3
    begin = time.monotonic()
    code, out, err = finish(start(f"{BIN}/meshwise", "run", "--nproc", "2", "--timeout", "3", stall), 60)
    elapsed = time.monotonic() - begin
    assert code != 0 and elapsed < 30, (code, elapsed)
    assert ("rank 0: step 3 failed in the gradient all-reduce (plan dp=2), with the collective timeout at 3 s: "
            "rank(s) [1] had not begun step 3") in err, err[-3000:]
    time.sleep(0.5)
    assert not _processes_with(stall), "worker processes were left running"


@pytest.mark.parametrize(("mode", "code", "words"), [
    ("exit3", 3, ["rank 1 failed with exit code 3", "SystemExit: 3"]),
    ("msg", 1, ["rank 1 failed with exit code 1", "SystemExit: bad config"]),
    ("kill", 137, ["rank 1 failed with exit code 137", "SIGKILL"]),
])
def test_the_rank_that_caused_a_failure_is_blamed_not_its_victims(mode: str, code: int, words: list[str]) -> None:
    rc, out, err = finish(start(f"{BIN}/meshwise", "run", "--nproc", "2", os.path.join(HERE, "scripts", "fail_modes.py"),
                                mode), 60)
    assert rc == code, err
    for word in words:
        assert word in err
    assert err.count("meshwise: rank") == 1 and "rank 0 failed" not in err


def _start_sleepy(token: str) -> subprocess.Popen:
    proc = start(f"{BIN}/meshwise", "run", "--nproc", "2", os.path.join(HERE, "scripts", "sleepy.py"), token)
    end = time.monotonic() + 60
    seen = b""
    while time.monotonic() < end:  # rank 0 prints "ready" once every rank has joined
        readable, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        if readable:
            chunk = os.read(proc.stdout.fileno(), 4096)  # raw: nothing waits unseen in a buffer
            seen += chunk
            if b"ready" in seen:
                return proc
            if not chunk:
                break
    os.killpg(proc.pid, 9)
    pytest.fail(f"the job did not start: {proc.stderr.read()[-2000:] if proc.poll() is not None else 'timeout'}")


def test_killing_the_launcher_leaves_no_worker_behind() -> None:
    token = uuid.uuid4().hex
    proc = _start_sleepy(token)
    assert len(_processes_with(token)) == 3  # the launcher and two workers
    proc.kill()  # SIGKILL: the launcher cannot clean up; the workers must go by themselves
    proc.wait(10)
    end = time.monotonic() + 10
    while _processes_with(token) and time.monotonic() < end:
        time.sleep(0.1)
    assert not _processes_with(token)


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list listening sockets")
def test_a_local_job_listens_on_loopback_only() -> None:
    """The agent's stores and the workers' gloo sockets: nothing reachable from the network."""
    token = uuid.uuid4().hex
    proc = _start_sleepy(token)
    try:
        pids = set(_processes_with(token))
        listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        ours = [line for line in listening if any(f"pid={pid}," in line for pid in pids)]
        assert len(ours) >= 3, listening  # the rendezvous store, and a gloo socket per worker
        assert all(line.split()[3].startswith("127.0.0.1:") for line in ours), ours
    finally:
        proc.send_signal(signal.SIGINT)
        finish(proc, 30)


def test_ctrl_c_stops_every_worker_and_says_so_once() -> None:
    token = uuid.uuid4().hex
    proc = _start_sleepy(token)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc, 30)
    assert code == 130
    assert "meshwise: stopped by SIGINT; all workers were stopped" in err and "Traceback" not in err
    assert not _processes_with(token)


def _processes_with(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.parametrize(("argv", "words"), [
    (["run", "--nproc", "0", SCRIPT], ["nproc=0", ">= 1"]),
    (["run", "--plan", "dp=two", SCRIPT], ["dp='two'", "integer"]),
    (["run", "--plan", "dp=4", "--nproc", "2", SCRIPT], ["needs 4 processes", "nproc=2"]),
    (["run", "--nproc", "2", "no_such_script.py"], ["no_such_script.py", "not found"]),
    (["run", "--nnodes", "2", SCRIPT], ["--rdzv-endpoint"]),
    (["run", "--nnodes", "2", "--rdzv-endpoint", "hostonly", SCRIPT], ["HOST:PORT"]),
    (["demo", "--epochs", "0"], ["--epochs=0"]),
    (["demo", "--batch-size", "0"], ["--batch-size=0"]),
    (["run", "--nproc", "2", "-m"], ["-m needs a module name"]),
    (["launch", SCRIPT], ["invalid choice"]),
    (["run", "--device", "tpu", SCRIPT], ["invalid choice", "tpu"]),
    (["run", "--timeout", "0", SCRIPT], ["--timeout 0", "> 0"]),
    (["export", "no_such_checkpoint", "out.safetensors"], ["no_such_checkpoint", "no complete meshwise checkpoint"]),
])
def test_bad_arguments_are_one_line_and_exit_2(argv: list[str], words: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err


@pytest.mark.parametrize(("argv", "script", "args"), [
    (["run", "-m", "pkg.train", "--lr", "3"], "-m", ["pkg.train", "--lr", "3"]),
    (["run", "--nproc", "2", "--plan", "dp=2", "-m", "pkg.train"], "-m", ["pkg.train"]),
    (["run", "--nproc", "2", "train.py", "-m", "x"], "train.py", ["-m", "x"]),  # the script's own -m
    (["run", "--nproc", "2", "--", "-m", "pkg.train"], "-m", ["pkg.train"]),
])
def test_run_takes_a_module_with_dash_m(argv: list[str], script: str, args: list[str]) -> None:
    ns = cli._parser().parse_args(cli._module_as_script(argv))
    assert (ns.script, ns.args) == (script, args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda_is_a_bad_argument(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--device", "cuda", SCRIPT])
    assert info.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_launch_checks_the_plan_against_nproc_before_starting() -> None:
    with pytest.raises(ValueError, match="needs 4 processes.*nproc=2"):
        mw.launch(square_plus_rank, nproc=2, args=(1,), plan="dp=4")


def square_plus_rank(k: int) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([dist.get_rank()])
    dist.all_reduce(t)
    return k * k + int(t)


def fail_on_rank_1() -> None:
    if os.environ["RANK"] == "1":
        raise KeyError("rank 1 has no such key")
    time.sleep(60)  # rank 0 would wait; the agent must stop it


def test_launch_returns_rank_0s_result() -> None:
    assert mw.launch(square_plus_rank, nproc=2, args=(3,)) == 9 + 1


def test_launch_raises_the_workers_exception_and_stops_the_others() -> None:
    begin = time.monotonic()
    with pytest.raises(KeyError, match="rank 1 has no such key") as info:
        mw.launch(fail_on_rank_1, nproc=2)
    assert time.monotonic() - begin < 30
    assert any("raised on rank 1" in note for note in getattr(info.value, "__notes__", []))


def test_max_restarts_restarts_the_job_after_a_failure() -> None:
    # Also guards against stale rendezvous keys: a restarted worker must not read the
    # previous attempt's addresses (gloo "Connection refused") or barrier counts (a hang).
    code, out, err = finish(start(f"{BIN}/meshwise", "run", "--nproc", "2", "--max-restarts", "1",
                                  os.path.join(HERE, "scripts", "fail_once.py")), 60)
    assert code == 0, err[-3000:]
    assert "finished in attempt 1 after 2 steps" in out


@pytest.mark.parametrize("talk", ["default", "--quiet", "--verbose"])
def test_quiet_and_verbose_and_other_ranks_are_marked(talk: str, tmp_path) -> None:
    script = os.path.join(HERE, "scripts", "chatty.py")
    flags = [] if talk == "default" else [talk]
    code, stdout, stderr = finish(start(os.path.join(BIN, "meshwise"), "run", "--nproc", "2", *flags, "--run-dir",
                                        str(tmp_path / "run"), script))
    assert code == 0, stderr
    lines = stdout.splitlines()
    warned = [line for line in stderr.splitlines() if "rank one is odd" in line]
    assert warned and all(line.startswith("[rank 1] ") for line in warned), stderr  # always shown, marked
    if talk == "--verbose":
        assert "[rank 0] hello from rank 0" in lines and "[rank 1] hello from rank 1" in lines
    else:
        assert "hello from rank 0" in lines  # rank 0 speaks plainly
    if talk == "default":
        assert "[rank 1] hello from rank 1" in lines
    assert ("meshwise: plan pp=2: 2 pipeline stages, 4 micro-batches" in stdout) == (talk != "--quiet")
    if talk == "--quiet":
        assert not any("rank 1" in line for line in lines) and "meshwise:" not in stdout + stderr
    else:
        assert "meshwise: run recorded in" in stderr


def test_in_a_terminal_rank_0_draws_a_progress_bar_under_the_scripts_lines(tmp_path) -> None:
    """The training bar is drawn only on a terminal: run the job on a pseudo-terminal."""
    import pty

    script = os.path.join(HERE, "..", "examples", "quickstart.py")
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal 100 columns wide, then the job
        os.execv("/bin/sh", ["sh", "-c", f"stty cols 100 rows 40; exec {BIN}/meshwise run --nproc 2 --run-dir "
                                         f"{tmp_path / 'run'} {script}"])
    out = bytearray()
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 1.0)
        try:
            chunk = os.read(fd, 65536) if ready else b""
        except OSError:  # the job ended: the terminal closed
            break
        out += chunk
    else:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "epoch 0:" in text and "/32 [" in text and "loss=" in text, text[-2000:]  # the bar: steps of 32, loss
    # every line the script printed stands whole after the bar was cleared from it
    import re

    printed = [([q for q in part.split("\r") if q.strip()] or [""])[-1].strip() for part in text.split("\n")]
    assert [p[:7] for p in printed if re.fullmatch(r"epoch \d: loss \d\.\d{4}", p)] == [f"epoch {e}" for e in range(5)]
