"""What recording a run costs: step time with a run directory against without one.

    python bench/record.py                # one process, the CPU
    python bench/record.py --rounds 9

``meshwise run`` records every step of every run (metrics.jsonl, rank-R.jsonl; docs/report.md),
so its cost per step matters most where steps are shortest. The same seeded model trains
with ``parallelize(...)`` and with ``parallelize(..., run_dir=DIR)`` (and with
``tensorboard=True`` too, where the tensorboard package is installed), in one
invocation: each round builds every side afresh and times K steps of each, the order
rotating between rounds. Printed: each side's median step time and the median over
rounds of its ratio to the side without recording.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import meshwise as mw

SIZES = {  # name: (d_in, hidden, steps per timed block)
    "tiny": (32, 64, 400),  # about 0.3 ms a step: the worst case for a per-step cost
    "small": (256, 512, 100),  # about 2 ms a step
}


def _engine(d_in: int, hidden: int, **record: object) -> mw.Engine:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    x = torch.randn(64, d_in)
    y = torch.randint(0, 10, (64,))
    return mw.parallelize(model, "dp=1", loss_fn=F.cross_entropy, sample=(x[:2], y[:2]), device="cpu",
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **record)


def _time(engine: mw.Engine, d_in: int, steps: int) -> float:
    x = torch.randn(4096, d_in)
    y = torch.randint(0, 10, (4096,))
    batches = list(engine.loader((x, y), 64, shuffle=False))
    for batch in batches[:5]:  # warm-up
        engine.step(batch)
    start = time.perf_counter()
    for i in range(steps):
        engine.step(batches[i % len(batches)])
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sides = ["none", "run_dir"] + (["run_dir+tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    print(f"{'model':<6} {'side':<22} {'step ms':>8} {'ratio to none':>14}")
    for name, (d_in, hidden, steps) in SIZES.items():
        times: dict[str, list[float]] = {s: [] for s in sides}
        ratios: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(args.rounds):
            got = {}
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                with tempfile.TemporaryDirectory() as tmp:
                    record = {} if side == "none" else {"run_dir": tmp, "tensorboard": "tensorboard" in side}
                    engine = _engine(d_in, hidden, **record)
                    got[side] = _time(engine, d_in, steps)
                    if side != "none":
                        engine.run_record.close()
            for side in sides:
                times[side].append(got[side])
                ratios[side].append(got[side] / got["none"])
        for side in sides:
            print(f"{name:<6} {side:<22} {statistics.median(times[side]) * 1e3:>8.3f} "
                  f"{statistics.median(ratios[side]):>14.3f}")


if __name__ == "__main__":
    main()
