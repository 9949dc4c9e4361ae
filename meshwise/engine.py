"""The Engine: one object that trains and predicts under a Plan (``meshwise.parallelize``
makes it).

Data parallelism uses torch's ``DistributedDataParallel``: its bucketed all-reduce
overlaps the backward pass, and it broadcasts rank 0's parameters at wrap time, so
every replica starts equal.

The correctness contract: for a mean-reduced ``loss_fn``, ``step`` makes the same
update as one process computing ``loss_fn(model(x), y)`` on the whole global batch of
N samples. Replica r holds n_r samples cut into micro-batches of m_k samples. Each
micro-batch's mean loss L_k is back-propagated with weight ``m_k * dp / N``; DDP then
averages the replicas' gradients (divides by dp):

    grad = 1/dp * sum_r sum_k (m_k * dp / N) * dL_k = sum_k (m_k / N) * dL_k = dL_global

which holds for uneven shares and uneven micro-batches alike. With even shares and one
micro-batch the weight is exactly 1 and is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from meshwise import data, memory, observe
from meshwise import dist as mwdist
from meshwise.plan import Plan

LossFn = Callable[[Any, Any], torch.Tensor]
OptimizerArg = Callable[[Any], torch.optim.Optimizer] | torch.optim.Optimizer


AUTO_WARMUP_STEPS, AUTO_CHECK_STEPS = 5, 20
"""An automatically chosen plan's first steps warm up (allocations, optimizer state); the
median of the next ones is printed against the prediction."""


class Engine:
    """Trains (``step``) and predicts (``predict``) one model under one Plan."""

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
        self._init_common(model, plan, ctx, loss_fn, sample)
        self.dp_rank, self.dp_size, self.dp_group = ctx.rank, plan.dp, dist.group.WORLD
        self._replica = _Replica(model).to(self.device)  # in place: optimizers built on model stay valid
        # one replica has nothing to synchronise: DDP would only copy gradients into its buckets
        # (bench/gpu.py: 6% of a bf16 step and 0.8 GiB on an H200). With several replicas the
        # gradients are views of DDP's buckets, not a second copy beside them.
        self._ddp: torch.nn.Module = self._replica if self.dp_size == 1 else DistributedDataParallel(
            self._replica,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            process_group=self.dp_group,
            gradient_as_bucket_view=True,
        )
        self.optimizer = _build_optimizer(optimizer, model)
        if plan.zero == 1 and self.optimizer is not None:  # optimizer state sharded; DDP as before
            from meshwise.zero import shard_optimizer

            self.optimizer = shard_optimizer(self.optimizer, model, self.dp_group)

    def _watch(self, predicted: Callable[[int], float]) -> None:
        """Time the first steps; after ``AUTO_CHECK_STEPS`` (warm-up excluded) rank 0 prints the
        median measured step time against ``predicted(global batch)``."""
        import math
        import statistics
        import time

        step, times, rows = self.step, [], []

        def timed(batch: Any) -> float:
            start = time.perf_counter()
            loss = step(batch)
            times.append(time.perf_counter() - start)
            rows.append(self.last_rows)
            if len(times) == AUTO_WARMUP_STEPS + AUTO_CHECK_STEPS and self.is_main:
                measured = statistics.median(times[AUTO_WARMUP_STEPS:])
                usual = statistics.mode(rows[AUTO_WARMUP_STEPS:])
                expected = predicted(usual)
                judged = (f"predicted {expected * 1e3:.1f} ms ({measured / expected - 1:+.0%})"
                          if math.isfinite(expected) else "no prediction for that batch (the plan cannot run it)")
                observe.note(f"meshwise: plan {self.plan}: measured step {measured * 1e3:.1f} ms (median of steps "
                             f"{AUTO_WARMUP_STEPS + 1} to {AUTO_WARMUP_STEPS + AUTO_CHECK_STEPS}, batch {usual}), {judged}")
            return loss

        self.step = timed  # type: ignore[method-assign]

    def _init_common(self, model: torch.nn.Module, plan: Plan, ctx: mwdist.Context, loss_fn: LossFn | None,
                     sample: Any) -> None:
        """What every engine sets up; ``checkpointing=true`` makes the model's blocks recompute."""
        if plan.checkpointing:
            memory.checkpoint_blocks(model)
        self.plan = plan
        self.microbatches: int = plan.resolved().microbatches  # type: ignore[assignment]
        self.ctx = ctx
        self.device = ctx.device
        self.loss_fn = loss_fn
        self.sample = sample
        self._sample_spec: Any = None
        self.steps = 0
        self.last_rows = 0
        """Rows of the last global batch stepped on (all replicas' shares together)."""
        self._grad_bytes = 0
        self.position: tuple[int, int, int] | None = None
        self._skip: tuple[int, int] | None = None
        self.checkpoint_dir: str | None = None
        self.checkpoint_every = 0
        self.checkpoint_keep = 3
        self._scheduler: Any = None
        self._pending_schedule: dict[str, Any] | None = None  # a loaded checkpoint's, for a scheduler made later
        self._steps_scheduler = False

    @property
    def scheduler(self) -> Any:
        """The learning-rate scheduler: parallelize's ``scheduler=`` (stepped after every
        update), or one assigned here (stepped by the script). Checkpoints keep its state; one
        assigned after a resume takes the state the checkpoint held."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value: Any) -> None:
        from meshwise import lr_schedule

        self._scheduler, pending, self._pending_schedule = value, self._pending_schedule, None
        if value is not None and pending is not None:
            wrong = lr_schedule.problem(value, pending, "(the one loaded)")
            if wrong:
                raise ValueError(wrong)
            lr_schedule.restore(value, pending)
            for group, lr in zip(self.optimizer.param_groups, value.get_last_lr()):  # made after the load:
                group["lr"] = lr  # its construction set the rates; the schedule's own stand where it stood

    @property
    def model(self) -> torch.nn.Module:
        """The user's model (unwrapped), with this rank's parameters."""
        return self._replica.module

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints and writes shared files."""
        return self.ctx.is_main

    def loader(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Any]:
        """Yield this replica's share of each global batch of ``batch_size`` (see meshwise.data)."""
        dataset = data.as_dataset(dataset)
        n = len(dataset)
        if n == 0:
            raise ValueError("the dataset is empty: there is nothing to train on")
        least = self.dp_size * self.microbatches
        if type(batch_size) is not int or batch_size < least:
            raise ValueError(
                f"batch_size={batch_size!r} is too small for plan {self.plan}: each global batch "
                f"must give every one of dp={self.dp_size} replicas at least microbatches="
                f"{self.microbatches} samples; use batch_size >= {least}"
            )
        batches = data.global_batches(n, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
        start = 0
        if self._skip is not None and self._skip[0] == epoch:  # resumed: the batches already trained on
            start, self._skip = min(self._skip[1], len(batches)), None
        return self._iterate(dataset, batches, epoch, start)

    def _iterate(self, dataset: Any, batches: list[torch.Tensor], epoch: int, start: int) -> Iterator[Any]:
        for i in range(start, len(batches)):
            # marked with N, so that step needs no collective to learn it
            yield data.tag(data.fetch(dataset, data.share(batches[i], self.dp_rank, self.dp_size)),
                           len(batches[i]), (epoch, i + 1, len(batches)))

    @property
    def epoch(self) -> int:
        """The epoch training stands in: 0, or after ``load`` the checkpoint's (the next one if
        it had finished). ``loader(..., epoch=engine.epoch)`` then skips the batches already
        trained on, once."""
        if self.position is None:
            return 0
        epoch, done, count = self.position
        return epoch + 1 if done >= count else epoch

    def resume_position(self, position: Any) -> None:
        """Continue from ``(epoch, batches done, batches in the epoch)`` (from a checkpoint)."""
        self.position = tuple(position) if position else None
        self._skip = (self.position[0], self.position[1]) if self.position else None

    def save(self, directory: str | None = None, *, keep: int | None = None) -> str:
        """Write a checkpoint of the model, optimizer, step, random state and data position
        under ``directory`` (default: parallelize's ``checkpoint``), keeping the last ``keep``.

        A collective: call it on every rank. Returns the checkpoint's directory. It loads
        under any plan (``load``); see meshwise.checkpoint for the format."""
        from meshwise import checkpoint

        root = directory or self.checkpoint_dir
        if not root:
            raise ValueError("save needs a directory: engine.save('checkpoints') or parallelize(..., checkpoint=DIR)")
        return checkpoint.save(self, root, keep=keep or self.checkpoint_keep)

    def load(self, path: str | None = None) -> dict[str, Any]:
        """Load a checkpoint: a step directory, or a checkpoint root (its latest complete
        one; default: parallelize's ``checkpoint``). A collective. Returns its metadata."""
        from meshwise import checkpoint

        root = path or self.checkpoint_dir
        if not root:
            raise ValueError("load needs a path: engine.load('checkpoints') or parallelize(..., checkpoint=DIR)")
        found = checkpoint.agreed_latest(root)
        if found is None:
            raise ValueError(f"{root} holds no complete meshwise checkpoint (a step-NNNNNNNN directory with a "
                             f"{checkpoint.COMPLETE} marker)")
        return checkpoint.load(self, found)

    def _state_modules(self) -> list[torch.nn.Module]:
        """The modules whose state this rank holds, under the model's own names."""
        return [self.model]

    def _writes_model(self) -> bool:
        """Whether this rank writes the model state it holds to a checkpoint."""
        return self.is_main

    def _guard(self, timeout: float) -> None:
        """Make a step whose collective times out or loses a peer say which rank, step and
        collective, and which ranks were behind."""
        step = self.step

        def guarded(batch: Any) -> float:
            number = self.steps + 1
            mwdist.mark_progress(self.rank, number)
            try:
                return step(batch)
            except RuntimeError as error:
                if not mwdist.collective_failure(error) or self.steps >= number:  # not a collective, or in
                    raise  # the step's checkpoint (which says so itself)
                seen = mwdist.progress(self.world_size) or {}
                behind = sorted(r for r, s in seen.items() if s < number)
                missing = sorted(set(range(self.world_size)) - set(seen))
                who = (f"rank(s) {behind} had not begun step {number}" if behind else
                       f"ranks {missing} never began a step" if missing and seen else
                       "every rank had begun it, so one stalled or died inside it")
                first = str(error).strip().splitlines()[0][:300]
                raise RuntimeError(
                    f"rank {self.rank}: step {number} failed in {self._collectives} (plan {self.plan}), "
                    f"with the collective timeout at {timeout:g} s: {who}. {type(error).__name__}: {first}. "
                    f"Raise --timeout (or parallelize(timeout=)) if the work between collectives is that slow"
                ) from error

        self.step = guarded  # type: ignore[method-assign]

    _collectives = "the gradient all-reduce"
    """The collectives a step of this engine waits in, for messages."""

    def _after_update(self) -> None:
        """After each optimizer step: the learning-rate schedule's step, then a checkpoint
        every ``checkpoint_every`` steps (so it holds the schedule where the step left it)."""
        if self.scheduler is not None and self._steps_scheduler:
            self.scheduler.step()
        if self.checkpoint_every and self.steps % self.checkpoint_every == 0:
            self.save()

    def step(self, batch: Any) -> float:
        """Forward, backward, gradient all-reduce and optimizer step on this rank's share.

        Returns the global mean loss over the whole global batch, the same on every rank.
        """
        local, total = self._begin_step(batch)
        if self.device.type != "cpu":
            batch = data.to_device(batch, self.device)
        # an uneven tail that left this replica nothing joins the all-reduce with zeros
        parts = self._parts(batch, local) or [(self._placeholder(), 0)]
        carried = []  # dp * (sum of per-sample losses) per micro-batch, without autograd history
        for i, (part, size) in enumerate(parts):
            inputs, targets = data.unpack(part)
            weight = size * self.dp_size / total
            last = i == len(parts) - 1
            with nullcontext() if last or self.dp_size == 1 else self._ddp.no_sync():
                with memory.autocast(self.device, self.plan.precision):
                    loss = self._loss(data.call(self._ddp, inputs), targets)
                objective = loss if weight == 1.0 else loss * weight
                carried.append(loss.detach() * (size * self.dp_size))
                if last:  # the loss sum rides along with the gradients' all-reduce (see _Replica)
                    objective = self._replica.carry(objective, carried[0] if len(carried) == 1 else sum(carried))
                objective.backward()
        self._grad_bytes = memory.grad_bytes(self.model)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = self._replica.take()
        self.steps += 1
        self._after_update()
        return float(loss_sum) / total

    @torch.no_grad()
    def predict(self, inputs: Any, batch_size: int | None = None) -> Any:
        """The model's outputs for all of ``inputs`` (a tensor or a dataset), in order, on every rank.

        A collective: call it on every rank (not under ``if engine.is_main``), or the
        others wait for it. Each replica runs a contiguous slice, in eval mode,
        ``batch_size`` rows at a time (all at once if None); the slices are gathered back
        in input order. Dataset items that are ``(input, target)`` pairs use the input only.
        """
        dataset, n, mine = self._predict_share(inputs, batch_size)
        model = self.model
        if self.dp_size > 1:
            src = dist.get_global_rank(self.dp_group, 0)  # replica 0's rank in this rank's dp group
            for buffer in model.buffers():  # e.g. batch-norm statistics, which replicas update apart
                dist.broadcast(torch.view_as_real(buffer) if buffer.is_complex() else buffer, src, group=self.dp_group)
        was_training = model.training
        model.eval()
        counts = [len(s) for s in torch.arange(n).tensor_split(self.dp_size)]  # every rank's share, known
        try:
            local = self._predict_local(dataset, mine, batch_size, counts)
        finally:
            model.train(was_training)
        return data.map_tensors(lambda t: self._gather_rows(t, counts), local)

    def _predict_local(self, dataset: Any, mine: torch.Tensor, batch_size: int | None, counts: list[int]) -> Any:
        if len(mine):
            return data.concat([self._forward_inputs(dataset, chunk) for chunk in mine.split(batch_size or len(mine))])
        # fewer rows than replicas: run one placeholder row for the output's shape
        return data.map_tensors(lambda t: t[:0], self._forward_inputs(dataset, torch.arange(1)))

    def _begin_step(self, batch: Any) -> tuple[int, int]:
        """Check a training batch; (this replica's rows, the global batch's rows)."""
        if self.loss_fn is None or self.optimizer is None:
            raise ValueError("step needs loss_fn and optimizer: pass both to meshwise.parallelize")
        data.unpack(batch)
        self._check(batch)
        self.position = data.position(batch) or self.position
        local = data.batch_size_of(batch)
        self.last_rows = self._global_size(batch, local)
        return local, self.last_rows

    def _parts(self, batch: Any, local: int) -> list[tuple[Any, int]]:
        """This replica's rows cut into the plan's micro-batches, with their sizes ([] if none)."""
        if local == 0:
            return []
        if self.microbatches == 1:
            return [(batch, local)]
        return [(p, data.batch_size_of(p)) for p in data.split(batch, self.microbatches)]

    def _predict_share(self, inputs: Any, batch_size: int | None) -> tuple[Any, int, torch.Tensor]:
        """(dataset, its length, this replica's contiguous row indices) for predict."""
        dataset = data.as_dataset(inputs)
        n = len(dataset)
        if n == 0:
            raise ValueError("predict got no inputs (length 0)")
        if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} is invalid: use an integer >= 1 or None")
        return dataset, n, data.share(torch.arange(n), self.dp_rank, self.dp_size)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict (CPU copies) on rank 0, None elsewhere; loads into the unwrapped model."""
        if not self.is_main:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def state_bytes(self) -> dict[str, int]:
        """This rank's model-state bytes: parameters, gradients (as held at the end of the
        last step's backward) and optimizer state, measured on the tensors themselves."""
        return {"parameters": memory.param_bytes(self.model), "gradients": self._grad_bytes,
                "optimizer": memory.optimizer_bytes(self.optimizer)}

    def write_trace(self, directory: str) -> dict[str, Any] | None:
        raise ValueError(f"plan {self.plan} has no pipeline, so there is no pipeline timeline to write; "
                         f"timelines record plans with pp > 1")

    def _forward_inputs(self, dataset: Any, indices: torch.Tensor) -> Any:
        batch = data.fetch(dataset, indices)
        if isinstance(batch, (tuple, list)):  # (inputs, targets, ...): the inputs
            batch = batch[0]
        with memory.autocast(self.device, self.plan.precision):
            out = data.call(self.model, data.to_device(batch, self.device))
        return memory.full_precision(data.tensors_only(out))

    def _gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """AllGather_dp(x[n_r, ...]) -> x[sum n_r, ...], in rank order, for uneven n_r = counts[r]."""
        if self.dp_size == 1:
            return local
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(self.dp_size)]
        dist.all_gather(gathered, padded.contiguous(), group=self.dp_group)
        return torch.cat([g[:c] for g, c in zip(gathered, counts)])

    def _loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        loss = self.loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn returned {shape}, expected a scalar tensor: a mean-reduced loss "
                f"such as torch.nn.functional.cross_entropy(out, y) (reduction='mean')"
            )
        return loss

    def _check(self, batch: Any) -> None:
        if self.sample is None and data.batch_size_of(batch):  # no sample: the first batch fixes the shapes
            self.sample = data.map_tensors(lambda t: t[:2].cpu(), batch)
        if self.sample is not None:
            if self._sample_spec is None:
                self._sample_spec = data.spec(self.sample)
            if data.spec(batch) != self._sample_spec:
                data.check_spec(batch, self.sample)  # raises, naming both

    def _placeholder(self) -> Any:
        """Up to two rows of the sample, on this device: a stand-in for an empty share
        (two, so that batch-norm layers in train mode accept it)."""
        if self.sample is None:
            raise ValueError(
                "this replica's share of the batch is empty and there is no sample to stand in "
                "for it; pass sample=(x, y) (one example batch) to meshwise.parallelize"
            )
        return data.to_device(data.map_tensors(lambda t: t[:2], self.sample), self.device)

    def _global_size(self, batch: Any, local: int) -> int:
        marked = data.global_size(batch)
        if marked is not None:
            return marked
        if self.dp_size == 1:
            if local == 0:
                raise ValueError("step got an empty batch: there is nothing to train on")
            return local
        count = torch.tensor([local], device=self.device)
        dist.all_reduce(count, group=self.dp_group)
        total = int(count)
        if total == 0:
            raise ValueError("step got an empty batch on every replica: there is nothing to train on")
        return total


