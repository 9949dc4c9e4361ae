"""ZeRO over the data-parallel axis: shard what every replica would otherwise hold whole.

* ``zero=1``: DDP as for plain data parallelism, and the optimizer state sharded with
  torch's ``ZeroRedundancyOptimizer`` (each rank updates its partition of the
  parameters and broadcasts it).
* ``zero=2``: FSDP2 (``fully_shard``) on every block and the root, parameters not
  resharded after forward: gradients (reduce-scattered) and optimizer state are sharded;
  the parameters are gathered once per step and kept for backward.
* ``zero=3``: the same, resharded after forward: parameters are gathered block by block
  in forward and again in backward, so at rest each rank holds 1/dp of everything.
  (Inside a pipeline, zero=2 and 3 both gather a stage once per step: see pipeline.py.)

With tensor parallelism (``tp > 1``) FSDP2 shards the split pieces over the replicas
(2-D parameters), and ``zero=1`` runs torch's optimizer on plain views of the shards.

The update is the single-process one, with the same weighting as plain data
parallelism (FSDP2 averages gradients over the replicas as DDP does). FSDP's
collectives run inside forward and backward, so every rank runs the same number of
micro-batches and predict chunks: a rank with fewer rows runs placeholder rows with
weight 0, as an empty share already does.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
import torch.distributed as dist

from meshwise import data, memory
from meshwise import dist as mwdist
from meshwise.engine import Engine, LossFn, OptimizerArg, _build_optimizer
from meshwise.plan import Plan


def _rebuilt(optimizer: torch.optim.Optimizer, what: str) -> tuple[type, dict[str, Any]]:
    if len(optimizer.param_groups) != 1:
        raise ValueError(
            f"{what} rebuilds the optimizer on sharded parameters and supports one parameter group; "
            f"got {len(optimizer.param_groups)}: pass optimizer=lambda params: YourOptimizer(params, ...)"
        )
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    return cls, {k: v for k, v in optimizer.defaults.items() if k in accepted}


def _warn_if_stateful(optimizer: torch.optim.Optimizer) -> None:
    if optimizer.state:
        warnings.warn("ZeRO rebuilds the optimizer on sharded parameters: its existing state (e.g. Adam moments) "
                      "and any learning-rate scheduler attached to it are not carried over; pass "
                      "optimizer=lambda params: ... and attach schedulers to engine.optimizer", stacklevel=3)


def optimizer_on(optimizer: OptimizerArg | None, model: torch.nn.Module, what: str) -> torch.optim.Optimizer | None:
    """The optimizer for a model whose parameters were replaced (sharded or split in place):
    built by the function given, or the given optimizer rebuilt with its class and settings."""
    if isinstance(optimizer, torch.optim.Optimizer):
        _warn_if_stateful(optimizer)
        cls, defaults = _rebuilt(optimizer, what)
        return cls(model.parameters(), **defaults)
    return _build_optimizer(optimizer, model)


def shard_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, group: Any) -> torch.optim.Optimizer:
    """zero=1: the same optimizer class and settings, its state sharded over ``group``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    _warn_if_stateful(optimizer)
    cls, defaults = _rebuilt(optimizer, "zero=1")
    params = list(model.parameters())
    if any(hasattr(p, "to_local") for p in params):
        return _LocalZero(params, optimizer_class=cls, process_group=group, **defaults)
    return ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=group, **defaults)


def _local_zero_class() -> type:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    class LocalZero(ZeroRedundancyOptimizer):
        """zero=1 over tensor-parallel parameters (DTensors, which torch's ZeroRedundancyOptimizer
        cannot broadcast): it works on plain parameters that share each DTensor's local shard
        storage, so its in-place updates and broadcasts update the shards themselves."""

        def __init__(self, params: list[torch.nn.Parameter], **kwargs: Any) -> None:
            self._pairs = [(p, torch.nn.Parameter(p.to_local().detach(), p.requires_grad)
                            if hasattr(p, "to_local") else p) for p in params]
            super().__init__([view for _, view in self._pairs], **kwargs)

        def step(self, closure: Any = None, **kwargs: Any) -> Any:
            mwdist.match_layouts([p for p, _ in self._pairs])
            for p, view in self._pairs:
                if view is not p:
                    view.grad = None if p.grad is None else p.grad.to_local()
            return super().step(closure, **kwargs)

        def zero_grad(self, set_to_none: bool = True) -> None:
            super().zero_grad(set_to_none)
            for p, view in self._pairs:
                if view is not p:
                    p.grad = None

    return LocalZero


