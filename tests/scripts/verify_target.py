"""A small training script for ``meshwise verify``, correct or with one planted mistake.

    meshwise verify tests/scripts/verify_target.py --plan dp=2 -- MODE
    MODE: ok | sum (loss summed over rows) | dropout (seeded per rank) | tail (parallel
    run drops the uneven last batch)

45 rows in batches of 8: 6 steps, the last of 5 rows.
"""

import sys

import torch
import torch.nn.functional as F

import meshwise as mw

mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
torch.manual_seed(0)
x = torch.randn(45, 6)
y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
layers = [torch.nn.Linear(6, 16), torch.nn.Tanh()]
if mode == "dropout":
    layers.append(torch.nn.Dropout(0.2))
model = torch.nn.Sequential(*layers, torch.nn.Linear(16, 3))


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target, reduction="sum" if mode == "sum" else "mean")


engine = mw.parallelize(model, "dp=2", loss_fn=loss_fn, sample=(x[:2], y[:2]),
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
if mode == "dropout":
    torch.manual_seed(1000 + engine.rank)  # planted: every rank draws other masks
drop_tail = mode == "tail" and engine.world_size > 1  # planted: sharding that evens out the batches
for epoch in range(2):
    for batch in engine.loader((x, y), 8, seed=1, epoch=epoch, drop_last=drop_tail):
        loss = engine.step(batch)
if engine.is_main:
    print(f"final loss {loss:.4f}")
