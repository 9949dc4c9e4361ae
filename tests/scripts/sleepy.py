"""Every rank joins the job, rank 0 says "ready", then all wait: a job to interrupt or kill."""

import time

import torch
import torch.distributed as dist

import meshwise as mw

engine = mw.parallelize(torch.nn.Linear(2, 2), loss_fn=torch.nn.functional.mse_loss,
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
dist.barrier()  # every rank is up
if engine.is_main:
    print("ready", flush=True)
time.sleep(120)
