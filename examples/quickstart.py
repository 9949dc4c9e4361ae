"""The README's example: data-parallel training and inference with meshwise.

    meshwise run --nproc 2 examples/quickstart.py     # 2 workers, dp=2
    torchrun --standalone --nproc-per-node 2 examples/quickstart.py
    python examples/quickstart.py                     # one process, same result
"""

import torch
import torch.nn.functional as F

import meshwise as mw

torch.manual_seed(0)
x = torch.randn(2048, 32)
y = x[:, :4].argmax(dim=1)  # a learnable 4-class problem
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

engine = mw.parallelize(model, loss_fn=F.cross_entropy, sample=(x[:2], y[:2]),
                        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
for epoch in range(5):
    for batch in engine.loader((x, y), batch_size=64, shuffle=True, epoch=epoch):
        loss = engine.step(batch)  # global mean loss, the same on every rank
    if engine.is_main:
        print(f"epoch {epoch}: loss {loss:.4f}")

accuracy = (engine.predict(x).argmax(dim=1) == y).float().mean().item()
if engine.is_main:
    print(f"plan {engine.plan} on {engine.world_size} process(es): training accuracy {accuracy:.3f}")
