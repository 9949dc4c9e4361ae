"""meshwise tensor parallelism against a hand-written ``parallelize_module`` loop: step-time ratio.

    python bench/tp.py                 # 2 workers, tp=2, on the CPU (gloo)
    python bench/tp.py --rounds 9

Both sides split the same model (8 MLP blocks, 256 -> 1024 -> 256, and a classifier) the
same way: each block's first Linear column-parallel, its second row-parallel, with
torch's ``ColwiseParallel`` / ``RowwiseParallel``. The hand-written side is what a user
of torch's tensor parallelism writes: ``parallelize_module`` with that plan, AdamW,
``loss.backward(); step()``. meshwise derives the plan itself (``tensor_plan``) and
also returns the global mean loss and checks each batch. Timed blocks of K steps
alternate between the sides; printed: median step times and the median over rounds of
the ratio meshwise / hand-written.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import meshwise as mw


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
              for _ in range(8)]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(256, 10))


def _time(step, batches, k: int) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    for i in range(k):
        step(batches[i % len(batches)])
    dist.barrier()
    return (time.perf_counter() - start) / k


def _worker(batch: int, rounds: int, steps: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4 * batch, 256, generator=g), torch.randint(0, 10, (4 * batch,), generator=g)
    batches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(4)]
    engine = mw.parallelize(model(), "tp=2", loss_fn=F.cross_entropy, sample=batches[0], device="cpu",
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    hand = model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    parallelize_module(hand, mesh, {f"{i}.{j}": ColwiseParallel() if j == 0 else RowwiseParallel()
                                    for i in range(8) for j in (0, 2)})
    opt = torch.optim.AdamW(hand.parameters(), lr=1e-3)

    def hand_step(b):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(hand(b[0]), b[1])
        loss.backward()
        opt.step()
        return loss.item()

    ours, theirs, ratios = [], [], []
    for r in range(rounds):
        order = [("ours", engine.step), ("theirs", hand_step)]
        times = {name: _time(step, batches, steps) for name, step in (order if r % 2 == 0 else order[::-1])}
        ours.append(times["ours"])
        theirs.append(times["theirs"])
        ratios.append(times["ours"] / times["theirs"])
    return {"ours": statistics.median(ours) * 1e3, "theirs": statistics.median(theirs) * 1e3,
            "ratio": statistics.median(ratios), "spread": (min(ratios), max(ratios)),
            "split": len(engine.tensor_plan.sharded), "bytes": engine.state_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    args = parser.parse_args()
    r = mw.launch(_worker, 2, (args.batch, args.rounds, args.steps), device="cpu")
    print(f"tp=2, 8 MLP blocks 256-1024-256, batch {args.batch}; meshwise split {r['split']} Linears")
    print(f"meshwise {r['ours']:.2f} ms/step, hand-written parallelize_module {r['theirs']:.2f} ms/step; "
          f"ratio meshwise/hand {r['ratio']:.3f} (rounds {r['spread'][0]:.3f}..{r['spread'][1]:.3f})")
    print(f"rank 0 holds {r['bytes']}")


if __name__ == "__main__":
    main()
