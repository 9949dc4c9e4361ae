"""The GPU path (NCCL, one GPU per rank): the same transparency test, skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import harness
from test_dp import train_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none on this machine)")


def cuda_cases(dp: int) -> list[dict]:
    import meshwise as mw
    from models import classification, mlp
    import torch.nn.functional as F

    engine = mw.parallelize(mlp(), mw.Plan(dp=dp), loss_fn=F.cross_entropy,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), sample=classification(2))
    assert engine.device.type == "cuda" and "nccl" in engine.ctx.backend
    return train_cases(dp, ref_device=str(engine.device))  # reference on the same kind of device


def test_dp_on_gpus_matches_single_process() -> None:
    dp = min(2, torch.cuda.device_count())
    for results in harness.run(cuda_cases, world=dp, args=(dp,), deadline=180, env={"MESHWISE_DEVICE": "cuda"}):
        for result in results:
            worst = max(result["diffs"].values())
            # same GPU kernels for both; TF32 is off by default for fp32 matmuls
            assert worst <= 1e-5, (result["case"], worst)
