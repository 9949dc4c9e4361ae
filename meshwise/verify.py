"""``meshwise verify``: run a training script in one process and under a plan, and compare.

    meshwise verify train.py --plan dp=2,pp=2 --steps 10

The script runs unmodified, twice, with the same seeds: once as a single process
(plan dp=1) and once under the plan. In both runs the engine (``parallelize``) records
every step's loss and rows, and rank 0 gathers the whole model after each step; after
``--steps`` steps the run stops. The per-step losses and the final parameters are then
compared by name against a tolerance chosen for the precision, and a failure is
explained where its cause can be told:

* rows trained differ (a step missing, a batch smaller): the uneven tail was dropped;
* the step draws random numbers (dropout), so no two splits can match; if the ranks'
  generators started apart, the script seeds by rank;
* the first update is a fixed multiple of the single-process one for every parameter:
  the loss sums over rows instead of averaging them;
* the first losses differ before any update: the runs start from different weights or data.

The script must call ``parallelize`` once; the plan it passes is replaced by each run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from typing import Any

import torch

from meshwise.observe import VERIFY_ENV, write_json

TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
SHOWN = 20
"""Steps shown in the table; past that, the first and last ones and every step out of tolerance."""
WHY = {
    "fp32": "fp32 keeps 24 significant bits; sums split over processes or micro-batches add the same "
            "terms in another order, which moves the last bits (about 1e-7 relative) each step. 1e-4 "
            "leaves room for that while a real mistake (a wrong loss scale, lost rows, other random "
            "masks) moves values by 1e-3 or more",
    "bf16": "bf16 autocast keeps 8 significant bits: each matrix product rounds by about 4e-3 relative, "
            "and a split changes which partial sums are rounded, so losses drift apart by up to a few "
            "percent; 5e-2 allows that and still catches a loss scaled by 2 or lost rows",
}


class Probe:
    """Worker side: records each step into the verify directory and stops the script."""

    claimed: Probe | None = None
    """The probe of the first engine that steps: the one compared (helpers that only
    predict are left alone)."""

    def __init__(self, engine: Any, spec: str) -> None:
        directory, _, steps = spec.rpartition(":")
        self.engine, self.dir, self.steps = engine, directory, int(steps)
        os.makedirs(directory, exist_ok=True)
        self.losses: list[float] = []
        self.rows: list[int] = []
        self.states: dict[str, dict[str, torch.Tensor] | None] = {}
        self.rng: dict[str, Any] = {}

    def wrap(self, step: Any) -> Any:
        def probed(batch: Any) -> float:
            if Probe.claimed is None:
                Probe.claimed = self
                if self.engine.is_main:
                    import atexit

                    atexit.register(self._write)  # also when the script ends before --steps
            if Probe.claimed is not self:
                return step(batch)
            engine = self.engine
            first = not self.losses
            if first:
                self.states["initial"] = engine.full_state_dict()
                before = _rng_digest()
            loss = step(batch)
            if first:
                self.rng = {"before": before, "draws": _rng_digest() != before}
                write_json(os.path.join(self.dir, f"rank-{engine.rank}.json"), self.rng)
            self.losses.append(loss)
            self.rows.append(engine.last_rows)
            state = engine.full_state_dict()
            if first:
                self.states["first"] = state
            self.states["final"] = state
            if len(self.losses) >= self.steps:
                sys.exit(0)  # every rank reaches this step: nobody is left waiting
            return loss

        return probed

    def _write(self) -> None:
        from safetensors.torch import save_file

        for name, state in self.states.items():
            if state is not None:
                save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(self.dir, f"{name}.safetensors"))
        write_json(os.path.join(self.dir, "steps.json"), {
            "losses": self.losses, "rows": self.rows, "plan": str(self.engine.plan),
            "precision": self.engine.plan.precision, "world_size": self.engine.world_size})


def _rng_digest() -> str:
    h = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for state in torch.cuda.get_rng_state_all():
            h.update(state.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Run:
    """What one run left: its steps, states, and each rank's random-generator record."""

    label: str
    losses: list[float]
    rows: list[int]
    precision: str
    states: dict[str, dict[str, torch.Tensor]]
    rng: list[dict[str, Any]]


