"""Reading a run directory: what a run left behind, and the figures drawn from it.

A run directory (docs/report.md) holds what ``meshwise run`` and ``meshwise demo`` record:

* ``run.json``: the command, plan, mesh, stages, host and prediction (rank 0, once);
* ``metrics.jsonl``: one JSON object per training step (rank 0);
* ``rank-R.jsonl``: every rank's step time and memory, one line per step;
* ``trace.json`` and ``trace.png``: the pipeline timeline, when it was recorded.

``load`` reads them into a ``Run``; a file that is absent reads as empty, a malformed one
is a ValueError naming it, and an unterminated last line (a run still writing it) is
skipped. The figures the report draws are computed here: medians use the ``steady``
steps, those after the first ``WARMUP`` (warm-up: lazy initialisation, first allocations).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import statistics
from dataclasses import dataclass
from typing import Any

WARMUP = 5  # steps left out of measured medians (engine.AUTO_WARMUP_STEPS)
HOW = "run `meshwise run ...` or `meshwise demo`, which write runs/NAME-TIMESTAMP-XXXX/ (docs/report.md)"
PARTS = {"compute_s": "compute", "communication_s": "communication", "bubble_s": "bubble", "optimizer_s": "optimizer"}
Record = dict[str, Any]


@dataclass
class Run:
    """What a run directory holds; a file that is absent reads as empty."""

    path: str
    info: Record  # run.json
    steps: list[Record]  # metrics.jsonl, rank 0
    ranks: dict[int, list[Record]]  # rank-R.jsonl by R
    trace: Record  # trace.json
    trace_png: str | None


def load(run_dir: str) -> Run:
    """Read a run directory; ValueError if it is none, or if a file in it is malformed."""
    path = os.path.abspath(run_dir)
    names = ("run.json", "metrics.jsonl", "trace.json", "trace.png")
    here = {name: os.path.join(path, name) for name in names if os.path.isfile(os.path.join(path, name))}
    if "run.json" not in here and "metrics.jsonl" not in here:
        why = ("it has no metrics.jsonl and no run.json" if os.path.isdir(path)
               else "it is not a directory" if os.path.exists(path) else "it does not exist")
        raise ValueError(f"{run_dir} is not a run directory: {why}; to get one, {HOW}")
    ranks = {}
    for name in glob.glob(os.path.join(path, "rank-*.jsonl")):
        if match := re.fullmatch(r"rank-(\d+)\.jsonl", os.path.basename(name)):
            ranks[int(match.group(1))] = _read_jsonl(name)
    return Run(path, _read_json(here["run.json"]) if "run.json" in here else {},
               _read_jsonl(here["metrics.jsonl"]) if "metrics.jsonl" in here else [], dict(sorted(ranks.items())),
               _read_json(here["trace.json"]) if "trace.json" in here else {}, here.get("trace.png"))


def _read_json(path: str) -> Record:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun, or delete the file to report without it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; delete it to report without it")
    return value


def _read_jsonl(path: str) -> list[Record]:
    """One JSON object a line. An unterminated last line (a run still writing it) is ignored."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]  # what follows the last newline is unfinished, or empty
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number} is not a JSON object: {line[:80]!r}; each line is one "
                             "step's record: fix or delete that line")
        records.append(record)
    return records


def series(records: list[Record], key: str) -> tuple[list[Any], list[float]]:
    """(steps, values) of the records that have a number at ``key``."""
    kept = [r for r in records if isinstance(r.get(key), (int, float))]
    return [r.get("step") for r in kept], [float(r[key]) for r in kept]


def steady(steps: list[Record]) -> list[Record]:
    """The steps medians use: after the first WARMUP, or after the first, or all there are."""
    return steps[WARMUP:] if len(steps) > WARMUP else steps[1:] or steps


def median(records: list[Record], key: str) -> float | None:
    values = series(records, key)[1]
    return statistics.median(values) if values else None


def bubble_ms(run: Run) -> float | None:
    """A pipeline rank's idle ms a step: the measured bubble fraction x the pipeline's mean span
    over the traced steps after the first (the steps meshwise.trace measures)."""
    measured = ((run.trace.get("meshwise") or {}).get("bubble") or {}).get("measured")
    spans: dict[tuple[Any, Any], list[tuple[float, float]]] = collections.defaultdict(list)
    for e in run.trace.get("traceEvents", []):
        if e.get("ph") == "X":
            spans[(e.get("args", {}).get("step"), e.get("pid"))].append((e["ts"], e["ts"] + e["dur"]))
    steps = sorted({step for step, _ in spans if step is not None})
    counted = [v for (step, _), v in spans.items() if step in steps[1:]] or list(spans.values())
    if not isinstance(measured, (int, float)) or measured != measured or not counted:
        return None
    return measured * statistics.mean(max(t1 for _, t1 in v) - min(t0 for t0, _ in v) for v in counted) / 1e3


def breakdown(run: Run) -> dict[str, dict[str, float]]:
    """The step-time bars in ms: 'predicted' by part; 'measured' as its bubble and the rest."""
    predicted, bars = run.info.get("predicted") or {}, {}
    parts = {name: predicted[key] * 1e3 for key, name in PARTS.items() if isinstance(predicted.get(key), (int, float))}
    if parts:
        bars["predicted"] = parts
    if (step_s := median(steady(run.steps), "step_s")) is not None:
        bubble = bubble_ms(run)
        bars["measured"] = ({"bubble": bubble, "compute + communication + optimizer": max(0.0, step_s * 1e3 - bubble)}
                            if bubble is not None else {"step (not broken down)": step_s * 1e3})
    return bars


def memory_per_rank(run: Run) -> dict[int, tuple[float, float]]:
    """Per rank: (peak memory_mb, peak state_mb); rank 0's metrics when no rank-R.jsonl was written."""
    ranks = run.ranks or ({0: run.steps} if run.steps else {})
    peaks = {r: tuple(max(series(records, key)[1], default=None) for key in ("memory_mb", "state_mb"))
             for r, records in ranks.items()}
    return {r: (memory or 0.0, state or 0.0) for r, (memory, state) in peaks.items() if (memory, state) != (None, None)}
