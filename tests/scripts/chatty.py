"""Every rank prints; rank 1 also warns. For the tests of meshwise run's --quiet and --verbose."""

import warnings

import torch

import meshwise as mw

torch.manual_seed(0)
engine = mw.parallelize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)), "pp=2",
                        loss_fn=torch.nn.functional.mse_loss, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                        sample=(torch.zeros(4, 4), torch.zeros(4, 2)))
engine.step((torch.randn(8, 4), torch.randn(8, 2)))
print(f"hello from rank {engine.rank}")
if engine.rank == 1:
    warnings.warn("rank one is odd", stacklevel=1)