def _load(directory: str, label: str) -> Run:
    from safetensors.torch import load_file

    with open(os.path.join(directory, "steps.json")) as f:
        steps = json.load(f)
    states = {name: load_file(os.path.join(directory, f"{name}.safetensors"))
              for name in ("initial", "first", "final") if os.path.exists(os.path.join(directory, f"{name}.safetensors"))}
    rng = []
    for r in range(steps["world_size"]):
        path = os.path.join(directory, f"rank-{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                rng.append(json.load(f))
    return Run(label, steps["losses"], steps["rows"], steps["precision"], states, rng)


def _launch(script: list[str], plan: str, nproc: int, steps: int, directory: str, device: str | None,
            log: str) -> subprocess.Popen:
    from meshwise.dist import DEVICE_ENV, PLAN_ENV
    from meshwise.observe import QUIET_ENV

    os.makedirs(directory, exist_ok=True)
    env = {**os.environ, VERIFY_ENV: f"{directory}:{steps}", "PYTHONHASHSEED": "0", QUIET_ENV: "1"}
    for name in ("steps.json", "initial.safetensors", "first.safetensors", "final.safetensors"):
        with contextlib.suppress(FileNotFoundError):  # a --keep directory used before
            os.remove(os.path.join(directory, name))
    if nproc == 1:  # the reference: the script as a plain process, as `python SCRIPT` runs it
        command = [sys.executable, "-m", "meshwise.worker", *script]
        env.update({PLAN_ENV: plan, **({DEVICE_ENV: device} if device else {})})
    else:
        command = [sys.executable, "-m", "meshwise.cli", "run", "--quiet", "--no-run-dir", "--nproc", str(nproc),
                   "--plan", plan, *(["--device", device] if device else []), *script]
    with open(log, "w") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)


