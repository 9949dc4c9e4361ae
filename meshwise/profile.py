"""Profiling for the planner: what the user's model costs on this device, and what this job's
links cost. ``auto_plan`` puts them together for ``--plan auto``.

* **Layers.** The model is traced and cut into its layers as for a pipeline
  (``meshwise.partition``). Each layer is run forward and backward on the sample and on
  the sample repeated 4 times. That fits its time as fixed + per-row seconds. It also
  records the bytes it saves for backward (saved-tensor hooks), its parameters, and
  what a cut after it would send.
* **Links.** Every rank times all-reduces of 4 KB to 8 MB on the job's real process group.
  The slowest rank's times are fitted as latency + bytes / bandwidth, for a ring.

The profile is a ``meshwise.cost.Workload`` whose layers carry measured seconds instead
of FLOPs. The local "hardware" carries the fitted link, the memory per process and, on
CPU hosts, the cores: processes beyond the cores share them. So the search knows when
fewer, busier processes beat more.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from meshwise import cost, data
from meshwise.plan import Plan

SEARCH_ENV = "MESHWISE_SEARCH"
"""Set by ``meshwise plan SCRIPT``: the request (JSON) that makes ``parallelize`` profile,
print the ranking and stop the script."""

SIZES = (1 << 12, 1 << 16, 1 << 20, 1 << 23)
"""All-reduce sizes in bytes for the link fit."""


def profile_model(model: torch.nn.Module, sample: Any, device: torch.device, loss_fn: Any = None,
                  optimizer: Any = None) -> cost.Workload:
    """The model's layers, measured on ``sample``'s inputs (fixed + per-row seconds each).

    With ``loss_fn`` (and ``optimizer``, a function of the parameters), a whole training
    step of a copy of the model is timed too; what it takes beyond the layers (the
    model's own code between them, the loss, the optimizer) becomes one more layer."""
    from meshwise.partition import measure, split_model, untouched

    inputs = data.map_tensors(lambda t: t.to(device), data.unpack(sample)[0])
    rows = data.batch_size_of(inputs)
    if not rows:
        raise ValueError("profiling needs a sample with at least one row: pass sample=(x, y)")
    larger = data.map_tensors(lambda t: torch.cat([t] * 4), inputs)
    with untouched(model):
        small_cut = split_model(model, inputs)
        large_cut = split_model(model, larger)
        small = measure(small_cut.layers, small_cut.layer_args, [c.bytes for c in small_cut.crossings[1:]])
        large = measure(large_cut.layers, large_cut.layer_args, [c.bytes for c in large_cut.crossings[1:]])
    layers = []
    for a, b in zip(small, large):
        per_row = max(0.0, (b.ms - a.ms) / 1e3 / (3 * rows))
        fixed = max(0.0, a.ms / 1e3 - per_row * rows)
        layers.append(cost.Layer(name=a.name, flops=0.0, params=a.params, act_bytes=a.activation_bytes / rows,
                                 seconds=per_row, fixed_seconds=fixed))
    extra: tuple[cost.Layer, ...] = ()
    step_seconds = 0.0
    if loss_fn is not None:  # the model's own code between layers and the loss: with the last stage
        whole = [_step_seconds(model, s, loss_fn, optimizer, device) for s in (sample, data.map_tensors(
            lambda t: torch.cat([t] * 4), sample))]
        parts = [sum(x.ms for x in small) / 1e3, sum(x.ms for x in large) / 1e3]
        rest = [max(0.0, w - p) for (w, _), p in zip(whole, parts)]
        per_row = max(0.0, (rest[1] - rest[0]) / (3 * rows))
        extra = (cost.Layer(name="rest of forward, loss and backward", flops=0.0, params=0.0, act_bytes=0.0,
                            seconds=per_row, fixed_seconds=max(0.0, rest[0] - per_row * rows)),)
        step_seconds = whole[0][1]  # the optimizer step: once a step, whatever the batch
    sent = max((c.bytes for c in small_cut.crossings[1:-1]), default=0) / rows
    value_bytes = next((p.element_size() for p in model.parameters()), 4)  # 4 for a model without parameters
    return cost.Workload(name=type(model).__name__, layers=tuple(layers), output_bytes=sent, value_bytes=value_bytes,
                         tensors=sum(1 for p in model.parameters() if p.requires_grad), extra_last=extra,
                         optimizer_seconds=step_seconds)


def _sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock times measure the work, not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_seconds(model: torch.nn.Module, sample: Any, loss_fn: Any, optimizer: Any, device: torch.device,
                  repeats: int = 5) -> tuple[float, float]:
    """Median seconds of a training step's forward, loss and backward, and of its optimizer
    step, for a copy of ``model`` (in train mode) on ``sample``."""
    import copy

    twin = copy.deepcopy(model).train()
    opt = optimizer(twin.parameters()) if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer) \
        else torch.optim.SGD(twin.parameters(), lr=0.0)
    inputs, targets = data.unpack(data.map_tensors(lambda t: t.to(device), sample))
    passes, steps = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for r in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            loss_fn(data.call(twin, inputs), targets).backward()
            _sync(device)
            middle = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if r:
                passes.append(middle - start)
                steps.append(time.perf_counter() - middle)
    return statistics.median(passes), statistics.median(steps)


