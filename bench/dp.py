"""meshwise data parallelism vs a plain DDP training loop: step time ratio.

    python bench/dp.py                 # 2 workers on the CPU (gloo)
    python bench/dp.py --nproc 4 --rounds 9

Both sides train the same seeded MLP with the same AdamW, world size, global batch and
sample order, in one invocation: each round times K steps of one, then K steps of the
other (the order alternates between rounds, so drift in machine speed hits both).
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


def _worker(size: str, batch: int, steps: int, rounds: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    d_in, hidden, classes = SIZES[size]
    n = batch * steps
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)

    engine = mw.parallelize(_model(d_in, hidden, classes), loss_fn=F.cross_entropy,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), sample=(x[:1], y[:1]))
    ddp = DistributedDataParallel(_model(d_in, hidden, classes))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
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
    return {"size": size, "params": params, "world": world, "ratios": ratios,
            **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=40, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    print(f"meshwise vs plain DDP: {args.nproc} workers, global batch {args.batch}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'model':8} {'params':>10} {'meshwise ms':>12} {'DDP ms':>9} {'ratio':>7}   per-round ratio min..max")
    for size in SIZES:
        r = mw.launch(_worker, nproc=args.nproc, args=(size, args.batch, args.steps, args.rounds), device="cpu")
        print(f"{size:8} {r['params']:>10,} {r['meshwise'] * 1e3:>12.3f} {r['ddp'] * 1e3:>9.3f} "
              f"{statistics.median(r['ratios']):>7.3f}   {r['ratios'][0]:.3f}..{r['ratios'][-1]:.3f}")


if __name__ == "__main__":
    main()