def _LocalZero(params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:  # noqa: N802
    return _local_zero_class()(params, **kwargs)


def shard_blocks(blocks: list[torch.nn.Module], root: torch.nn.Module, mesh: Any, *, reshard: bool) -> None:
    """FSDP2 on each trainable block, then on ``root`` (which takes the rest). A block sharing a
    weight with another (tied embeddings) stays with the root. Gradients are averaged over
    the replicas, as DDP does."""
    from torch.distributed.fsdp import fully_shard

    blocks = [block for block in blocks if any(p.requires_grad for p in block.parameters())]
    owners: dict[int, int] = {}
    for block in blocks:
        for p in block.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    for block in blocks:
        if all(owners[id(p)] == 1 for p in block.parameters()):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard)


def reshard(module: torch.nn.Module) -> None:
    """Free the gathered parameters of every FSDP module in ``module`` (local: no collective)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class ShardedEngine(Engine):
    """zero=2 and zero=3 with FSDP2 (see the module docstring)."""

    _collectives = "FSDP's all-gathers and reduce-scatters"

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan,
        ctx: mwdist.Context,
        *,
        loss_fn: LossFn | None,
        optimizer: OptimizerArg | None,
        sample: Any,
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        from meshwise.split import _candidates

        self._init_common(model, plan, ctx, loss_fn, sample)
        model.to(self.device)
        memory.broadcast_state(model, self.device)  # the shards must come from one model, as DDP ensures
        mesh = init_device_mesh(self.device.type, (plan.dp, plan.tp), mesh_dim_names=("dp", "tp"))
        self.dp_rank, self.dp_size, self.dp_group = mesh.get_local_rank("dp"), plan.dp, mesh.get_group("dp")
        if plan.tp > 1:  # layers split over tp first; FSDP then shards the pieces over dp (2-D parameters)
            from meshwise.tensor import split_tensors

            self.tensor_plan = split_tensors(model, mesh["tp"], plan, announce=self.is_main)
        shard_blocks([block for _, block in _candidates(model)], model, mesh["dp"], reshard=plan.zero == 3)
        self._model = model
        self.optimizer = optimizer_on(optimizer, model, f"zero={plan.zero}")

    @property
    def model(self) -> torch.nn.Module:
        """The user's model, sharded in place (its parameters are DTensors)."""
        return self._model

    def step(self, batch: Any) -> float:
        """Forward, backward (gradients reduce-scattered), optimizer step on the shards.

        Returns the global mean loss over the whole global batch, the same on every rank.
        """
        local, total = self._begin_step(batch)
        if self.device.type != "cpu":
            batch = data.to_device(batch, self.device)
        parts = self._parts(batch, local)
        parts += [(self._placeholder(), 0)] * (self.microbatches - len(parts))  # the same passes on every rank
        loss_sum = torch.zeros((), device=self.device)
        for i, (part, size) in enumerate(parts):
            self._model.set_requires_gradient_sync(i == len(parts) - 1)
            inputs, targets = data.unpack(part)
            with memory.autocast(self.device, self.plan.precision):
                loss = self._loss(data.call(self._model, inputs), targets)
            (loss * (size * self.dp_size / total)).backward()
            loss_sum += loss.detach() * size
        reduced = dist.all_reduce(loss_sum, group=self.dp_group, async_op=True)
        self._grad_bytes = memory.grad_bytes(self._model)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced.wait()
        self.steps += 1
        self._after_update()
        return float(loss_sum) / total

    def _predict_local(self, dataset: Any, mine: torch.Tensor, batch_size: int | None, counts: list[int]) -> Any:
        """Every rank runs as many forward passes as the largest share needs (FSDP gathers
        parameters inside forward); extra passes run one placeholder row, discarded."""
        size = batch_size or max(counts)
        passes = max(1, math.ceil(max(counts) / size))
        chunks = list(mine.split(size)) if len(mine) else []
        outs = [self._forward_inputs(dataset, chunk) for chunk in chunks]
        spare = [self._forward_inputs(dataset, torch.arange(1)) for _ in range(passes - len(chunks))]
        reshard(self._model)  # zero=2 keeps parameters gathered after forward: back to shards
        if outs:
            return data.concat(outs)
        return data.map_tensors(lambda t: t[:0], spare[0])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0 (gathered from the shards), None elsewhere.

        A collective. It loads into the original, unwrapped model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with mwdist.quiet_gathers():
            state = get_model_state_dict(self._model, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
        return {k: v.clone() for k, v in state.items()} if self.is_main else None
