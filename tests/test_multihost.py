"""Two hosts on one machine: two network namespaces joined by a veth pair, each running
``meshwise run --nnodes 2 --nproc 2`` with host 0's address as the rendezvous endpoint. The
job must end where 4 local processes end, bit for bit (dp=4 on CPU: the same gloo sums).

Needs root and iproute2 (``ip netns``); elsewhere it skips with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "train_resume.py")
CLI = os.path.join(os.path.dirname(sys.executable), "meshwise")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Namespaces mw-<id>-0 (10.77.0.1) and mw-<id>-1 (10.77.0.2), removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    names = [f"mw-{tag}-0", f"mw-{tag}-1"]
    made = []
    try:
        for name in names:
            done = _ip("netns", "add", name)
            if done.returncode:
                pytest.skip(f"cannot create network namespaces here (needs root and iproute2): {done.stderr.strip()}")
            made.append(name)
        steps = [("link", "add", f"v{tag}0", "type", "veth", "peer", "name", f"v{tag}1")]
        for i, name in enumerate(names):
            steps += [("link", "set", f"v{tag}{i}", "netns", name),
                      ("-n", name, "addr", "add", f"10.77.0.{i + 1}/24", "dev", f"v{tag}{i}"),
                      ("-n", name, "link", "set", f"v{tag}{i}", "up"), ("-n", name, "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode:
                pytest.skip(f"cannot wire the namespaces (ip {' '.join(step)}): {done.stderr.strip()}")
        yield names, [f"v{tag}0", f"v{tag}1"]
    finally:
        for name in made:
            _ip("netns", "del", name)


def test_two_hosts_reach_the_parameters_of_four_local_processes(two_hosts, tmp_path) -> None:
    names, devices = two_hosts
    hosts = []
    for rank, (name, device) in enumerate(zip(names, devices)):
        # gloo finds its address from the interface, not the host name (the namespaces share it)
        env = {**os.environ, "GLOO_SOCKET_IFNAME": device, "MESHWISE_RUNS": str(tmp_path / "runs")}
        hosts.append(subprocess.Popen(
            ["ip", "netns", "exec", name, CLI, "run", "--nnodes", "2", "--node-rank", str(rank), "--nproc", "2",
             "--rdzv-endpoint", "10.77.0.1:29561", SCRIPT, str(tmp_path / "two"), str(tmp_path / "two.pt")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    outputs = []
    for host in hosts:
        try:
            outputs.append(host.communicate(timeout=180))
        except subprocess.TimeoutExpired:
            for h in hosts:
                h.kill()
            raise
    assert all(h.returncode == 0 for h in hosts), [o[1][-2000:] for o in outputs]
    local = subprocess.run([CLI, "run", "--nproc", "4", SCRIPT, str(tmp_path / "one"), str(tmp_path / "one.pt")],
                           capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert local.returncode == 0, local.stderr[-3000:]
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert all(torch.equal(two[k], v) for k, v in one.items())
    # one run directory, named by rank 0, holds every rank's record (the hosts share this filesystem)
    (run,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in run.glob("rank-*.jsonl")) == [f"rank-{r}.jsonl" for r in range(4)]
    assert f"meshwise: recording the run in {run}" in outputs[0][0]
