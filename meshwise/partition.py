"""Cut a model into pipeline stages of balanced measured cost.

    part = meshwise.partition(model, sample, stages=4)   # sample = (x, y), one batch
    print(part)                                          # per stage: layers, params, ms, bytes

Three steps:

1. **Layers.** The model must run as a chain ``x -> layer_0 -> layer_1 -> ... -> out``:
   an ``nn.Sequential``, or a model whose forward calls its children one after the
   other (a ModuleList of blocks counts as its blocks). The chain is checked by running
   the sample with forward hooks, not assumed: each layer must receive exactly the
   tensor the previous one returned.
2. **Costs.** Each layer is timed on the sample, forward plus backward (median of a
   few repeats after a warm-up); the bytes it saves for backward are counted with
   saved-tensor hooks (parameters excluded), not estimated.
3. **Balance.** The contiguous split into ``stages`` parts that minimises the slowest
   stage's time, exactly, by dynamic programming over split points (O(stages * L^2)
   for L layers), optionally under a per-stage memory limit (parameter bytes plus
   saved-activation bytes). Equal layer counts are not balanced when layers differ:
   a pipeline runs at the pace of its slowest stage.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from meshwise import data
from meshwise.cost import balance


@dataclass(frozen=True)
class Layer:
    """One splittable layer and what it costs on the sample."""

    name: str
    params: int
    """Parameter count."""
    param_bytes: int
    ms: float
    """Forward + backward time on the sample, milliseconds."""
    activation_bytes: int
    """Bytes its forward saves for the backward pass (parameters excluded)."""
    output_bytes: int
    """Bytes of its output: what a stage boundary after it sends to the next stage."""
    forward_ms: float = 0.0
    """The forward's part of ``ms``."""

    @property
    def memory_bytes(self) -> int:
        return self.param_bytes + self.activation_bytes


@dataclass(frozen=True)
class Partition:
    """Stages as half-open ranges of layer indices: stage s holds layers[start:stop]."""

    layers: tuple[Layer, ...]
    bounds: tuple[tuple[int, int], ...]
    split: Any = field(default=None, compare=False, repr=False)
    """How to build the stage modules (``stage_modules``); None for a partition of bare costs."""

    def stage_modules(self) -> list[torch.nn.Module]:
        """One module per stage, calling the model's own layers (see meshwise.split)."""
        if self.split is None:
            raise ValueError("this partition was built from costs alone; use meshwise.partition(model, sample, stages)")
        return self.split.stage_modules(list(self.bounds))

    def stage_layers(self, stage: int) -> tuple[Layer, ...]:
        start, stop = self.bounds[stage]
        return self.layers[start:stop]

    def stage_ms(self, stage: int) -> float:
        return sum(layer.ms for layer in self.stage_layers(stage))

    @property
    def bottleneck_ms(self) -> float:
        """The slowest stage's time: the pipeline's pace."""
        return max(self.stage_ms(s) for s in range(len(self.bounds)))

    def __str__(self) -> str:
        rows = [f"{'stage':>5}  {'layers':<32} {'params':>10} {'ms':>8} {'act bytes':>11} {'out bytes':>10}"]
        for s in range(len(self.bounds)):
            ls = self.stage_layers(s)
            names = ls[0].name if len(ls) == 1 else f"{ls[0].name} .. {ls[-1].name} ({len(ls)})"
            rows.append(
                f"{s:>5}  {names:<32} {sum(x.params for x in ls):>10,} {self.stage_ms(s):>8.3f} "
                f"{sum(x.activation_bytes for x in ls):>11,} {ls[-1].output_bytes:>10,}"
            )
        mean = sum(self.stage_ms(s) for s in range(len(self.bounds))) / len(self.bounds)
        rows.append(f"bottleneck {self.bottleneck_ms:.3f} ms; balance (mean/max) {mean / self.bottleneck_ms:.2f}")
        return "\n".join(rows)


