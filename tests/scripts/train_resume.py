"""Train a tiny GPT for 2 epochs with a checkpoint every 2 steps; write the final state.

    meshwise run --nproc 2 [--resume] [--max-restarts R] train_resume.py CKPT_DIR OUT.pt [KILL_AT [STOP_AT]]

KILL_AT > 0: rank 1 SIGKILLs itself before that step on the job's first attempt (a
restart after a failure resumes from the latest checkpoint). STOP_AT > 0: every rank
stops after that many steps, as if the job had been cut off.
"""

import os
import sys

import torch

import meshwise as mw
from meshwise.gpt import GPT, GPTConfig, lm_loss

root, out = sys.argv[1], sys.argv[2]
kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else 0
stop_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
torch.manual_seed(0)
config = GPTConfig(vocab=24, context=8, layers=2, hidden=16, heads=2)
tokens = torch.randint(0, config.vocab, (40, 9), generator=torch.Generator().manual_seed(3))
engine = mw.parallelize(GPT(config), loss_fn=lm_loss, sample=(tokens[:2, :-1], tokens[:2, 1:]),
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), checkpoint=root, checkpoint_every=2)
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
for epoch in range(engine.epoch, 2):
    for batch in engine.loader((tokens[:, :-1], tokens[:, 1:]), 8, shuffle=True, epoch=epoch):
        if kill_at and first_attempt and engine.rank == 1 and engine.steps + 1 == kill_at:
            os.kill(os.getpid(), 9)
        engine.step(batch)
        if stop_at and engine.steps == stop_at:
            sys.exit(0)
state = engine.full_state_dict()
if engine.is_main:
    torch.save(state, out)
    print(f"done at step {engine.steps}")
