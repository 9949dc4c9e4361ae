"""Device choice (pure: CUDA is simulated with monkeypatch, nothing runs on a GPU)."""

from __future__ import annotations

import pytest
import torch

import meshwise.dist
from meshwise.dist import pick_device


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(meshwise.dist, "_told_cpu_fallback", False)


def test_one_gpu_per_local_rank_when_there_are_enough(one_gpu) -> None:
    assert pick_device("auto", 0, 1) == torch.device("cuda", 0)


def test_auto_falls_back_to_the_cpu_with_fewer_gpus_than_processes(one_gpu, capsys) -> None:
    assert pick_device("auto", 0, 2) == torch.device("cpu")
    assert "2 processes on this host but 1 GPU(s): running on the CPU" in capsys.readouterr().err
    assert pick_device("auto", 1, 2) == torch.device("cpu")
    assert pick_device("auto", 0, 2) == torch.device("cpu")
    assert capsys.readouterr().err == ""  # rank 0 speaks, once


def test_asking_for_cuda_with_too_few_gpus_is_an_error(one_gpu) -> None:
    with pytest.raises(ValueError, match="2 processes on this host need one GPU each but it has 1"):
        pick_device("cuda", 1, 2)


def test_a_local_rank_beyond_the_gpus_is_an_error_not_a_missing_device(one_gpu) -> None:
    with pytest.raises(ValueError, match="local rank 3 needs GPU 3 but this host has 1"):
        pick_device("auto", 3, 1)  # a launcher that did not set LOCAL_WORLD_SIZE


def test_cpu_is_forced_and_bad_names_are_rejected(one_gpu) -> None:
    assert pick_device("cpu", 0, 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="device='tpu' is invalid"):
        pick_device("tpu", 0, 1)
