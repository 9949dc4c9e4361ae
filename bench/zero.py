"""Per-rank model-state bytes under ZeRO: zero 0-3 at dp 1, 2, 4, and the step-time cost.

    python bench/zero.py                  # the demo GPT (210k parameters), AdamW, CPU (gloo)

For each (zero, dp) the demo GPT trains 4 steps of a global batch of 32 windows; every
rank reports the bytes it holds for parameters, gradients (at the end of backward)
and optimizer state, measured on the tensors (a DTensor counts its local shard). Printed
per configuration: rank 0's bytes, their sum, the sum against the replicated (zero=0)
figure at the same dp, and the median step time. ZeRO trades memory for communication;
on 2 CPU cores the time column shows that cost, not a GPU's.
"""

from __future__ import annotations

import statistics
import time

import torch

import meshwise as mw
from meshwise.demo_gpt import VOCAB, corpus, encode, windows
from meshwise.gpt import GPT, GPTConfig, lm_loss


def _worker(plan: str) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab=len(VOCAB), context=64, layers=4, hidden=64, heads=4)
    x, y = windows(encode(corpus()[:200_000]), cfg.context)
    engine = mw.parallelize(GPT(cfg), plan, loss_fn=lm_loss, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                            sample=(x[:32], y[:32]))
    times = []
    for batch in list(engine.loader((x, y), 32, seed=0))[:4]:
        start = time.perf_counter()
        engine.step(batch)
        times.append(time.perf_counter() - start)
    return {"bytes": engine.state_bytes(), "step_ms": statistics.median(times[1:]) * 1e3}


def main() -> None:
    rows = []
    for dp in (1, 2, 4):
        for zero in (0, 1, 2, 3):
            if dp == 1 and zero:
                continue
            r = mw.launch(_worker, dp, (f"dp={dp},zero={zero}",), device="cpu")
            rows.append((dp, zero, r["bytes"], r["step_ms"]))
    replicated = {dp: sum(b.values()) for dp, zero, b, _ in rows if zero == 0}
    print(f"{'dp':>3} {'zero':>4} {'parameters':>11} {'gradients':>10} {'optimizer':>10} {'total':>10} "
          f"{'vs zero=0':>9} {'step ms':>8}")
    for dp, zero, b, ms in rows:
        total = sum(b.values())
        print(f"{dp:>3} {zero:>4} {b['parameters']:>11,} {b['gradients']:>10,} {b['optimizer']:>10,} {total:>10,} "
              f"{total / replicated[dp]:>9.3f} {ms:>8.1f}")


if __name__ == "__main__":
    main()