def verify(script: list[str], plans: list[tuple[str, int]], *, steps: int, tolerance: float | None = None,
           device: str | None = None, keep: str | None = None) -> tuple[bool, str]:
    """Run ``script`` alone and under each ``(plan, processes)``; (all passed, the report to print).

    A plan is compared with one process of its own precision and recomputation; plans that
    share those share the reference run."""
    work = keep or tempfile.mkdtemp(prefix="meshwise-verify-")
    most = max(n for _, n in plans)
    # every run on the same kind of device: the parallel runs' (one GPU per process, else the CPU)
    device = device or ("cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= most else "cpu")
    references = {plan: _reference(plan) for plan, _ in plans}
    jobs = [("1 process", ref, 1, os.path.join(work, f"single-{i}")) for i, ref in enumerate(dict.fromkeys(references.values()))]
    jobs += [(plan, plan, n, os.path.join(work, f"parallel-{i}")) for i, (plan, n) in enumerate(plans)]
    at_once = 2 if device == "cpu" else 1  # on GPUs one run at a time, or they would share GPU 0
    running: list[tuple[str, str, str, subprocess.Popen]] = []
    runs: dict[str, Run] = {}
    try:
        while jobs or running:
            if jobs and len(running) < at_once:
                label, plan, n, directory = jobs.pop(0)
                running.append((label, plan, directory, _launch(script, plan, n, steps, directory, device,
                                                                 directory + ".log")))
                continue
            done = next((r for r in running if r[-1].poll() is not None), None)
            if done is None:
                time.sleep(0.05)
                continue
            running.remove(done)
            failed = _failure(*done)
            if failed:
                return False, failed
            runs[done[1]] = _load(done[2], done[0])
    finally:  # a failure, Ctrl-C: stop what still runs, leave nothing behind
        for *_, process in running:
            if process.poll() is None:
                process.kill()
                process.wait()
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    verdicts = [compare(runs[references[plan]], runs[plan], steps, tolerance) for plan, _ in plans]
    text = "\n\n".join(t for _, t in verdicts)
    if len(plans) > 1:
        passed = [plan for (plan, _), (ok, _) in zip(plans, verdicts) if ok]
        text += (f"\n\n{len(passed)} of {len(plans)} plans train like one process"
                 + (f"; FAIL: {', '.join(p for p, _ in plans if p not in passed)}" if len(passed) < len(plans) else ""))
    return all(ok for ok, _ in verdicts), text


def _failure(label: str, plan: str, directory: str, process: subprocess.Popen) -> str | None:
    """What went wrong with a finished run, with the end of its output; None if it recorded its steps."""
    code = process.wait()
    if code == 0 and os.path.exists(os.path.join(directory, "steps.json")):
        return None
    with open(directory + ".log") as f:
        tail = "".join(f.readlines()[-25:])
    why = (f"exit code {code}" if code != 0 else
           "it never called meshwise.parallelize, or ran no step (verify compares the steps of an engine)")
    return f"meshwise verify: the run with plan {plan} ({label}) failed ({why}); its output ends:\n{tail}"


def command(parser: Any, ns: Any) -> int:
    """``meshwise verify``'s arguments checked (a bad one: ``parser.error``, exit 2), then the check:
    0 if every plan passes, else 1."""
    from meshwise.plan import Plan

    plans = []
    for text in ns.plan:
        try:
            plan = Plan.parse(text) if text.strip() != "auto" else None
        except ValueError as error:
            parser.error(str(error))
        nproc = ns.nproc if ns.nproc is not None else (plan.world_size if plan else None)
        if nproc is None:
            parser.error("--plan auto needs --nproc N (the processes to plan for)")
        if nproc < 2 and (plan is None or plan.world_size < 2):
            parser.error(f"--plan {text} runs in one process, which is the reference: give a plan of 2 or more "
                         f"processes, e.g. --plan dp=2")
        if plan is not None and plan.world_size != nproc:
            parser.error(f"plan {plan} needs {plan.world_size} processes but --nproc is {nproc}; make them equal")
        plans.append((str(plan) if plan else "auto", nproc))
    if ns.steps < 1:
        parser.error(f"--steps {ns.steps} is invalid: compare at least 1 step")
    if ns.tolerance is not None and not ns.tolerance > 0:
        parser.error(f"--tolerance {ns.tolerance:g} is invalid: give a relative difference > 0, e.g. 1e-4")
    if not os.path.isfile(ns.script):
        parser.error(f"script {ns.script!r} not found")
    passed, text = verify([ns.script, *ns.args], plans, steps=ns.steps, tolerance=ns.tolerance, device=ns.device,
                          keep=ns.keep)
    print(text)
    return 0 if passed else 1


def _reference(plan: str) -> str:
    """The one-process plan to compare with: dp=1, with the plan's precision and recomputation."""
    from meshwise.plan import Plan

    if plan == "auto":
        return "dp=1"
    parsed = Plan.parse(plan)
    return str(Plan(precision=parsed.precision, checkpointing=parsed.checkpointing))


def compare(single: Run, parallel: Run, steps: int, tolerance: float | None = None) -> tuple[bool, str]:
    """The verdict table and the diagnosis, from two recorded runs."""
    precision = parallel.precision
    tol = tolerance if tolerance is not None else TOLERANCE.get(precision, TOLERANCE["bf16"])
    lines = [f"meshwise verify: {parallel.label} against 1 process, {len(single.losses)} step(s) "
             f"(--steps {steps}), {precision}", "",
             f"{'step':>5}  {'loss, 1 process':>16}  {'loss, ' + parallel.label:>{max(16, len(parallel.label) + 6)}}  "
             f"{'difference':>10}"]
    worst_loss = 0.0
    width = max(16, len(parallel.label) + 6)
    count = max(len(single.losses), len(parallel.losses))
    for i in range(count):
        a = single.losses[i] if i < len(single.losses) else None
        b = parallel.losses[i] if i < len(parallel.losses) else None
        diff = abs(a - b) / max(1.0, abs(a)) if a is not None and b is not None else math.inf
        worst_loss = max(worst_loss, diff)
        if count <= SHOWN or i < SHOWN // 2 or i >= count - SHOWN // 4 or diff > (tolerance or tol):
            lines.append(f"{i + 1:>5}  {_num(a):>16}  {_num(b):>{width}}  {_num(diff, '.1e'):>10}")
        elif lines[-1] != "  ...":
            lines.append("  ...")
    name, worst = _worst(single.states.get("final", {}), parallel.states.get("final", {}))
    lines += ["", f"worst parameter: {name}, difference {_num(worst, '.2e')}"]
    passed = worst_loss <= tol and worst <= tol
    why = "given with --tolerance" if tolerance is not None else WHY.get(precision, "")
    lines += textwrap.wrap(f"tolerance: {tol:g}, relative to max(1, |value|) ({why})", 100, subsequent_indent="  ")
    if passed:
        lines.append(f"PASS: {parallel.label} trains like one process (losses within {worst_loss:.1e}, "
                     f"parameters within {worst:.1e})")
    else:
        lines.append(f"FAIL: {parallel.label} does not train like one process (losses differ by up to "
                     f"{_num(worst_loss, '.1e')}, parameters by {_num(worst, '.1e')})")
        for cause in diagnose(single, parallel, tol):
            lines += textwrap.wrap(cause, 100, initial_indent="  - ", subsequent_indent="    ")
    return passed, "\n".join(lines)


def diagnose(single: Run, parallel: Run, tol: float) -> list[str]:
    """Likely causes of a difference, most specific first."""
    causes = []
    if single.rows != parallel.rows:
        for i in range(max(len(single.rows), len(parallel.rows))):
            a = single.rows[i] if i < len(single.rows) else None
            b = parallel.rows[i] if i < len(parallel.rows) else None
            if a != b:
                break
        causes.append(
            f"rows trained differ from step {i + 1}: {a if a is not None else 'no step'} in one process, "
            f"{b if b is not None else 'no step'} under {parallel.label} ({sum(single.rows)} rows against "
            f"{sum(parallel.rows)} in all). The parallel run drops or loses rows, typically the uneven last "
            f"batch (drop_last, or a sampler that evens shards out); engine.loader keeps every row.")
    draws = [r for r in single.rng + parallel.rng if r.get("draws")]
    if draws:
        apart = len({r["before"] for r in parallel.rng}) > 1
        causes.append(
            "the training step draws random numbers (dropout or another random layer), so its masks cannot "
            "match between one process and a split batch." +
            (" The ranks' random generators also began step 1 in different states: the script seeds by rank "
             "(e.g. torch.manual_seed(rank)); seed every rank alike." if apart else "") +
            " To verify the plan itself, set dropout to 0 for the check.")
    same_start = _worst(single.states.get("initial", {}), parallel.states.get("initial", {}))[1] == 0
    update = _update_scale(single.states, parallel.states)
    ratio = (parallel.losses[0] / single.losses[0]
             if single.losses and parallel.losses and single.losses[0] and same_start else 1.0)
    scaled = [f"the first update is {update:.3g}x the single-process one for every parameter"
              if update is not None and abs(update - 1) > 0.1 else "",
              f"the step-1 loss is {ratio:.3g}x the single-process one from the same weights and rows"
              if abs(ratio - 1) > 0.1 and single.rows[:1] == parallel.rows[:1] else ""]
    if any(scaled) and not draws:
        causes.append(
            f"{' and '.join(s for s in scaled if s)}: the loss sums over rows instead of averaging them "
            f"(reduction='sum'), so splitting the batch scales it (Adam's update hardly shows it; the loss "
            f"does). meshwise weights each share as a mean: use reduction='mean', or divide the sum by the "
            f"rows of the batch.")
    if (not causes and single.losses and parallel.losses
            and abs(single.losses[0] - parallel.losses[0]) > tol * max(1.0, abs(single.losses[0]))):
        _, start = _worst(single.states.get("initial", {}), parallel.states.get("initial", {}))
        causes.append(
            "the step-1 losses already differ, before any update: " +
            ("the initial weights differ (the model is built after a rank- or time-dependent seed?)" if start > 0 else
             "the model starts alike, so the data differs (a batch that depends on the rank or the world size?)"))
    if not causes:
        step = next((i + 1 for i, (a, b) in enumerate(zip(single.losses, parallel.losses, strict=False))
                     if abs(a - b) > tol * max(1.0, abs(a))), None)
        causes.append(f"no known cause found; the losses part from step {step}" if step else
                      "no known cause found; the losses agree but the parameters differ (state outside the loss, "
                      "such as buffers updated differently per replica?)")
    return causes


def _update_scale(single: dict[str, dict[str, torch.Tensor]], parallel: dict[str, dict[str, torch.Tensor]]
                  ) -> float | None:
    """The factor c with (parallel update) = c x (single update) at step 1, if one fits every
    parameter (least squares, residual under 1%); None otherwise."""
    needed = ("initial", "first")
    if not all(k in single and k in parallel for k in needed):
        return None
    dot = norm = 0.0
    pairs = []
    for name, start in single["initial"].items():
        if name not in parallel["first"] or not start.is_floating_point():
            continue
        a = (single["first"][name] - start).double()
        b = (parallel["first"][name] - parallel["initial"][name]).double()
        dot, norm = dot + float((a * b).sum()), norm + float((a * a).sum())
        pairs.append((a, b))
    if norm == 0:
        return None
    c = dot / norm
    residual = sum(float(((b - c * a) ** 2).sum()) for a, b in pairs)
    return c if residual <= 1e-4 * c * c * norm else None


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[str, float]:
    """The parameter that differs most (relative to max(1, |value|)), by name."""
    if not a or not b:
        return "(no final state recorded)", math.inf
    missing = sorted(set(a) ^ set(b))
    if missing:
        return f"{missing[0]} (in one run only)", math.inf
    worst, name = 0.0, "(none)"
    for key, x in a.items():
        if not (x.is_floating_point() and b[key].is_floating_point()):
            continue
        if x.shape != b[key].shape:
            return f"{key} (shapes {tuple(x.shape)} and {tuple(b[key].shape)})", math.inf
        diff = float((x.double() - b[key].double()).abs().max()) / max(1.0, float(x.double().abs().max()))
        if diff > worst or name == "(none)":
            worst, name = diff, key
    return name, worst


def _num(value: float | None, fmt: str = ".6f") -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return format(value, fmt)
