"""Pipeline parallelism, alone or with data parallelism on a 2-D (dp, pp) device mesh.

The model is cut into ``pp`` stages (``pp * 2`` for the interleaved schedule: each rank
holds two, ``r`` and ``r + pp``) by ``meshwise.partition``, balanced by measured cost.
``torch.distributed.pipelining`` runs the stages and the schedule (GPipe, 1F1B,
interleaved 1F1B); meshwise adds what it leaves to the user:

* **Exact loss weighting.** Micro-batch k of replica r is back-propagated with weight
  ``m_k / N`` (N: the global batch) and gradients are summed, never averaged, over
  micro-batches (``scale_grads=False``) and replicas, so the update equals one
  process's on the whole batch, for uneven replica shares as well.
* **Gradient synchronisation.** After the schedule, one flat all-reduce (sum) per group:
  each stage's gradients over its data-parallel replicas; a weight shared by stages on
  different ranks (tied embeddings) over every rank that holds it, so its copies get the
  same gradient and stay equal.
* **Any batch size.** Stage buffers have fixed shapes, so each micro-batch shape gets
  its own stages and schedule (cached); a batch the micro-batch count does not divide
  (an epoch's last) runs with the largest count below it that does, still exact.
* **The loss on every rank.** Only the last stage computes it; one scalar all-reduce
  gives every rank the global mean.

Mesh layout: rank = dp_index * pp + pp_index (pipelines are consecutive ranks).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
)

from meshwise import data, memory
from meshwise import dist as mwdist
from meshwise.engine import Engine, LossFn, OptimizerArg, _build_optimizer
from meshwise.observe import note
from meshwise.partition import Partition, split_model, untouched
from meshwise.plan import Plan, interleaved_rounds_ok
from meshwise.trace import Recorder

VIRTUAL_STAGES = 2
"""Stages per rank in the interleaved schedule."""

TRACE_ENV = "MESHWISE_TRACE"

RUNNERS_KEPT = 8
"""Stage sets kept for distinct micro-batch shapes (training and predict)."""


def check_plan(plan: Plan) -> None:
    """Errors a pipeline plan can have before any model is seen."""
    if plan.schedule == "1f1b" and plan.microbatches < plan.pp:
        raise ValueError(
            f"schedule=1f1b needs at least as many micro-batches as pipeline stages: microbatches="
            f"{plan.microbatches} < pp={plan.pp}; use microbatches>={plan.pp} (more shrinks the bubble)"
        )
    if plan.schedule == "interleaved" and not interleaved_rounds_ok(plan.microbatches, plan.pp):
        m = plan.microbatches
        near = [k for k in range(max(1, m - 4), m + 5) if interleaved_rounds_ok(k, plan.pp)]
        raise ValueError(
            f"schedule=interleaved with pp={plan.pp} cannot run microbatches={m}: torch's interleaved 1F1B "
            f"needs the count to be a multiple of its rounds, max(1, m // pp) = {max(1, m // plan.pp)}; "
            f"use one of {near}"
        )


class PipelineEngine(Engine):
    """Trains and predicts a model cut into pipeline stages (see the module docstring)."""

    _collectives = "the pipeline's sends and receives or the gradient all-reduce"

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan,
        ctx: mwdist.Context,
        *,
        loss_fn: LossFn | None,
        optimizer: OptimizerArg | None,
        sample: Any,
        trace: bool = False,
        stages: Any = None,
    ) -> None:
        check_plan(plan.resolved())
        if sample is None:
            raise ValueError(f"plan {plan} cuts the model into pipeline stages, which needs sample=(x, y) (one "
                             f"example batch) to trace and time the model; pass it to meshwise.parallelize")
        self._init_common(model, plan, ctx, loss_fn, sample)
        self._model = model
        self.virtual = VIRTUAL_STAGES if plan.schedule == "interleaved" else 1
        self.num_stages = plan.pp * self.virtual
        mesh = init_device_mesh(self.device.type, (plan.dp, plan.pp, plan.tp), mesh_dim_names=("dp", "pp", "tp"))
        self.mesh = mesh
        self.dp_group = mesh.get_group("dp")
        self.pp_group = mesh.get_group("pp")
        self.dp_rank = mesh.get_local_rank("dp")
        self.pp_rank = mesh.get_local_rank("pp")
        self.tp_rank = mesh.get_local_rank("tp")
        self.dp_size = plan.dp
        model.to(self.device)
        memory.broadcast_state(model, self.device)  # every replica and every copy of a tied weight starts equal
        self.partition = self._partition(model, sample, stages)
        modules = self.partition.stage_modules()
        self._fake = FakeTensorMode(allow_non_fake_inputs=True)
        self._shape_modules = _fake_copies(modules, self._fake)  # for stage shapes, whatever wraps the real ones
        for module in modules + self._shape_modules:
            memory.autocast_forward(module, self.device, plan.precision)
            if any(getattr(m, "inplace", False) for m in module.modules()):
                _unleaf_inputs(module)
        self._output_spec: Any = None
        modules[-1].forward = self._flat_output(modules[-1].forward)  # state dict and names unchanged
        self.all_stage_modules = modules
        self.local_stages = [self.pp_rank + k * plan.pp for k in range(self.virtual)]
        self.stage_modules = {s: modules[s].to(self.device) for s in self.local_stages}
        self.holds_last = self.num_stages - 1 in self.local_stages
        self.holds_first = 0 in self.local_stages
        mine = [self.stage_modules[s] for s in self.local_stages]
        layout = self._tie_layout(model, modules)
        if plan.tp > 1:  # this rank's stages' layers split over its tp ranks (DTensor styles)
            from meshwise.tensor import split_tensors

            self.tensor_plan = split_tensors(model, mesh["tp"], plan, within=mine, announce=self.is_main)
        if plan.zero >= 2:
            self._shard_stages(model, mine, mesh["dp"])
        self._groups = self._gradient_groups(layout)
        # a stage of parameter-free layers still gets an optimizer: over an empty placeholder
        local = _Params(self._local_parameters() or [torch.nn.Parameter(torch.zeros(0))])
        if plan.tp > 1 or plan.zero >= 2:  # the parameters were replaced by DTensors: an optimizer on them
            from meshwise.zero import optimizer_on

            self.optimizer = optimizer_on(optimizer, local, f"plan {plan}")
        elif callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = _build_optimizer(optimizer, local)
        else:  # built on the whole model: parameters of other stages never get a gradient and stay put
            self.optimizer = _build_optimizer(optimizer, model)
        if plan.zero == 1 and self.optimizer is not None:  # each stage's optimizer state sharded over its replicas
            from meshwise.zero import shard_optimizer

            self.optimizer = shard_optimizer(self.optimizer, local, self.dp_group)
        self._runners: dict[tuple[Any, ...], tuple[list[PipelineStage], Any]] = {}
        self._total = 1
        self._loss_scale = self.dp_size if plan.zero >= 2 else 1  # FSDP averages over dp; the weights need a sum
        self.recorder = (Recorder(self.rank, self.pp_rank, self.dp_rank, record=self.tp_rank == 0)
                         if trace or os.environ.get(TRACE_ENV) else None)
        if self.recorder is not None and os.environ.get(TRACE_ENV):
            self.recorder.dump_at_exit(os.environ[TRACE_ENV])

    # -- set-up ------------------------------------------------------------------------------

    def _partition(self, model: torch.nn.Module, sample: Any, given: Any) -> Partition:
        """Rank 0 measures and balances (unless ``given`` says where to cut); every rank cuts
        its own copy of the model at the same bounds."""
        inputs = data.unpack(sample)[0]
        inputs = data.map_tensors(lambda t: t.to(self.device), inputs)
        message: list[Any] = [None]
        part = None
        if self.rank == 0:
            try:
                from meshwise.partition import partition

                if given is not None:
                    message = [("ok", _given_bounds(given, self.num_stages))]
                else:
                    part = partition(model, (inputs, None), self.num_stages)
                    message = [("ok", part.bounds)]
            except Exception as error:  # every rank must hear of it, or they wait in the broadcast
                message = [("error", f"{error}" if isinstance(error, (ValueError, TypeError))
                            else f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(message, src=0)
        kind, value = message[0]
        if kind == "error":
            virtual = f"; schedule=interleaved puts {self.virtual} stages on each rank" if self.virtual > 1 else ""
            raise ValueError(f"plan {self.plan} (a pipeline of {self.num_stages} stages{virtual}): {value}")
        if part is None:
            with untouched(model):
                cut = split_model(model, inputs)
            blocked = [(a, cut.crossings[a].why) for a, _ in value[1:] if not cut.crossings[a].ok]
            if blocked:
                a, why = blocked[0]
                raise ValueError(f"stages={list(value)} cuts before layer {a} ({cut.layers[a][0]}), where no cut is "
                                 f"possible: {why}; choose other bounds or leave the cut to meshwise")
            if value[-1][1] != len(cut.layers):
                raise ValueError(f"stages={list(value)} ends at layer {value[-1][1]} but {type(model).__name__} has "
                                 f"{len(cut.layers)} splittable layers; the last range must stop at {len(cut.layers)}")
            layers = measure_free(cut)
            part = Partition(layers=layers, bounds=tuple(tuple(b) for b in value), split=cut)
        elif self.is_main:
            note(f"meshwise: plan {self.plan}: {self.num_stages} pipeline stages, {self.microbatches} micro-batches"
                 f"{f' ({self.virtual} per rank, rank r holds r, r+{self.plan.pp}, ...)' if self.virtual > 1 else ''}"
                 f"\n{part}")
        return part

    def _shard_stages(self, model: torch.nn.Module, mine: list[torch.nn.Module], mesh: Any) -> None:
        """zero=2 and 3: FSDP2 over the replicas on each block of this rank's stages, then on each
        stage. A stage's parameters are gathered at its first forward of a step and resharded
        after its last backward (torch's schedules drive this), so between steps each rank holds
        1/dp of them. FSDP averages gradients over the replicas, so micro-batch weights are
        scaled by dp (``_weighted_loss``) to make the sum the weights require."""
        from meshwise.split import _candidates
        from meshwise.zero import shard_blocks

        for r in range(self.plan.pp):  # every rank checks every rank's stages, so all of them raise alike
            seen: dict[int, int] = {}
            for s in range(r, self.num_stages, self.plan.pp):
                for p in self.all_stage_modules[s].parameters():
                    if seen.setdefault(id(p), s) != s:
                        raise ValueError(f"plan {self.plan}: stages {seen[id(p)]} and {s}, both on pipeline rank {r}, "
                                         f"share a weight (tied embeddings), which FSDP cannot shard twice; use "
                                         f"schedule=1f1b, or zero=1")
        blocks = [block for _, block in _candidates(model)]
        for module in mine:
            inside = {id(m) for m in module.modules()}
            shard_blocks([b for b in blocks if id(b) in inside], module, mesh, reshard=False)

    def _tie_layout(self, model: torch.nn.Module, modules: list[torch.nn.Module]) -> dict[tuple[int, ...], list[Any]]:
        """Which of this rank's parameters are summed with which pp ranks: ``{pp ranks: [(stage,
        name)]}``, ``()`` for a stage's own. Found by identity before any splitting or sharding
        replaces the parameters (a tied weight then becomes two objects), named to find them after."""
        pp = self.plan.pp
        holders: dict[int, set[int]] = {}  # id(param) -> pp ranks whose stages use it
        for s, module in enumerate(modules):
            for p in module.parameters():
                holders.setdefault(id(p), set()).add(s % pp)
        where: dict[int, tuple[int, str]] = {}
        for s in self.local_stages:
            for name, p in modules[s].named_parameters():
                where.setdefault(id(p), (s, name))
        layout: dict[tuple[int, ...], list[Any]] = {}
        for _, p in model.named_parameters():
            if id(p) in holders and p.requires_grad:
                ranks = tuple(sorted(holders[id(p)]))
                entries = layout.setdefault(ranks if len(ranks) > 1 else (), [])
                if id(p) in where:
                    entries.append(where[id(p)])
        self.tied_names = sorted(
            name for name, p in model.named_parameters(remove_duplicate=False)
            if len(holders.get(id(p), ())) > 1
        )
        return layout

    def _gradient_groups(self, layout: dict[tuple[int, ...], list[Any]]) -> list[tuple[Any, list[torch.nn.Parameter]]]:
        """(process group, parameters) pairs to all-reduce after each step, the same order on every rank.

        Without ZeRO a stage's gradients are summed over its replicas here; with zero >= 2 FSDP
        has reduce-scattered them, and only tied weights' shards are summed, across stages."""
        pp, dp, tp = self.plan.pp, self.plan.dp, self.plan.tp
        sharded = self.plan.zero >= 2
        named = {s: dict(self.stage_modules[s].named_parameters()) for s in self.local_stages}

        def params(ranks: tuple[int, ...]) -> list[torch.nn.Parameter]:
            return [named[s][name] for s, name in layout.get(ranks, [])]

        groups: list[tuple[Any, list[torch.nn.Parameter]]] = []
        if dp > 1 and params(()) and not sharded:
            groups.append((self.dp_group, params(())))
        for ranks in sorted(r for r in layout if r):  # every rank creates every group, in the same order
            for t in range(tp):
                for replicas in ([[d] for d in range(dp)] if sharded else [list(range(dp))]):
                    members = sorted((d * pp + r) * tp + t for d in replicas for r in ranks)
                    group = dist.new_group(members)
                    if self.rank in members and params(ranks):
                        groups.append((group, params(ranks)))
        return groups

    def _local_parameters(self) -> list[torch.nn.Parameter]:
        seen: dict[int, torch.nn.Parameter] = {}
        for s in self.local_stages:
            for p in self.stage_modules[s].parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _runner(self, rows: int, microbatches: int, train: bool,
                example: tuple[Any, ...]) -> tuple[list[PipelineStage], Any]:
        """Stages and schedule for micro-batches of ``rows`` rows (stage buffers have fixed shapes).

        Forward-only runs and a 1F1B step with fewer micro-batches than stages (torch's
        1F1B needs m >= pp) use GPipe order: the same sums, another order of actions."""
        name = self.plan.schedule
        if not train or (name == "1f1b" and microbatches < self.plan.pp):
            name = "looped" if name == "interleaved" else "gpipe"
        shapes = tuple((tuple(t.shape[1:]), t.dtype) for t in example)
        key = (rows, microbatches, train, name, shapes)
        if key not in self._runners:
            while len(self._runners) >= RUNNERS_KEPT:  # each holds receive buffers: keep the recent few
                self._runners.pop(next(iter(self._runners)))
            metas = self._metas(tuple(t[:rows] for t in example), train)
            stages = [
                _Stage(self.stage_modules[s], s, self.num_stages, self.device, input_args=metas[s][0],
                       output_args=metas[s][1], group=self.pp_group, recorder=self.recorder if train else None)
                for s in self.local_stages
            ]
            loss = self._weighted_loss if train else None
            if name == "interleaved":
                schedule = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss, scale_grads=False)
            elif name == "looped":
                schedule = ScheduleLoopedBFS(stages, microbatches, loss_fn=loss, scale_grads=False)
            elif name == "1f1b":
                schedule = Schedule1F1B(stages[0], microbatches, loss_fn=loss, scale_grads=False)
            else:
                schedule = ScheduleGPipe(stages[0], microbatches, loss_fn=loss, scale_grads=False)
            self._runners[key] = (stages, schedule)
        return self._runners[key]

    def _metas(self, microbatch: tuple[Any, ...], train: bool) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
        """Every stage's input and output shapes for one micro-batch, found by running the stages
        on fake tensors (no compute, no memory), so torch's stages need no shape exchange."""
        def meta(t: torch.Tensor, grad: bool) -> torch.Tensor:
            return torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(grad and t.is_floating_point())

        out = []
        with self._fake as mode, torch.set_grad_enabled(train):
            h = tuple(mode.from_tensor(t) for t in microbatch)
            for s, module in enumerate(self._shape_modules):
                if s:
                    h = tuple(t.detach().requires_grad_(train and t.is_floating_point()) for t in h)
                result = module(*h)
                if s == len(self._shape_modules) - 1:
                    result = tree_flatten(result)[0]
                result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
                out.append((tuple(meta(t, train and s > 0) for t in h), tuple(meta(t, train) for t in result)))
                h = result
        return out

    # -- training -----------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The user's model: on this rank, only the parameters of its stages are trained."""
        return self._model

    def _state_modules(self) -> list[torch.nn.Module]:
        return [self.stage_modules[s] for s in self.local_stages]

    def _writes_model(self) -> bool:  # one rank of each stage: its first replica's first tensor-parallel rank
        return self.dp_rank == 0 and self.tp_rank == 0

    def _state_names(self) -> set[str]:
        """The model's own names (a stage's fx constants are not checkpointed)."""
        return set(self._model.state_dict())

    def loader(self, dataset: Any, batch_size: int, **kwargs: Any) -> Iterator[Any]:
        shares = [len(s) for s in torch.arange(batch_size).tensor_split(self.dp_size)] if type(batch_size) is int else []
        bad = [n for n in shares if n % self.microbatches]
        if bad:
            m = self.microbatches
            good = self.dp_size * m
            raise ValueError(
                f"batch_size={batch_size} gives replicas {shares} samples each, which microbatches={m} does not "
                f"divide (pipeline stages pass micro-batches of one shape); use a batch_size that is a multiple "
                f"of dp x microbatches = {good}, e.g. {max(good, batch_size // good * good)}"
            )
        return super().loader(dataset, batch_size, **kwargs)

    def _microbatches(self, rows: int) -> int:
        """The plan's count if it divides ``rows``, else the largest count below it that does
        (and that the schedule allows)."""
        for m in range(min(self.microbatches, rows), 0, -1):
            if rows % m == 0 and (self.plan.schedule != "interleaved" or interleaved_rounds_ok(m, self.plan.pp)):
                return m
        return 1

    def _flat_output(self, forward: Any) -> Any:
        """The last stage returns its output's tensors as a flat tuple (torch's stages pass
        tensors); ``_structured`` gives the loss and predict the model's own structure back
        (a dict, a Hugging Face ModelOutput)."""

        def flat(*args: Any, **kwargs: Any) -> Any:
            leaves, self._output_spec = tree_flatten(forward(*args, **kwargs))
            return leaves[0] if len(leaves) == 1 else tuple(leaves)

        return flat

    def _structured(self, output: Any) -> Any:
        leaves = list(output) if isinstance(output, (tuple, list)) else [output]
        return tree_unflatten(leaves, self._output_spec)

    def _weighted_loss(self, output: Any, target: Any) -> torch.Tensor:
        with memory.autocast(self.device, self.plan.precision):
            loss = self._loss(self._structured(output), target)
        return loss * (data.batch_size_of(target) * self._loss_scale / self._total if self._total else 0.0)

    def step(self, batch: Any) -> float:
        """One pipelined forward/backward over this replica's share, gradient sync and optimizer step.

        Returns the global mean loss over the whole global batch, the same on every rank.
        """
        local, self._total = self._begin_step(batch)
        loss_sum = torch.zeros((), device=self.device)
        if self.recorder is not None:
            self.recorder.begin_step(self.steps)
        if not local and self.plan.zero >= 2:  # FSDP's collectives need every replica: a pass of weight 0
            batch, local, total = self._placeholder(), data.batch_size_of(self._placeholder()), self._total
            self._total = 0
        if local:
            batch = data.to_device(batch, self.device)
            inputs, targets = data.unpack(batch)
            m = self._microbatches(local)
            args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            _, schedule = self._runner(local // m, m, True, args)
            losses: list[torch.Tensor] = []
            schedule.step(*args, target=targets, losses=losses, return_outputs=False)
            if self.holds_last and self.tp_rank == 0 and self._total:
                loss_sum = torch.stack([x.detach().float() for x in losses]).sum() / self._loss_scale
            if not self._total:
                self._total = total
        # last stages hold their replica's share of the mean, others 0; asynchronous, so a stage
        # that finished early steps its optimizer while the first stage finishes its backward
        # (waiting first cost 10% of a step in bench/pp.py)
        reduced = dist.all_reduce(loss_sum, async_op=True)
        self._sync_gradients()
        self._grad_bytes = sum(memory._local(p.grad).numel() * p.grad.element_size() for p in self._local_parameters()
                               if p.grad is not None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced.wait()
        self.steps += 1
        self._after_update()
        return float(loss_sum)

    def _sync_gradients(self) -> None:
        for group, params in self._groups:
            mwdist.sum_gradients(params, group, self.device)
        if self.plan.tp > 1:
            mwdist.match_layouts(self._local_parameters())

    # -- inference and state ---------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, inputs: Any, batch_size: int | None = None) -> Any:
        """The model's outputs for all of ``inputs``, in order, on every rank (forward only).

        A collective. Each replica runs a contiguous slice through its pipeline in eval
        mode, ``batch_size`` rows at a time; the last stages' outputs are gathered.
        """
        dataset, n, mine = self._predict_share(inputs, batch_size)
        kept = len(mine)
        if self.plan.zero >= 2:  # FSDP's gathers are collectives of the replicas: every replica runs the
            most = len(torch.arange(n).tensor_split(self.dp_size)[0])  # same chunks, padded with row 0
            mine = torch.cat([mine, torch.zeros(most - kept, dtype=torch.long)])
        if self.dp_size > 1:  # e.g. batch-norm statistics, which replicas update apart: replica 0's
            src = dist.get_global_rank(self.dp_group, 0)
            for s in self.local_stages:
                for buffer in self.stage_modules[s].buffers():
                    dist.broadcast(torch.view_as_real(buffer) if buffer.is_complex() else buffer, src,
                                   group=self.dp_group)
        modes = {s: m.training for s, m in self.stage_modules.items()}
        for module in self.stage_modules.values():
            module.eval()
        outs = []
        try:
            for chunk in mine.split(batch_size or max(len(mine), 1)) if len(mine) else []:
                batch = data.fetch(dataset, chunk)
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                batch = data.to_device(batch, self.device)
                rows = len(chunk)
                m = self._microbatches(rows)
                args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
                _, schedule = self._runner(rows // m, m, False, args)
                out = schedule.step(*args)
                if self.holds_last:
                    outs.append(data.map_tensors(lambda t: t.detach().cpu(), memory.full_precision(self._structured(out))))
        finally:
            for s, module in self.stage_modules.items():
                module.train(modes[s])
                if self.plan.zero >= 2:
                    from meshwise.zero import reshard

                    reshard(module)  # back to shards, as after a training step
        local = data.map_tensors(lambda t: t[:kept], data.concat(outs)) if outs and kept else None
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (self.dp_rank, local) if self.holds_last and self.tp_rank == 0 else None)
        parts = sorted((g for g in gathered if g is not None and g[1] is not None), key=lambda g: g[0])
        return data.map_tensors(lambda t: t.to(self.device), data.concat([p for _, p in parts]))

    def state_bytes(self) -> dict[str, int]:
        """This rank's model-state bytes: its stages' parameters, their gradients (at the end of
        the last step's backward) and the optimizer state it holds."""
        return {"parameters": sum(memory._local(p).numel() * p.element_size() for p in self._local_parameters()),
                "gradients": self._grad_bytes, "optimizer": memory.optimizer_bytes(self.optimizer)}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict, gathered from the stages onto rank 0 (None elsewhere).

        A collective. It loads into the original, unwrapped model.
        """
        mine: dict[str, torch.Tensor] = {}
        with mwdist.quiet_gathers():
            for s in self.local_stages:  # split or sharded values gathered whole (a collective of the stage's ranks)
                for k, v in self.stage_modules[s].state_dict().items():
                    v = v.full_tensor() if hasattr(v, "full_tensor") else v
                    if self.dp_rank == 0 and self.tp_rank == 0:
                        mine[k] = v.detach().cpu()
        gathered: list[Any] = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        if not self.is_main:
            return None
        merged = {k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()}
        for part in gathered:  # stage-only names (fx constants) are not the model's: left out
            merged.update({k: v for k, v in part.items() if k in merged})
        return merged

    def write_trace(self, directory: str) -> dict[str, Any] | None:
        """Gather the recorded timeline to rank 0 and write trace.json and trace.png there.

        A collective. Returns the bubble figures on rank 0 (None elsewhere); needs ``trace=True``.
        """
        if self.recorder is None:
            raise ValueError("no timeline was recorded: pass trace=True to meshwise.parallelize "
                             "(or --trace DIR to meshwise run)")
        gathered: list[Any] = [None] * self.world_size if self.is_main else None
        dist.gather_object(self.recorder.events, gathered, dst=0)
        if not self.is_main:
            return None
        from meshwise import trace

        events = [e for rank_events in gathered for e in rank_events]
        return trace.write(directory, events, f"plan {self.plan}")


def _fake_copies(modules: list[torch.nn.Module], mode: FakeTensorMode) -> list[torch.nn.Module]:
    """Copies of the stage modules whose parameters and buffers are fake tensors (shapes, no
    storage): they give stage shapes for any micro-batch however the real stages are later
    split or sharded. Weights shared between stages stay shared."""
    memo: dict[int, Any] = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in memo:
                fake = mode.from_tensor(t)
                memo[id(t)] = torch.nn.Parameter(fake, t.requires_grad) if isinstance(t, torch.nn.Parameter) else fake
    return [copy.deepcopy(module, memo) for module in modules]


def _unleaf_inputs(module: torch.nn.Module) -> None:
    """Received activations are leaves that require grad, which an in-place layer
    (ReLU(inplace=True)) may not modify: such a stage works on copies."""
    forward = module.forward

    def copied(*args: Any, **kwargs: Any) -> Any:
        args = tuple(a.clone() if isinstance(a, torch.Tensor) and a.is_leaf and a.requires_grad else a for a in args)
        return forward(*args, **kwargs)

    module.forward = copied


def _given_bounds(given: Any, stages: int) -> tuple[tuple[int, int], ...]:
    bounds = tuple(tuple(b) for b in (given.bounds if isinstance(given, Partition) else given))
    ok = (len(bounds) == stages and bounds[0][0] == 0 and all(len(b) == 2 and b[0] < b[1] for b in bounds)
          and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])))
    if not ok:
        raise ValueError(f"stages={list(bounds)} is not {stages} contiguous, non-empty (start, stop) layer ranges "
                         f"from 0; give one range per pipeline stage, e.g. [(0, 3), (3, 6)]")
    return bounds


class _Params(torch.nn.Module):
    """Hands a list of parameters to an optimizer factory as ``module.parameters()``."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self._list = params

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:  # type: ignore[override]
        return iter(self._list)


class _Stage(PipelineStage):
    """A PipelineStage that records when each micro-batch's forward and backward ran."""

    def __init__(self, *args: Any, recorder: Recorder | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recorder = recorder

    def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        if self._recorder is None:
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        with self._recorder.span("F", self.stage_index, fwd_chunk_id):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        if self._recorder is None:
            return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
        with self._recorder.span("B", self.stage_index, bwd_chunk_id):
            return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)


def measure_free(cut: Any) -> tuple[Any, ...]:
    """Layer records without timing, for ranks that take the bounds from rank 0."""
    from meshwise.partition import Layer

    return tuple(
        Layer(name=name, params=sum(p.numel() for p in m.parameters()),
              param_bytes=sum(p.numel() * p.element_size() for p in m.parameters()),
              ms=0.0, activation_bytes=0, output_bytes=c.bytes)
        for (name, m), c in zip(cut.layers, cut.crossings[1:])
    )
