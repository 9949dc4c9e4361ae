"""meshwise data parallelism vs a plain DDP training loop: step time ratio.

    python bench/dp.py                 # 2 workers on the CPU (gloo)
    python bench/dp.py --nproc 4 --rounds 9
    python bench/dp.py --nproc 1 --device cuda     # one GPU (NCCL)

Both sides train the same seeded MLP with the same AdamW, world size, global batch
and sample order, in one invocation. Each round builds both sides afresh and times K
steps of one, then K steps of the other; the order alternates between rounds, so
drift in machine speed and the luck of memory placement fall on both sides alike.
The plain loop is what a DDP user writes: ``zero_grad; loss = loss_fn(ddp(x), y);
loss.backward(); step; loss.item()``, fed by the same index gather as meshwise's
loader. meshwise does more: it returns the *global* mean loss (carried in the gradient
all-reduce) and checks each batch against the sample. Printed: median step time per side, the median over rounds of the ratio
meshwise / DDP (each round's two blocks ran back to back), and its spread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import meshwise as mw

SIZES = {  # name: (d_in, hidden, classes, steps per timed block of ~0.4 s)
    "small": (64, 128, 10, 160),  # latency-bound: ~2.5 ms steps on 2 CPU processes
    "medium": (512, 1024, 10, 16),  # bandwidth-bound: ~23 ms steps
}


def _model(d_in: int, hidden: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes),
    )


def _worker(size: str, batch: int, rounds: int, device: str) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from meshwise.dist import init

    d_in, hidden, classes, steps = SIZES[size]
    n = batch * steps
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)
    ctx = init(device)  # the process group both sides use (gloo, or NCCL on GPUs)
    rank, world, dev = ctx.rank, ctx.world_size, ctx.device

    def meshwise_side() -> Callable[[int], float]:
        engine = mw.parallelize(_model(d_in, hidden, classes), loss_fn=F.cross_entropy, device=dev,
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), sample=(x[:1], y[:1]))

        def run(epoch: int) -> float:
            start = time.perf_counter()
            for b in engine.loader((x, y), batch, seed=0, epoch=epoch):
                engine.step(b)
            return (time.perf_counter() - start) / steps

        return run

    def ddp_side() -> Callable[[int], float]:
        ddp = DistributedDataParallel(_model(d_in, hidden, classes).to(dev),
                                      device_ids=[dev.index] if dev.type == "cuda" else None)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)

        def run(epoch: int) -> float:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
            start = time.perf_counter()
            for idx in order.split(batch):
                mine = idx.tensor_split(world)[rank]
                xb, yb = x[mine].to(dev, non_blocking=True), y[mine].to(dev, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(ddp(xb), yb)
                loss.backward()
                opt.step()
                loss.item()
            return (time.perf_counter() - start) / steps

        return run

    times: dict[str, list[float]] = {"meshwise": [], "ddp": []}
    for r in range(rounds + 1):
        # Fresh models every round, built and run in alternating order: where a model's
        # memory lands moved its step time by up to 25% on a 2-core machine, so placement
        # and order must vary between rounds rather than favour one side throughout.
        sides = [("meshwise", meshwise_side), ("ddp", ddp_side)]
        if r % 2:
            sides.reverse()
        runs = [(name, build()) for name, build in sides]
        for name, run in runs:
            run(0)  # warm-up
            dist.barrier()
            elapsed = run(r + 1)
            if r:  # round 0 warms up the process as a whole
                times[name].append(elapsed)
        del runs
    ratios = sorted(m / d for m, d in zip(times["meshwise"], times["ddp"]))  # per round: neighbours in time
    params = sum(p.numel() for p in _model(d_in, hidden, classes).parameters())
    return {"params": params, "ratios": ratios, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per worker, NCCL")
    args = parser.parse_args()

    print(f"meshwise vs plain DDP: {args.nproc} workers on {args.device}, global batch {args.batch}, "
          f"median of {args.rounds} rounds of ~0.4 s per side, fresh models each round")
    print(f"{'model':8} {'params':>10} {'meshwise ms':>12} {'DDP ms':>9} {'ratio':>7}   per-round ratio min..max")
    for size in SIZES:
        r = mw.launch(_worker, nproc=args.nproc, args=(size, args.batch, args.rounds, args.device), device=args.device)
        ratios = r["ratios"]
        print(f"{size:8} {r['params']:>10,} {r['meshwise'] * 1e3:>12.3f} {r['ddp'] * 1e3:>9.3f} "
              f"{statistics.median(ratios):>7.3f}   {ratios[0]:.3f}..{ratios[-1]:.3f}")


if __name__ == "__main__":
    main()
