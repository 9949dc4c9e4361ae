"""meshwise pipelines: overhead against hand-split torch pipelining, balanced vs equal cuts, bubbles.

    python bench/pp.py                    # 2 workers (pp=2) on the CPU (gloo)
    python bench/pp.py --rounds 9 --microbatches 8

Three measurements, all in one invocation on the same workers:

(a) **Overhead.** The same model (8 equal blocks), cut (four blocks per stage, given to
    meshwise with ``stages=``), schedule (1F1B) and micro-batches,
    trained by meshwise and by a hand-written ``torch.distributed.pipelining`` loop
    (``PipelineStage`` on ``nn.Sequential`` halves, ``Schedule1F1B`` with a mean loss),
    what a user of torch's pipelining writes. Timed blocks of K steps alternate between
    the two sides; printed: median step times and the median over rounds of the ratio
    meshwise / hand-split. meshwise does more per step: the global mean loss on every
    rank (one scalar all-reduce) and batch checks.
(b) **Balance.** A model whose first four blocks are 4x wider than the last four,
    trained by meshwise with its measured, balanced cut and with the equal-layer-count
    cut (``stages=``) that layer-count balancing would choose. Printed: throughput ratio
    balanced / equal.
(c) **Bubble.** For each schedule, the timeline of K steps: the measured idle fraction
    against the theoretical (p - 1) / (v m + p - 1).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import meshwise as mw


def blocks(widths: list[int], d: int = 256, classes: int = 10) -> torch.nn.Module:
    """A chain of MLP blocks (block i: d -> widths[i] -> d) and a classifier."""
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(d, w), torch.nn.ReLU(), torch.nn.Linear(w, d), torch.nn.ReLU())
              for w in widths]
    return torch.nn.Sequential(*layers, torch.nn.Linear(d, classes))


def data(n: int, d: int = 256, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _time(step, batches, k: int) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    for i in range(k):
        step(batches[i % len(batches)])
    dist.barrier()
    return (time.perf_counter() - start) / k


def _hand_split(model: torch.nn.Module, microbatches: int):
    """What a torch.distributed.pipelining user writes for pp=2: equal halves, 1F1B, mean loss."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    rank, world = dist.get_rank(), dist.get_world_size()
    layers = list(model.children())
    half = len(layers) // world
    part = torch.nn.Sequential(*layers[rank * half: (rank + 1) * half if rank < world - 1 else len(layers)])
    stage = PipelineStage(part, rank, world, torch.device("cpu"))
    schedule = Schedule1F1B(stage, microbatches, loss_fn=F.cross_entropy)
    opt = torch.optim.AdamW(part.parameters(), lr=1e-3)

    def step(batch):
        x, y = batch
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=losses)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _worker(batch: int, microbatches: int, rounds: int, steps: int) -> dict:

    out: dict = {}
    x, y = data(batch * 4)
    batches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(4)]

    # (a) overhead against the hand-split loop
    equal_widths = [1024] * 8
    halves = [(0, 16), (16, 33)]  # the hand split's cut (four blocks each), so only the runtime differs
    engine = mw.parallelize(blocks(equal_widths), mw.Plan(pp=2, microbatches=microbatches, schedule="1f1b"),
                            loss_fn=F.cross_entropy, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                            sample=batches[0], stages=halves)
    hand = _hand_split(blocks(equal_widths), microbatches)
    ours, theirs, ratios = [], [], []
    for r in range(rounds):
        order = [("ours", engine.step), ("theirs", hand)] if r % 2 == 0 else [("theirs", hand), ("ours", engine.step)]
        times = {name: _time(step, batches, steps) for name, step in order}
        ours.append(times["ours"])
        theirs.append(times["theirs"])
        ratios.append(times["ours"] / times["theirs"])
    out["overhead"] = {"meshwise_ms": statistics.median(ours) * 1e3, "hand_ms": statistics.median(theirs) * 1e3,
                       "ratio": statistics.median(ratios), "spread": (min(ratios), max(ratios)),
                       "bounds": engine.partition.bounds}

    # (b) balanced vs equal-layer cut on unequal blocks
    unequal = [2048] * 4 + [512] * 4
    n_layers = 4 * len(unequal) + 1  # the Sequential blocks open into their Linear/ReLU layers
    half = 4 * (len(unequal) // 2)  # four blocks per stage, as a layer-count split would cut
    equal_cut = [(0, half), (half, n_layers)]
    balanced = mw.parallelize(blocks(unequal), mw.Plan(pp=2, microbatches=microbatches), loss_fn=F.cross_entropy,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), sample=batches[0])
    equal = mw.parallelize(blocks(unequal), mw.Plan(pp=2, microbatches=microbatches), loss_fn=F.cross_entropy,
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), sample=batches[0], stages=equal_cut)
    tb, te, rb = [], [], []
    for r in range(rounds):
        order = [("b", balanced.step), ("e", equal.step)] if r % 2 == 0 else [("e", equal.step), ("b", balanced.step)]
        times = {name: _time(step, batches, steps) for name, step in order}
        tb.append(times["b"])
        te.append(times["e"])
        rb.append(times["e"] / times["b"])
    out["balance"] = {"balanced_ms": statistics.median(tb) * 1e3, "equal_ms": statistics.median(te) * 1e3,
                      "throughput_ratio": statistics.median(rb), "balanced_bounds": balanced.partition.bounds,
                      "equal_bounds": tuple(equal_cut)}

    # (c) measured vs theoretical bubble per schedule
    out["bubble"] = {}
    for schedule in ("gpipe", "1f1b", "interleaved"):
        eng = mw.parallelize(blocks(equal_widths), mw.Plan(pp=2, microbatches=microbatches, schedule=schedule),
                             loss_fn=F.cross_entropy, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                             sample=batches[0], trace=True)
        for i in range(steps):
            eng.step(batches[i % len(batches)])
        with tempfile.TemporaryDirectory() as tmp:
            figures = eng.write_trace(tmp)
        if figures is not None:
            out["bubble"][schedule] = {k: figures[k] for k in ("measured", "theoretical", "stages_per_rank")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    args = parser.parse_args()
    r = mw.launch(_worker, 2, (args.batch, args.microbatches, args.rounds, args.steps), device="cpu")
    o, b = r["overhead"], r["balance"]
    print(f"(a) pp=2, 1f1b, {args.microbatches} micro-batches, batch {args.batch}, 8 equal blocks, "
          f"both cut at {o['bounds']}:")
    print(f"    meshwise {o['meshwise_ms']:.2f} ms/step, hand-split torch pipelining {o['hand_ms']:.2f} ms/step; "
          f"ratio meshwise/hand {o['ratio']:.3f} (rounds {o['spread'][0]:.3f}..{o['spread'][1]:.3f})")
    print(f"(b) blocks of widths 2048x4, 512x4: balanced cut {b['balanced_bounds']} {b['balanced_ms']:.2f} ms/step, "
          f"equal-layer cut {b['equal_bounds']} {b['equal_ms']:.2f} ms/step; throughput balanced/equal "
          f"{b['throughput_ratio']:.2f}x")
    print("(c) bubble fraction, measured vs theoretical (p-1)/(v m+p-1):")
    for schedule, f in r["bubble"].items():
        print(f"    {schedule:<12} measured {f['measured']:.1%}  theoretical {f['theoretical']:.1%}"
              f"  ({f['stages_per_rank']} stage(s) per rank)")


if __name__ == "__main__":
    main()