def chain_layers(model: torch.nn.Module, inputs: Any) -> list[tuple[str, torch.nn.Module]]:
    """The model's layers in call order, checked to form a chain on ``inputs``."""
    from meshwise.split import _candidates

    candidates = _candidates(model)
    if len(candidates) < 2:
        raise ValueError(
            f"{type(model).__name__} has {len(candidates)} child module(s) to split between; "
            f"pipeline stages need a model made of a chain of layers (nn.Sequential, or children "
            f"called one after the other in forward)"
        )
    seen: list[tuple[str, Any, Any]] = []
    hooks = [
        module.register_forward_hook(lambda mod, args, out, name=name: seen.append((name, args, out)))
        for name, module in candidates
    ]
    try:
        with torch.no_grad():
            output = data.call(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    order = [name for name, _, _ in seen]
    names = [name for name, _ in candidates]
    if sorted(order) != sorted(names) or len(set(order)) != len(order):
        missing = sorted(set(names) - set(order))
        again = sorted({n for n in order if order.count(n) > 1})
        why = f"{', '.join(missing)} never ran" if missing else f"{', '.join(again)} ran more than once"
        raise ValueError(f"{type(model).__name__} is not a chain of its children: {why}; "
                         f"wrap it as nn.Sequential(...) of the layers forward really runs")
    first_args = seen[0][1]
    if not (len(first_args) == 1 and first_args[0] is inputs):
        raise ValueError(f"{type(model).__name__} is not a chain: its first layer {order[0]} does not receive the "
                         f"model's input unchanged; move that preprocessing into a module of its own")
    for (prev, _, out), (name, args, _) in zip(seen, seen[1:]):
        if not (len(args) == 1 and args[0] is out):
            raise ValueError(
                f"{type(model).__name__} is not a chain: {name} does not receive exactly the output of "
                f"{prev} (forward combines or changes tensors between them, e.g. a residual or an "
                f"addition of embeddings); put that computation inside a module so the layers form a chain"
            )
    if seen[-1][2] is not output:
        raise ValueError(f"{type(model).__name__} is not a chain: its output is not the output of its last "
                         f"layer {order[-1]}; move the final computation into a module")
    by_name = dict(candidates)
    return [(name, by_name[name]) for name in order]


def measure(layers: Sequence[tuple[str, torch.nn.Module]], layer_args: dict[str, tuple[tuple[Any, ...], dict[str, Any]]],
            output_bytes: Sequence[int], *, repeats: int = 5) -> list[Layer]:
    """Time and size each layer on the inputs it received from the sample (forward + backward).

    ``layer_args[name]`` are the layer's (positional, keyword) inputs as the model called it;
    ``output_bytes[i]`` is what a cut after layer i sends to the next stage.
    """
    costs = []
    for (name, module), sent in zip(layers, output_bytes):
        params = list(module.parameters())
        param_storage = {p.untyped_storage().data_ptr() for p in params}  # views of weights too
        times, forwards = [], []
        saved = 0
        for r in range(repeats + 1):
            fresh = _fresh_input
            args = tuple(fresh(a) for a in layer_args[name][0])
            kwargs = {k: fresh(v) for k, v in layer_args[name][1].items()}
            stored: list[int] = []

            def pack(t: torch.Tensor) -> torch.Tensor:
                if t.untyped_storage().data_ptr() not in param_storage:
                    stored.append(t.numel() * t.element_size())
                return t

            device = next((p.device for p in params), torch.device("cpu"))
            if device.type == "cuda":  # time the work, not its queueing
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = module(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            forwarded = time.perf_counter() - start
            outs = [t for t in _tensors(out) if t.requires_grad]
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if r:  # the first run warms up
                times.append(elapsed)
                forwards.append(forwarded)
            saved = sum(stored)
            module.zero_grad(set_to_none=True)
        costs.append(Layer(
            name=name,
            params=sum(p.numel() for p in params),
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            ms=statistics.median(times) * 1e3,
            activation_bytes=saved,
            output_bytes=sent,
            forward_ms=statistics.median(forwards) * 1e3,
        ))
    return costs


def _fresh_input(a: Any) -> Any:
    """A layer's input cut from the graph: a float tensor requires grad, and is not a leaf,
    so that an in-place first operation (ReLU(inplace=True)) is allowed, as in the model."""
    if not isinstance(a, torch.Tensor):
        return a
    if a.is_floating_point():
        return a.detach().requires_grad_(True).clone()
    return a.detach()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def split_model(model: torch.nn.Module, inputs: Any) -> Any:
    """The model's layers and how to cut it: a traced graph, else a checked chain of children."""
    from meshwise import split

    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    try:
        data.call(model, inputs)
    except Exception as error:
        raise ValueError(f"the sample does not run through {type(model).__name__}: {type(error).__name__}: "
                         f"{error}; pass sample=(x, y) with x as the model takes it") from error
    try:
        return split.GraphSplit(model, args)
    except torch.fx.proxy.TraceError as error:
        traced: Exception = error
    except ValueError:
        raise
    except Exception as error:
        traced = error
    # fx could not trace forward: a chain of children still splits
    try:
        return split.ChainSplit(model, chain_layers(model, inputs), inputs)
    except ValueError as chained:
        raise ValueError(
            f"{type(model).__name__} cannot be cut into pipeline stages: torch.fx could not trace its forward "
            f"({type(traced).__name__}: {str(traced).splitlines()[0] if str(traced) else ''}, at "
            f"{_where(traced)}), and {chained}"
        ) from None


def _where(error: Exception) -> str:
    """file:line of the innermost frame outside torch: the model code tracing stopped at."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "an unknown place"


def partition(model: torch.nn.Module, sample: Any, stages: int, *, memory_limit: int | None = None) -> Partition:
    """Split ``model`` into ``stages`` contiguous stages of balanced measured time.

    ``sample`` is one batch ``(x, y)`` (or just ``x``); ``memory_limit`` caps each
    stage's parameter plus saved-activation bytes. ``print`` the result to see it.
    """
    inputs = data.unpack(sample)[0] if isinstance(sample, (tuple, list)) else sample
    with untouched(model):
        return _partition(model, inputs, stages, memory_limit)


@contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    """Run the model in train mode (to trace and time it as it trains), then leave its mode,
    its buffers (batch-norm statistics) and the random stream as they were."""
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def _partition(model: torch.nn.Module, inputs: Any, stages: int, memory_limit: int | None) -> Partition:
    cut = split_model(model, inputs)
    layers = cut.layers
    if stages > len(layers):
        names = ", ".join(name for name, _ in layers)
        raise ValueError(f"cannot cut {type(model).__name__} into {stages} stages: it has {len(layers)} splittable "
                         f"layers ({names}); use at most {len(layers)} stages, or split the layers further")
    allowed = cut.allowed_cuts()
    if stages > len(allowed) - 1:
        blocked = [f"before {layers[i][0]} ({c.why})" for i, c in enumerate(cut.crossings) if not c.ok]
        raise ValueError(f"{type(model).__name__} can be cut at {len(allowed) - 2} places, too few for {stages} "
                         f"stages; cuts are impossible {'; '.join(blocked[:3])}")
    costs = measure(layers, cut.layer_args, [c.bytes for c in cut.crossings[1:]])
    bounds = balance([c.ms for c in costs], stages, memory=[c.memory_bytes for c in costs], limit=memory_limit,
                     allowed=allowed)
    return Partition(layers=tuple(costs), bounds=tuple(bounds), split=cut)