class _Replica(torch.nn.Module):
    """The user's model plus one extra parameter whose gradient carries the loss to all ranks.

    ``step`` must return the global mean loss on every rank. A separate all-reduce for
    it cost ~15% of a small model's step on 2 CPU processes (bench/dp.py); instead the
    backward pass adds ``carrier * (dp * loss_sum_r)``, so DDP's own bucketed all-reduce
    averages ``dp * loss_sum_r`` into ``carrier.grad = sum_r loss_sum_r``, for free. The
    carrier is not in the user's model, state dict or optimizer.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.loss_carrier = torch.nn.Parameter(torch.zeros(()))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def carry(self, objective: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``objective + carrier * value``: the carrier's gradient is ``value``, the rest unchanged."""
        return torch.addcmul(objective, self.loss_carrier, value)

    def take(self) -> torch.Tensor:
        """The all-reduced sum, read once and cleared."""
        grad, self.loss_carrier.grad = self.loss_carrier.grad, None
        return grad


def _build_optimizer(optimizer: OptimizerArg | None, model: torch.nn.Module) -> torch.optim.Optimizer | None:
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        built = optimizer(model.parameters())
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(built).__name__}")
        return built
    raise TypeError(
        f"optimizer must be a function of the parameters (lambda p: torch.optim.AdamW(p)) "
        f"or a torch.optim.Optimizer, got {type(optimizer).__name__}"
    )