def fit_links(group: Any, device: torch.device, repeats: int = 3) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of a ring all-reduce on ``group``, from the slowest rank."""
    n = dist.get_world_size(group)
    if n == 1:
        return 0.0, float("inf")
    times = []
    for size in SIZES:
        buffer = torch.ones(size // 4, device=device)
        dist.all_reduce(buffer, group=group)  # warm-up: connections, allocations
        samples = []
        for _ in range(repeats):
            dist.barrier(group=group)
            _sync(device)
            start = time.perf_counter()
            dist.all_reduce(buffer, group=group)
            _sync(device)
            samples.append(time.perf_counter() - start)
        times.append(statistics.median(samples))
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    ts = slowest.tolist()
    mean_x, mean_t = statistics.fmean(SIZES), statistics.fmean(ts)
    slope = sum((x - mean_x) * (t - mean_t) for x, t in zip(SIZES, ts)) / sum((x - mean_x) ** 2 for x in SIZES)
    intercept = max(0.0, mean_t - slope * mean_x)
    bandwidth = 2 * (n - 1) / n / slope if slope > 0 else float("inf")
    return intercept / (2 * (n - 1)), bandwidth


def local_hardware(device: torch.device, world: int, latency: float, bandwidth: float) -> cost.Hardware:
    """This host as the cost model sees it: the fitted link, memory per process, and cores."""
    if device.type == "cuda":
        memory = float(torch.cuda.get_device_properties(device).total_memory)
        slots = 0
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(world, 1)
        slots = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    like = cost.HARDWARE["cpu" if device.type == "cpu" else "h100"]  # software overheads of this kind of host
    return cost.Hardware(name=f"this {device.type} host", flops={"fp32": 1.0, "bf16": 1.0}, memory=memory,
                         intra_bw=bandwidth, inter_bw=bandwidth, devices_per_node=max(world, 1),
                         latency=latency, efficiency=1.0, reserved=256 * 2**20, slots=slots,
                         overlap=device.type == "cuda", fsdp_overhead=like.fsdp_overhead,
                         call_overhead=like.call_overhead)


def auto_plan(model: torch.nn.Module, sample: Any, device: torch.device, batch: int, *, is_main: bool,
              loss_fn: Any = None, optimizer: Any = None) -> tuple[Plan, Any]:
    """Profile, search and agree on a plan on every rank (a collective); rank 0 says why.

    Returns the plan and its predicted step seconds as a function of the global batch."""
    from meshwise.search import search

    world = dist.get_world_size()
    latency, bandwidth = fit_links(dist.group.WORLD, device)
    message: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            work = profile_model(model, sample, device, loss_fn, optimizer)
            hw = local_hardware(device, world, latency, bandwidth)
            # tensor parallelism needs a model of its communication per layer, which a profile of an
            # arbitrary model lacks: the automatic search covers dp, pp, ZeRO, schedule, micro-batches
            # and recomputation
            results = search(work, hw, world, batch, precision="fp32", fixed={"tp": 1, "precision": "fp32"})
            best = [r for r in results if r.feasible]
            if not best:
                reasons = sorted({r.reason for r in results})[:3]
                raise ValueError(f"--plan auto found no feasible plan for {world} processes and a global batch of "
                                 f"{batch}: {'; '.join(reasons)}")
            message = [("ok", best[0], best[1:3], work, hw)]
        except Exception as error:  # every rank must hear of it, or they wait in the broadcast
            message = [("error", f"{error}" if isinstance(error, (ValueError, TypeError))
                        else f"--plan auto failed on rank 0: {type(error).__name__}: {error}")]
    dist.broadcast_object_list(message, src=0)
    if message[0][0] == "error":
        raise ValueError(message[0][1])
    _, chosen, runners_up, work, hw = message[0]
    if is_main:
        print(f"meshwise: --plan auto: planned for a global batch of {batch} rows (parallelize's batch_size, "
              f"else the sample's)", flush=True)
        print(f"meshwise: --plan auto: profiled {len(work.layers)} layers of {work.name}; links: latency "
              f"{hw.latency * 1e6:.0f} us, {hw.intra_bw / 1e9:.2f} GB/s; {hw.slots or 'no'} core limit", flush=True)
        for label, e in [("chose", chosen), *[("next", r) for r in runners_up]]:
            assert e.memory is not None
            print(f"meshwise: {label} {e.plan}: predicted step {e.step_time * 1e3:.1f} ms, {e.samples_per_s:.0f} "
                  f"samples/s, {e.memory.total / 2**20:.0f} MiB per process", flush=True)

    def predict(rows: int) -> float:
        return cost.estimate(work, chosen.plan, hw, rows).step_time

    return chosen.plan, predict


def answer_search(model: torch.nn.Module, sample: Any, device: torch.device, loss_fn: Any, optimizer: Any,
                  request: dict[str, Any]) -> None:
    """``meshwise plan SCRIPT``: profile here, rank the plans for ``devices`` processes of this
    kind, print them (table or JSON), and stop the script (SystemExit 0)."""
    from meshwise.search import chart, dumps, search, table

    if sample is None:
        raise ValueError("meshwise plan SCRIPT profiles the model on a sample: pass sample=(x, y) to parallelize")
    work = profile_model(model, sample, device, loss_fn, optimizer)
    preset = cost.HARDWARE[request.get("hardware") or ("cpu" if device.type == "cpu" else "h100")]
    devices = int(request["devices"])
    hw = local_hardware(device, devices, preset.latency, preset.intra_bw)
    hw = cost.Hardware(**{**hw.__dict__, "inter_bw": preset.inter_bw,
                          "devices_per_node": devices if device.type == "cpu" else preset.devices_per_node})
    batch = request.get("batch") or data.batch_size_of(data.unpack(sample)[0])
    fixed = {"tp": 1, "precision": request.get("precision") or "fp32"}
    if request.get("evaluate"):
        named = {part.split("=", 1)[0].strip() for part in request["evaluate"].split(",") if part.strip()}
        fixed.update({k: v for k, v in Plan.parse(request["evaluate"]).to_dict().items() if k in named})
    budget = request.get("memory") or hw.memory
    results = search(work, hw, devices, batch, precision=fixed["precision"], budget=budget, fixed=fixed)
    if request.get("chart"):
        chart(results, request["chart"], f"{work.name}: {devices} processes, batch {batch}")
    if request.get("json"):
        print(dumps(results, int(request["top"])))
    else:
        print(f"{work.name} ({len(work.layers)} layers profiled on {device.type}, {work.params / 1e6:.2f}M parameters); "
              f"{devices} processes, links {preset.name}, budget {budget / 1e9:.1f} GB each; global batch {batch}")
        print(table(results, int(request["top"]), budget))
    raise SystemExit(0)
