"""Plan search: every feasible plan for a device count and memory budget, ranked by the
cost model's predicted step time; every rejected one with its reason.

Pure Python, like ``meshwise.cost``. The candidates: every (dp, pp, tp) whose product is
the device count, ZeRO 0-3 (1-3 only with dp > 1), each schedule (pipelines only),
micro-batch counts that divide a replica's share of the batch (up to 8 x the pipeline's
stages, at least 16), and recomputation on or off. ``fixed`` pins fields (``--evaluate
dp=8,tp=4``) and searches the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from meshwise.cost import GB, Estimate, Hardware, Workload, estimate
from meshwise.plan import SCHEDULES, Plan


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(devices: int, batch: int, *, precision: str = "bf16", fixed: dict[str, Any] | None = None,
               layers: int | None = None) -> list[Plan]:
    """Every plan the search considers (before the cost model judges them)."""
    fixed = dict(fixed or {})
    out = []
    for tp in _divisors(devices):
        for pp in _divisors(devices // tp):
            dp = devices // (tp * pp)
            if any(fixed.get(k, v) != v for k, v in (("dp", dp), ("pp", pp), ("tp", tp))):
                continue
            if layers is not None and pp > layers:
                continue
            share = batch // dp if batch % dp == 0 else 0
            cap = max(16, 8 * pp)
            counts = [m for m in _divisors(share) if m <= cap] if share else [1]
            for zero in (0, 1, 2, 3) if dp > 1 else (0,):
                for schedule in SCHEDULES if pp > 1 else ("1f1b",):
                    for m in counts:
                        for checkpointing in (False, True):
                            fields = dict(dp=dp, pp=pp, tp=tp, zero=zero, microbatches=m, schedule=schedule,
                                          checkpointing=checkpointing, precision=precision)
                            fields.update({k: v for k, v in fixed.items() if k not in ("dp", "pp", "tp")})
                            out.append(Plan(**fields))
    return list(dict.fromkeys(out))  # fixed fields can make duplicates


def search(work: Workload, hw: Hardware, devices: int, batch: int, *, precision: str = "bf16",
           budget: float | None = None, fixed: dict[str, Any] | None = None) -> list[Estimate]:
    """Every candidate's estimate: the feasible ones fastest first, then the rejected ones."""
    if devices < 1 or batch < 1:
        raise ValueError(f"devices={devices} and batch={batch} must both be >= 1")
    plans = candidates(devices, batch, precision=precision, fixed=fixed, layers=len(work.layers))
    if not plans:
        raise ValueError(f"no plan for {devices} devices matches {fixed}: dp x pp x tp must equal {devices}")
    from meshwise.observe import Progress

    bar = Progress(len(plans), enabled=len(plans) > 1000, desc="planning")  # seconds of work
    out = []
    for plan in plans:
        out.append(estimate(work, plan, hw, batch, budget=budget))
        bar.update()
    bar.close()
    return rank(out)


def rank(results: list[Estimate]) -> list[Estimate]:
    """The feasible estimates fastest first, then the rejected ones. Within 1% of the fastest,
    the simpler plan comes first: fewer processes, less sharding, fewer stages, no
    recomputation, fewer micro-batches."""
    ranked = sorted(results, key=lambda e: (not e.feasible, e.step_time, str(e.plan)))
    if ranked and ranked[0].feasible:
        near = [e for e in ranked if e.feasible and e.step_time <= ranked[0].step_time * 1.01]
        near.sort(key=lambda e: (e.plan.world_size, e.plan.zero, e.plan.pp, e.plan.tp, e.plan.checkpointing,
                                 e.plan.microbatches or 1, e.step_time))
        ranked = near + ranked[len(near):]
    return ranked


