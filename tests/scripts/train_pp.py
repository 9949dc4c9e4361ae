"""A tiny pipelined training script for the launcher tests: meshwise run --plan pp=2 ..."""

import torch

import meshwise as mw
from meshwise.gpt import GPT, GPTConfig, lm_loss

torch.manual_seed(0)
tokens = torch.randint(0, 24, (64, 9), generator=torch.Generator().manual_seed(3))
x, y = tokens[:, :-1], tokens[:, 1:]
engine = mw.parallelize(GPT(GPTConfig(vocab=24, context=8, layers=4, hidden=16, heads=2)), loss_fn=lm_loss,
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.1), sample=(x[:8], y[:8]))
losses = [engine.step(batch) for batch in engine.loader((x, y), 16)]
if engine.is_main:
    print(f"trained {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
