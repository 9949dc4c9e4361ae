"""Pipeline timelines: when each stage ran each micro-batch's forward and backward.

Each rank records spans (wall clock, so ranks on one host share a time base); rank 0
or the launcher merges them into

* ``trace.json``: Chrome trace format (open in chrome://tracing or ui.perfetto.dev),
  one process per replica, one thread per pipeline rank;
* ``trace.png``: a Gantt chart of the last recorded step, idle time left white;
* the bubble fraction, measured (1 - busy / (pp x step span), per replica, averaged over
  the recorded steps after the first) beside the theoretical one,
  ``(p - 1) / (v m + p - 1)`` for p ranks, v stages per rank and m micro-batches.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

KEEP_STEPS = 10


class Recorder:
    """This rank's spans for the last ``keep`` steps."""

    def __init__(self, rank: int, pp_rank: int, dp_rank: int, keep: int = KEEP_STEPS, record: bool = True) -> None:
        self.rank, self.pp_rank, self.dp_rank, self.keep = rank, pp_rank, dp_rank, keep
        self.record = record  # False on all but one of a stage's tensor-parallel ranks: one lane per stage
        self.events: list[dict[str, Any]] = []
        self.step = -1

    def begin_step(self, step: int) -> None:
        self.step = step
        self.events = [e for e in self.events if e["step"] > step - self.keep]

    @contextmanager
    def span(self, kind: str, stage: int, microbatch: int) -> Iterator[None]:
        if not self.record:
            yield
            return
        start = time.time()
        try:
            yield
        finally:
            self.events.append({"rank": self.rank, "pp": self.pp_rank, "dp": self.dp_rank, "step": self.step,
                                "kind": kind, "stage": stage, "mb": microbatch, "t0": start, "t1": time.time()})

    def dump_at_exit(self, directory: str) -> None:
        """Write this rank's spans to DIRECTORY/trace-rank{rank}.json when the process exits."""

        def dump() -> None:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"trace-rank{self.rank}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(self.events, f)
            os.replace(path + ".tmp", path)

        atexit.register(dump)


def bubble(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Measured and theoretical bubble fractions of the recorded steps."""
    steps = sorted({e["step"] for e in events})
    counted = steps[1:] if len(steps) > 1 else steps  # the first step also sets the stages up
    p = len({e["pp"] for e in events}) or 1
    stages = len({e["stage"] for e in events}) or 1
    v = max(1, stages // p)
    fractions, m = [], 1
    for step in counted:
        for d in sorted({e["dp"] for e in events if e["step"] == step}):
            mine = [e for e in events if e["step"] == step and e["dp"] == d]
            span = max(e["t1"] for e in mine) - min(e["t0"] for e in mine)
            busy = sum(e["t1"] - e["t0"] for e in mine)
            m = len({e["mb"] for e in mine})
            if span > 0:
                fractions.append(1 - busy / (p * span))
    measured = sum(fractions) / len(fractions) if fractions else float("nan")
    return {"measured": measured, "theoretical": (p - 1) / (v * m + p - 1), "pp": p, "stages_per_rank": v,
            "microbatches": m, "steps": len(counted)}


def write(directory: str, events: list[dict[str, Any]], title: str = "") -> dict[str, Any]:
    """trace.json and trace.png in ``directory``; returns the bubble figures and the paths."""
    if not events:
        raise ValueError("the timeline is empty: no training step ran while recording")
    os.makedirs(directory, exist_ok=True)
    origin = min(e["t0"] for e in events)
    trace: list[dict[str, Any]] = []
    for d in sorted({e["dp"] for e in events}):
        trace.append({"ph": "M", "name": "process_name", "pid": d, "args": {"name": f"replica {d}"}})
        for p in sorted({e["pp"] for e in events}):
            trace.append({"ph": "M", "name": "thread_name", "pid": d, "tid": p, "args": {"name": f"pipeline rank {p}"}})
    for e in events:
        trace.append({
            "name": f"{e['kind']}{e['mb']}", "cat": "forward" if e["kind"] == "F" else "backward", "ph": "X",
            "pid": e["dp"], "tid": e["pp"], "ts": (e["t0"] - origin) * 1e6, "dur": (e["t1"] - e["t0"]) * 1e6,
            "args": {"step": e["step"], "stage": e["stage"], "microbatch": e["mb"], "rank": e["rank"]},
        })
    figures = bubble(events)
    json_path = os.path.join(directory, "trace.json")
    with open(json_path, "w") as f:
        json.dump({"traceEvents": trace, "displayTimeUnit": "ms", "meshwise": {"title": title, "bubble": figures}}, f)
    png_path = os.path.join(directory, "trace.png")
    _gantt(png_path, events, figures, title)
    figures.update(json=json_path, png=png_path)
    return figures


def summary_line(figures: dict[str, Any]) -> str:
    return (f"pipeline bubble: measured {figures['measured']:.1%}, theoretical {figures['theoretical']:.1%} "
            f"(pp={figures['pp']}, {figures['stages_per_rank']} stage(s) per rank, {figures['microbatches']} "
            f"micro-batches, {figures['steps']} step(s)); timeline {figures['json']}, chart {figures['png']}")


def merge(directory: str, title: str = "") -> dict[str, Any] | None:
    """Merge the per-rank files a traced ``meshwise run`` left in ``directory``; None if there are none."""
    paths = sorted(glob.glob(os.path.join(directory, "trace-rank*.json")))
    events: list[dict[str, Any]] = []
    for path in paths:
        with open(path) as f:
            events += json.load(f)
    if not events:
        return None
    figures = write(directory, events, title)
    for path in paths:
        os.remove(path)
    return figures


def _gantt(path: str, events: list[dict[str, Any]], figures: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max(e["step"] for e in events)
    shown = [e for e in events if e["step"] == last]
    rows = sorted({(e["dp"], e["pp"]) for e in shown})
    origin = min(e["t0"] for e in shown)
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(rows) + 1.6))
    colours = {"F": "#4C72B0", "B": "#DD8452"}
    for e in shown:
        y = rows.index((e["dp"], e["pp"]))
        start, width = (e["t0"] - origin) * 1e3, (e["t1"] - e["t0"]) * 1e3
        shade = 0.55 + 0.45 * (e["stage"] // max(1, figures["pp"]) == 0)
        ax.broken_barh([(start, width)], (y - 0.4, 0.8), facecolors=colours[e["kind"]], alpha=shade,
                       edgecolor="white", linewidth=0.5)
        if width > 0:
            ax.text(start + width / 2, y, f"{e['kind']}{e['mb']}", ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(rows)), [f"replica {d}, rank {p}" for d, p in rows])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds since the step's first forward")
    ax.set_title(f"{title}  step {last}: bubble measured {figures['measured']:.1%}, "
                 f"theoretical {figures['theoretical']:.1%}  (blue forward, orange backward, white idle)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