def as_json(result: Estimate) -> dict[str, Any]:
    """One plan's prediction in the documented, stable JSON form (docs/planner.md)."""
    mem = result.memory
    return {
        "plan": result.plan.to_dict(),
        "processes": result.plan.world_size,
        "threads_per_process": result.threads or None,
        "feasible": result.feasible,
        "reason": result.reason,
        "step_time_s": result.step_time if result.memory else None,
        "samples_per_s": result.samples_per_s,
        "tokens_per_s": result.tokens_per_s,
        "tflops_per_device": result.tflops_per_device,
        "memory_per_device_bytes": None if mem is None else {
            **dataclasses.asdict(mem), "total": mem.total},
        "breakdown_s": None if mem is None else {
            "compute": result.compute, "bubble": result.bubble, "exposed_communication": result.communication,
            "optimizer": result.optimizer},
    }


def table(results: list[Estimate], top: int, budget: float) -> str:
    """The best ``top`` plans, then the reasons the others were rejected (most common first)."""
    feasible = [r for r in results if r.feasible]
    threads = any(r.threads for r in results)
    rows = [f"{'#':>3}  {'plan':<62}{'procs x threads  ' if threads else ''}{'step ms':>10}{'samples/s':>11}{'TFLOP/s/dev':>13}{'memory GB':>11}"
            f"  (params/grads/optim/acts)"]
    for i, r in enumerate(feasible[:top], 1):
        m = r.memory
        assert m is not None
        shape = f"{r.plan.world_size:>5} x {r.threads:<9}" if threads else ""
        rows.append(f"{i:>3}  {str(r.plan):<62}{shape}{r.step_time * 1e3:>10.4g}{r.samples_per_s:>11.1f}{r.tflops_per_device:>13.1f}"
                    f"{m.total / GB:>11.1f}  ({m.parameters / GB:.1f}/{m.gradients / GB:.1f}/{m.optimizer / GB:.1f}/"
                    f"{m.activations / GB:.1f})")
    rejected: dict[str, int] = {}
    for r in results:
        if not r.feasible:
            key = r.reason if not r.reason.startswith("needs ") else f"over the {budget / GB:.1f} GB budget"
            rejected[key] = rejected.get(key, 0) + 1
    rows.append(f"{len(feasible)} feasible of {len(results)} candidates")
    if not feasible and results:
        closest = min((r for r in results if r.memory is not None), key=lambda r: r.memory.total, default=None)
        if closest is not None:
            rows.append(f"the smallest needs {closest.memory.total / GB:.1f} GB per device: {closest.plan}")
    for reason, count in sorted(rejected.items(), key=lambda kv: -kv[1])[:8]:
        rows.append(f"  rejected {count:>5}: {reason}")
    return "\n".join(rows)


def dumps(results: list[Estimate], top: int) -> str:
    feasible = [r for r in results if r.feasible][:top]
    rejected = [r for r in results if not r.feasible]
    return json.dumps({"plans": [as_json(r) for r in feasible], "rejected": [as_json(r) for r in rejected]}, indent=1)


def chart(results: list[Estimate], path: str, title: str) -> None:
    """A PNG of predicted step time against memory per device for every estimated candidate
    (feasible ones filled, over-budget ones hollow), the best few labelled. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.memory is not None and math.isfinite(r.step_time)]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for feasible, style in ((False, dict(facecolors="none", edgecolors="#bbbbbb")),
                            (True, dict(color="#1f77b4"))):
        points = [r for r in shown if r.feasible == feasible]
        ax.scatter([r.memory.total / GB for r in points], [r.step_time for r in points], s=12,  # type: ignore[union-attr]
                   label="feasible" if feasible else "over the memory budget", **style)
    best = [r for r in shown if r.feasible][:3]
    for i, r in enumerate(best, 1):
        ax.annotate(str(i), (r.memory.total / GB, r.step_time), fontsize=8, xytext=(4, 4),  # type: ignore[union-attr]
                    textcoords="offset points")
    if best:
        ax.text(0.01, 0.99, "\n".join(f"{i}: {r.plan}" for i, r in enumerate(best, 1)), transform=ax.transAxes,
                fontsize=7, va="top", family="monospace", bbox=dict(facecolor="white", alpha=0.8, lw=0))
    ax.set_xscale("log")
    ax.set_xlabel("memory per device, GB (log)")
    ax.set_ylabel("predicted step time, s")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
