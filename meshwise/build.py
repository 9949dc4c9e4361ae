"""``parallelize``: from a single-device model and a plan to a running engine.

In order: the plan is taken (the argument, else the launcher's ``--plan``, else data
parallelism over every process) or planned (``"auto"``: profiled, searched and agreed
on by every rank, meshwise.profile); the engine for it is made (pipeline, ZeRO-2/3,
tensor or data parallel, each in its own module); the learning-rate scheduler is built
on its optimizer; a checkpoint is loaded when resuming; the run is recorded
(meshwise.observe) or probed under ``meshwise verify``; and every step is guarded by the
collective timeout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from meshwise import data, lr_schedule, observe
from meshwise import dist as mwdist
from meshwise.engine import Engine, LossFn, OptimizerArg
from meshwise.plan import Plan, resolve_plan


def parallelize(
    model: torch.nn.Module,
    plan: Plan | str | None = None,
    *,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerArg | None = None,
    sample: Any = None,
    device: str | torch.device | None = None,
    trace: bool = False,
    stages: Any = None,
    batch_size: int | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 0,
    keep: int = 3,
    resume: bool | None = None,
    timeout: float | None = None,
    scheduler: Callable[[Any], Any] | None = None,
    run_dir: str | None = None,
    tensorboard: bool | None = None,
) -> Engine:
    """Wrap a single-device ``model`` for training and inference under ``plan``.

    ``plan=None`` takes the launcher's ``--plan``, else data parallelism over every
    process. ``optimizer`` is a function of the parameters (``lambda p: AdamW(p)``) or an
    optimizer already built on ``model.parameters()``. ``sample`` is one example batch
    ``(x, y)``: later batches must match its per-sample shapes and dtypes. ``device``
    ``"cpu"`` forces the CPU (default: the launcher's ``--device``, else one GPU per
    local rank where CUDA is available). ``trace=True`` records a pipeline's timeline
    (``engine.write_trace(dir)``). ``stages`` overrides where a pipeline is cut: a
    ``meshwise.partition`` result or a list of ``(start, stop)`` layer ranges.

    ``plan="auto"`` (``--plan auto``) profiles the model on ``sample``, measures the
    job's links, searches the plans for this many processes and a global batch of
    ``batch_size`` rows (default: the sample's), runs the fastest, and after
    ``AUTO_CHECK_STEPS`` steps prints its measured step time against the prediction.

    ``checkpoint`` is a directory for checkpoints (``engine.save()``; every
    ``checkpoint_every`` steps if > 0; the last ``keep`` kept). ``resume=True`` loads the
    latest complete one there, if any; the default resumes under ``meshwise run --resume``
    and when the launcher restarts the job after a failure (``--max-restarts``). Train
    from ``engine.epoch`` with ``engine.loader(..., epoch=epoch)`` to continue where the
    checkpoint stood (see docs/checkpoints.md).

    ``timeout``: seconds a collective may wait for the other ranks (default ``--timeout``,
    else 600); past it the step fails, naming the rank, the step and the ranks behind.

    ``scheduler``: a function of the optimizer that makes a learning-rate scheduler
    (``lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=N)``); it
    is stepped after every optimizer step, and checkpoints save and restore it.

    ``run_dir`` (default: the directory ``meshwise run`` made) records the run: the plan,
    the host, and per step the loss, throughput, step time and memory (docs/report.md);
    ``tensorboard=True`` (``--tensorboard``) also writes them as TensorBoard event files.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"parallelize expects a torch.nn.Module, got {type(model).__name__}")
    ctx = mwdist.init(device if device is not None else os.environ.get(mwdist.DEVICE_ENV), timeout)
    if os.environ.get("MESHWISE_SEARCH"):  # meshwise plan SCRIPT: profile, rank, stop the script
        import json

        from meshwise.profile import answer_search

        answer_search(model, sample, ctx.device, loss_fn, optimizer, json.loads(os.environ["MESHWISE_SEARCH"]))
    spec = plan if plan is not None else os.environ.get(mwdist.PLAN_ENV) or None
    verifying = os.environ.get(observe.VERIFY_ENV)
    if verifying:  # meshwise verify: each of its runs sets the plan, whatever the script passes
        spec = os.environ.get(mwdist.PLAN_ENV) or None
    predicted = None
    if isinstance(spec, str) and spec.strip() == "auto":
        if sample is None:
            raise ValueError("plan='auto' profiles the model on a sample: pass sample=(x, y) (one example batch)")
        from meshwise.profile import auto_plan

        batch = batch_size if batch_size is not None else data.batch_size_of(data.unpack(sample)[0])
        spec, predicted = auto_plan(model, sample, ctx.device, batch, is_main=ctx.is_main, loss_fn=loss_fn,
                                    optimizer=optimizer)
    plan = resolve_plan(spec, ctx.world_size)
    engine = _engine(model, plan, ctx, loss_fn=loss_fn, optimizer=optimizer, sample=sample, trace=trace,
                     stages=stages)
    if type(checkpoint_every) is not int or checkpoint_every < 0 or type(keep) is not int or keep < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every!r} and keep={keep!r} are invalid: checkpoint_every "
                         f"is a number of steps >= 0 (0: only engine.save()), keep >= 1")
    if checkpoint_every and not checkpoint:
        raise ValueError(f"checkpoint_every={checkpoint_every} needs a directory: pass checkpoint=DIR")
    if scheduler is not None:
        engine.scheduler, engine._steps_scheduler = lr_schedule.build(scheduler, engine.optimizer), True
    if verifying:  # the check starts fresh, and leaves the script's own checkpoints alone
        checkpoint = os.path.join(verifying.rpartition(":")[0], "checkpoints") if checkpoint else None
        resume = False
    engine.checkpoint_dir, engine.checkpoint_every, engine.checkpoint_keep = checkpoint, checkpoint_every, keep
    if resume is None:  # meshwise run --resume, or a restart after a failure
        resume = os.environ.get(RESUME_ENV) == "1" or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if resume and checkpoint:
        from meshwise.checkpoint import agreed_latest

        found = agreed_latest(checkpoint)
        if found is not None:
            meta = engine.load(found)
            if engine.is_main:
                observe.note(f"meshwise: resumed from {found} (step {meta['step']}, saved with plan {meta['plan']})")
    if predicted is not None:
        engine._watch(predicted)
    observe.instrument(engine, run_dir, tensorboard, getattr(predicted, "facts", None))
    engine._guard(mwdist.collective_timeout(timeout))
    return engine


RESUME_ENV = "MESHWISE_RESUME"
"""Set to 1 by ``meshwise run --resume``: ``parallelize`` loads the latest checkpoint."""


def _engine(model: torch.nn.Module, plan: Plan, ctx: mwdist.Context, *, loss_fn: LossFn | None,
            optimizer: OptimizerArg | None, sample: Any, trace: bool, stages: Any) -> Engine:
    if plan.pp > 1:  # tensor parallelism and ZeRO inside the stages
        from meshwise.pipeline import PipelineEngine

        return PipelineEngine(model, plan, ctx, loss_fn=loss_fn, optimizer=optimizer, sample=sample, trace=trace,
                              stages=stages)
    if plan.zero >= 2:  # with tensor parallelism inside the replicas
        from meshwise.zero import ShardedEngine

        return ShardedEngine(model, plan, ctx, loss_fn=loss_fn, optimizer=optimizer, sample=sample)
    if plan.tp > 1:
        from meshwise.tensor import TensorEngine

        return TensorEngine(model, plan, ctx, loss_fn=loss_fn, optimizer=optimizer, sample=sample)
    return Engine(model, plan, ctx, loss_fn=loss_fn, optimizer=optimizer, sample=sample)
