"""Rank 1 fails in the way named by ARGV[1] while rank 0 trains: exit3, kill, msg or raise."""

import os
import sys
import time

import torch

import meshwise as mw

engine = mw.parallelize(torch.nn.Linear(2, 2), loss_fn=torch.nn.functional.mse_loss,
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.1), sample=(torch.zeros(1, 2), torch.zeros(1, 2)))
mode = sys.argv[1]
if engine.rank == 1:
    if mode == "exit3":
        sys.exit(3)
    if mode == "kill":
        os.kill(os.getpid(), 9)
    if mode == "msg":
        sys.exit("bad config")
    time.sleep(0.5)
    raise ValueError("boom")
for _ in range(200):
    engine.step((torch.randn(4, 2), torch.randn(4, 2)))
    time.sleep(0.05)
