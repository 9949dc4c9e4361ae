"""A user's training script: the public API only. Writes final parameters to ARGV[1].

    python train_tiny.py OUT.pt                      # one process
    meshwise run --nproc 2 train_tiny.py OUT.pt
    torchrun --standalone --nproc-per-node 2 train_tiny.py OUT.pt
"""

import json
import sys

import torch
import torch.nn.functional as F

import meshwise as mw

out = sys.argv[1]
fail_rank = int(sys.argv[2]) if len(sys.argv) > 2 else -1  # plant a failure on this rank at step 3

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
g = torch.Generator().manual_seed(1)
x, y = torch.randn(60, 8, generator=g), torch.randint(0, 4, (60,), generator=g)

engine = mw.parallelize(model, loss_fn=F.cross_entropy, sample=(x[:1], y[:1]),
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
for epoch in range(2):
    for batch in engine.loader((x, y), batch_size=16, epoch=epoch):
        if engine.steps == 3 and engine.rank == fail_rank:
            raise ValueError(f"planted failure on rank {engine.rank} at step {engine.steps}")
        loss = engine.step(batch)

if engine.is_main:
    torch.save(engine.model.state_dict(), out)
    print(json.dumps({"world": engine.world_size, "plan": str(engine.plan), "loss": loss, "steps": engine.steps}))
