"""Rank 1 fails in the first attempt only; a restarted job then trains and finishes.

    meshwise run --nproc 2 --max-restarts 1 fail_once.py
"""

import os

import torch
import torch.nn.functional as F

import meshwise as mw

attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
engine = mw.parallelize(torch.nn.Linear(4, 2), loss_fn=F.cross_entropy, sample=(x[:1], y[:1]),
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
if attempt == 0 and engine.rank == 1:
    raise RuntimeError("first attempt fails")
for batch in engine.loader((x, y), batch_size=4):
    engine.step(batch)
if engine.is_main:
    print(f"finished in attempt {attempt} after {engine.steps} steps")
