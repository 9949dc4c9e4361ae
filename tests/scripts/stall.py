"""Rank 1 stalls (sleeps) before step 3; rank 0 waits for it in the gradient all-reduce."""

import time

import torch

import meshwise as mw

engine = mw.parallelize(torch.nn.Linear(2, 2), loss_fn=torch.nn.functional.mse_loss,
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.1), sample=(torch.zeros(1, 2), torch.zeros(1, 2)))
for step in range(1, 6):
    if engine.rank == 1 and step == 3:
        time.sleep(3600)
    engine.step((torch.randn(4, 2), torch.randn(4, 2)))
