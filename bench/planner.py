"""The planner's accuracy on this machine: predicted against measured step time, plan by plan.

    python bench/planner.py                  # world 2 and 4, the demo GPT, a global batch of 32
    python bench/planner.py --worlds 2 --plans 8

For each world size, one launch (CPU, gloo):

1. ``--plan auto``'s measurements (``meshwise.profile.rank_job``): the demo GPT's layers
   and the rest of a training step, profiled with the cores as busy as training keeps
   them, and the job's all-reduce. The search ranks every plan, tensor parallelism
   included, and the plans of fewer processes with more threads each (their profiles
   measured with that many threads).
2. The top ``--plans`` feasible plans, in predicted order, and as many more spread evenly
   over the rest of the ranking (ZeRO, recomputation and many micro-batches among them)
   are each built and trained: 2 warm-up steps, then the median of ``--steps`` timed
   steps (the slowest rank's).

Printed per world: each plan's predicted and measured step time and the error; the
median absolute error (target <= 20%); the auto plan's (the predicted best's)
measured throughput as a fraction of the best measured plan's (target >= 0.9); and
threads against processes: the best one-process plan, run with every core as a thread,
predicted and measured against the auto plan, and whether the planner and the
measurement agree on which is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import meshwise as mw
from meshwise.gpt import GPT, GPTConfig, lm_loss


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig())


def _worker(batch: int, plans: int, steps: int, threads: int, specs: list[tuple[str, float]] | None
            ) -> tuple[list[tuple[str, float, float]], tuple[str, float, int] | None]:
    from meshwise import dist as mwdist
    from meshwise.profile import rank_job

    torch.set_num_threads(threads)
    ctx = mwdist.init("cpu")
    tokens = torch.randint(0, 96, (batch * 4, 65), generator=torch.Generator().manual_seed(3))
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = lambda p: torch.optim.AdamW(p, lr=1e-3)  # noqa: E731
    fewer = None
    if specs is None:  # plan as --plan auto does: every plan for this world, and one process on every core
        ranking = rank_job(_model(), (x[:batch], y[:batch]), ctx.device, batch, loss_fn=lm_loss, optimizer=opt)
        chosen: list[object] = [None]
        if ctx.rank == 0:
            results, _, _ = ranking()
            feasible = [r for r in results if r.feasible and r.plan.world_size == ctx.world_size]
            rest = feasible[plans:]
            picked = feasible[:plans] + [rest[i * len(rest) // plans] for i in range(min(plans, len(rest)))]
            alone = next((r for r in results if r.feasible and r.plan.world_size == 1), None)
            chosen = [([(str(r.plan), r.step_time) for r in picked],
                       None if alone is None else (str(alone.plan), alone.step_time, alone.threads))]
        dist.broadcast_object_list(chosen, src=0)
        specs, fewer = chosen[0]  # type: ignore[misc]
    out = []
    for spec, predicted in specs:
        engine = mw.parallelize(_model(), spec, loss_fn=lm_loss, optimizer=opt, sample=(x[:8], y[:8]))
        batches = list(engine.loader((x, y), batch, shuffle=False))
        times = []
        for i in range(steps + 2):
            dist.barrier()
            start = time.perf_counter()
            engine.step(batches[i % len(batches)])
            if i >= 2:
                times.append(time.perf_counter() - start)
        slowest = torch.tensor([statistics.median(times)])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        out.append((spec, predicted, float(slowest)))
    return out, fewer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--plans", type=int, default=6, help="top plans measured (and as many more spread out)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per plan")
    args = parser.parse_args()
    from meshwise.profile import cores

    for world in args.worlds:
        threads = max(1, cores() // world)
        rows, alone = mw.launch(_worker, world, (args.batch, args.plans, args.steps, threads, None), device="cpu")
        print(f"world {world}, demo GPT, global batch {args.batch} (CPU, gloo, {threads} thread(s) per process):")
        print(f"  {'plan':<52}{'predicted ms':>14}{'measured ms':>13}{'error':>8}")
        errors = []
        for spec, predicted, measured in rows:
            errors.append(abs(predicted / measured - 1))
            print(f"  {spec:<52}{predicted * 1e3:>14.1f}{measured * 1e3:>13.1f}{predicted / measured - 1:>+8.0%}")
        best = min(rows, key=lambda r: r[2])
        auto = rows[0]
        print(f"  median |error| {statistics.median(errors):.0%} over {len(rows)} plans (target <= 20%)")
        print(f"  auto plan {auto[0]}: measured throughput {best[2] / auto[2]:.2f} of the best measured "
              f"({best[0]}) (target >= 0.9)")
        if alone is None:
            print("  threads against processes: no one-process plan fits")
            continue
        spec, predicted, alone_threads = alone
        [(_, _, measured)], _ = mw.launch(_worker, 1, (args.batch, 0, args.steps, alone_threads,
                                                       [(spec, predicted)]), device="cpu")
        said = "fewer" if predicted < auto[1] else "more"
        found = "fewer" if measured < auto[2] else "more"
        verdict = ("a tie: measured within 5% of each other, either choice is right"
                   if abs(measured / auto[2] - 1) < 0.05 else "agree" if said == found else "DISAGREE")
        print(f"  threads against processes: 1 process x {alone_threads} threads ({spec}) predicted "
              f"{predicted * 1e3:.1f} ms, measured {measured * 1e3:.1f} ms ({predicted / measured - 1:+.0%}), against "
              f"{auto[2] * 1e3:.1f} ms measured for the auto plan: the planner says {said} processes, the "
              f"measurement {found} ({verdict})")


if __name__ == "__main__":
    main()
