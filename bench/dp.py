"""meshwise data parallelism vs a plain DDP training loop: step time ratio.

    python bench/dp.py                 # 2 workers on the CPU (gloo)
    python bench/dp.py --nproc 4 --rounds 9

Both sides train the same seeded MLP with the same AdamW, world size, global batch and
sample order, in one invocation: each round times K steps of one, then K steps of the
other (the order alternates between rounds, so drift in machine speed hits both), and
every size runs twice, allocating meshwise's model first in one run and DDP's in the
other (allocation order alone moved the ratio by ~5% on this machine).
The plain loop is what a DDP user writes: ``zero_grad; loss = loss_fn(ddp(x), y);
loss.backward(); step; loss.item()``, fed by the same index gather as meshwise's loader.
meshwise additionally returns the *global* mean loss (an all-reduce the plain loop does
not do). Printed: median step time per side, the median over rounds of the ratio
meshwise / DDP (each round's two blocks ran back to back), and its spread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import meshwise as mw

SIZES = {  # name: (d_in, hidden, classes) -- a latency-bound and a bandwidth-bound model
    "small": (64, 128, 10),
    "medium": (512, 1024, 10),
}


def _model(d_in: int, hidden: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes),
    )


def _worker(size: str, batch: int, steps: int, rounds: int, meshwise_first: bool) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    d_in, hidden, classes = SIZES[size]
    n = batch * steps
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)

    def build_meshwise() -> mw.Engine:
        return mw.parallelize(_model(d_in, hidden, classes), loss_fn=F.cross_entropy,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), sample=(x[:1], y[:1]))

    if meshwise_first:
        engine = build_meshwise()
    else:
        dist.init_process_group("gloo")
    ddp = DistributedDataParallel(_model(d_in, hidden, classes))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    if not meshwise_first:
        engine = build_meshwise()
    rank, world = dist.get_rank(), dist.get_world_size()

    def run_meshwise(epoch: int) -> float:
        start = time.perf_counter()
        for b in engine.loader((x, y), batch, seed=0, epoch=epoch):
            engine.step(b)
        return (time.perf_counter() - start) / steps

    def run_ddp(epoch: int) -> float:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        start = time.perf_counter()
        for idx in order.split(batch):
            mine = idx.tensor_split(world)[rank]
            xb, yb = x[mine], y[mine]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(xb), yb)
            loss.backward()
            opt.step()
            loss.item()
        return (time.perf_counter() - start) / steps

    run_meshwise(0), run_ddp(0)  # warm-up
    times: dict[str, list[float]] = {"meshwise": [], "ddp": []}
    for r in range(rounds):
        pair = [("meshwise", run_meshwise), ("ddp", run_ddp)]
        for name, fn in pair if r % 2 == 0 else reversed(pair):
            dist.barrier()
            times[name].append(fn(r + 1))
    params = sum(p.numel() for p in ddp.parameters())
    ratios = sorted(m / d for m, d in zip(times["meshwise"], times["ddp"]))  # per round: neighbours in time
    return {"params": params, "ratios": ratios, "meshwise_all": times["meshwise"], "ddp_all": times["ddp"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=40, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()

    print(f"meshwise vs plain DDP: {args.nproc} workers, global batch {args.batch}, "
          f"median of 2 x {args.rounds} rounds x {args.steps} steps")
    print(f"{'model':8} {'params':>10} {'meshwise ms':>12} {'DDP ms':>9} {'ratio':>7}   per-round ratio min..max")
    for size in SIZES:
        # Which model is allocated first measurably changes its speed (memory placement),
        # so each size runs twice, once in each order, and the rounds are pooled.
        runs = [mw.launch(_worker, nproc=args.nproc, args=(size, args.batch, args.steps, args.rounds, first),
                          device="cpu") for first in (True, False)]
        ratios = sorted(q for r in runs for q in r["ratios"])
        mesh = statistics.median(t for r in runs for t in r["meshwise_all"])
        ddp = statistics.median(t for r in runs for t in r["ddp_all"])
        print(f"{size:8} {runs[0]['params']:>10,} {mesh * 1e3:>12.3f} {ddp * 1e3:>9.3f} "
              f"{statistics.median(ratios):>7.3f}   {ratios[0]:.3f}..{ratios[-1]:.3f}")


if __name__ == "__main__":
    main()
