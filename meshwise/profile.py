"""Profiling for the planner: what the user's model costs on this device, and what this job's
links cost. ``auto_plan`` puts them together for ``--plan auto``.

* **Layers.** The model is traced and cut into its layers as for a pipeline
  (``meshwise.partition``). Each layer is run forward and backward on the sample, on one
  row, on an eighth of it and on the sample repeated 4 times; the cost model follows these points
  (small micro-batches cost more per row). It also records the bytes it saves for
  backward (saved-tensor hooks), its parameters, what a cut after it would send, and
  what tensor parallelism would split of it (``tensor_costs``).
* **Links.** Every rank times all-reduces, all-gathers, reduce-scatters and sends of 4 KB
  to 8 MB on the job's real process group. The slowest rank's times are fitted, per
  collective, as latency + bytes / bandwidth, for a ring.

The profile is a ``meshwise.cost.Workload`` whose layers carry measured seconds instead
of FLOPs. The local "hardware" carries the fitted link, the memory per process and, on
CPU hosts, the cores: processes beyond the cores share them. On CPU hosts the profile is
measured once per thread count considered (``rank_processes``), so the search knows from
measurement when fewer processes with more threads each beat more processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from meshwise import cost, data
from meshwise.observe import Progress, note
from meshwise.plan import Plan

SEARCH_ENV = "MESHWISE_SEARCH"
"""Set by ``meshwise plan SCRIPT``: the request (JSON) that makes ``parallelize`` profile,
print the ranking and stop the script."""

SIZES = (1 << 12, 1 << 16, 1 << 20, 1 << 23)
"""All-reduce sizes in bytes for the link fit."""


def profile_model(model: torch.nn.Module, sample: Any, device: torch.device, loss_fn: Any = None,
                  optimizer: Any = None, tp_upto: int = 8) -> cost.Workload:
    """The model's layers, measured on ``sample``'s inputs: on one row, an eighth of its rows,
    its rows and 4 times them (seconds at each size; fixed + per-row seconds fitted on the
    last two).

    With ``loss_fn`` (and ``optimizer``, a function of the parameters), a whole training
    step of a copy of the model is timed too; what it takes beyond the layers (the
    model's own code between them, the loss, the optimizer) becomes one more layer."""
    from meshwise.partition import measure, split_model, untouched

    inputs = data.map_tensors(lambda t: t.to(device), data.unpack(sample)[0])
    rows = data.batch_size_of(inputs)
    if not rows:
        raise ValueError("profiling needs a sample with at least one row: pass sample=(x, y)")
    # from 2 rows (batch norm needs 2) to 4x the sample: a micro-batch of a few rows costs more per
    # row than the sample does
    sizes = sorted({*(n for n in (2, rows // 8) if 2 <= n < rows), rows, 4 * rows})

    def resized(value: Any, n: int) -> Any:
        return data.map_tensors(lambda t: torch.cat([t] * (n // rows)) if n >= rows else t[:n], value)

    with untouched(model):
        cuts = {n: split_model(model, resized(inputs, n)) for n in sizes}
        runs = {n: measure(c.layers, c.layer_args, [x.bytes for x in c.crossings[1:]]) for n, c in cuts.items()}
        small_cut, small, large = cuts[rows], runs[rows], runs[4 * rows]
        split, degrees = tensor_costs(model, inputs, list(small_cut.layers), tp_upto)
    layers = []
    for i, (a, b) in enumerate(zip(small, large)):
        per_row = max(0.0, (b.ms - a.ms) / 1e3 / (3 * rows))
        fixed = max(0.0, a.ms / 1e3 - per_row * rows)
        share, whole, sent_tp, calls, modules = split[a.name]
        layers.append(cost.Layer(name=a.name, flops=0.0, params=a.params, act_bytes=a.activation_bytes / rows,
                                 act_bytes_tp=share * a.activation_bytes / rows, tp_comm_bytes=sent_tp / rows,
                                 seconds=per_row, fixed_seconds=fixed, tp_share=share,
                                 points=tuple((n, runs[n][i].ms / 1e3) for n in sizes),
                                 forward_share=min(1.0, a.forward_ms / a.ms) if a.ms else 1 / 3,
                                 whole_params=whole if degrees else a.params, tp_calls=calls,
                                 tp_modules=modules))
    extra: tuple[cost.Layer, ...] = ()
    step_seconds, state_bytes = 0.0, None
    if loss_fn is not None:  # the model's own code between layers and the loss: with the last stage
        whole = {n: _step_seconds(model, resized(sample, n), loss_fn, optimizer, device) for n in sizes}
        rest = {n: max(0.0, whole[n][0] - sum(x.ms for x in runs[n]) / 1e3) for n in sizes}
        per_row = max(0.0, (rest[4 * rows] - rest[rows]) / (3 * rows))
        extra = (cost.Layer(name="rest of forward, loss and backward", flops=0.0, params=0.0, act_bytes=0.0,
                            seconds=per_row, fixed_seconds=max(0.0, rest[rows] - per_row * rows),
                            points=tuple((n, rest[n]) for n in sizes), tp_share=0.0),)  # the loss and glue: whole
        step_seconds = whole[rows][1]  # the optimizer step: once a step, whatever the batch
        state_bytes = whole[rows][2]
    sent = max((c.bytes for c in small_cut.crossings[1:-1]), default=0) / rows
    value_bytes = next((p.element_size() for p in model.parameters()), 4)  # 4 for a model without parameters
    return cost.Workload(name=type(model).__name__, layers=tuple(layers), output_bytes=sent, value_bytes=value_bytes,
                         tensors=sum(1 for p in model.parameters() if p.requires_grad), extra_last=extra,
                         optimizer_seconds=step_seconds, tp_degrees=degrees, state_bytes=state_bytes)


def tensor_costs(model: torch.nn.Module, inputs: Any, layers: list[tuple[str, torch.nn.Module]], tp_upto: int
                 ) -> tuple[dict[str, tuple[float, float, float, int, int]], tuple[int, ...]]:
    """What tensor parallelism would split of each layer: per layer name, (the share of its
    FLOPs that divides by tp, parameters kept whole, bytes its collectives carry per forward,
    collectives per forward, modules split); and the degrees up to ``tp_upto`` that split all that tp=2 does.

    ``meshwise.tensor.tensor_plan`` decides what splits. The FLOPs come from torch's
    ``FlopCounterMode`` on one forward: a split module's, and an attention's own (its heads
    split with its projections). Row-parallel outputs are all-reduced; a gathered vocabulary
    head's logits are all-gathered, half an all-reduce's bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    from meshwise.tensor import tensor_plan

    plan = tensor_plan(model, 2)
    styles = plan.sharded
    kinds = {d.name: d.kind for d in plan.decisions}
    degrees = tuple(t for t in range(2, tp_upto + 1) if styles and tensor_plan(model, t).sharded == styles)
    sent: dict[str, float] = {}

    def record(name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                half = 0.5 if kinds.get(name) == "vocab head" else 1.0
                sent[name] = out.numel() * out.element_size() * half
        return hook

    watched = [n for n, s in styles.items() if s == "rowwise" or kinds.get(n) == "vocab head"]
    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in watched]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            data.call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    root = type(model).__name__
    totals = {k[len(root) + 1:]: sum(v.values()) for k, v in counter.get_flop_counts().items()
              if k.startswith(root + ".")}

    def own(name: str) -> float:  # FLOPs in the module itself, not in its children
        prefix = name + "."
        return totals.get(name, 0) - sum(v for k, v in totals.items()
                                         if k.startswith(prefix) and "." not in k[len(prefix):])

    parents = {n.rsplit(".", 1)[0] for n in styles if "." in n}
    out = {}
    for name, module in layers:
        prefix = name + "."
        inside = [k for k in totals if k == name or k.startswith(prefix)]
        split_flops = sum(own(k) for k in inside if k in styles or k in parents)
        share = split_flops / totals[name] if totals.get(name) else float(name in styles)
        whole = sum(p.numel() for n, p in module.named_parameters() if f"{name}.{n}".rsplit(".", 1)[0] not in styles)
        mine = [n for n in watched if n == name or n.startswith(prefix)]
        split_here = sum(1 for n in styles if n == name or n.startswith(prefix))
        out[name] = (share, float(whole), sum(sent.get(n, 0.0) for n in mine), len(mine), split_here)
    return out, degrees


def _sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock times measure the work, not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_seconds(model: torch.nn.Module, sample: Any, loss_fn: Any, optimizer: Any, device: torch.device,
                  repeats: int = 5) -> tuple[float, float, float]:
    """Median seconds of a training step's forward, loss and backward, and of its optimizer
    step, for a copy of ``model`` (in train mode) on ``sample``; and the optimizer's state
    bytes per parameter."""
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
    from meshwise.memory import optimizer_bytes

    count = sum(p.numel() for p in twin.parameters() if p.requires_grad) or 1
    return statistics.median(passes), statistics.median(steps), optimizer_bytes(opt) / count


def fit_links(group: Any, device: torch.device, repeats: int = 5) -> dict[str, tuple[float, float]]:
    """(latency s per step, bandwidth bytes/s) of each collective on ``group``, from the slowest
    rank: ring all-reduce, all-gather and reduce-scatter, and one send/receive (a pipeline's).

    Each is timed at 4 KB to 8 MB and fitted as latency x steps + bytes x (share sent) /
    bandwidth. Each size's time is the median of ``repeats``: on a host whose processes share
    cores, the waits between them are part of what every collective costs. A collective the
    backend lacks is left out (the cost model then uses the all-reduce's figures)."""
    n = dist.get_world_size(group)
    if n == 1:
        return {}
    rank = dist.get_rank(group)
    # the names torch 2.13 prefers, else those of earlier versions
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    ops = {
        "all_reduce": lambda size: (lambda b=torch.ones(size // 4, device=device): dist.all_reduce(b, group=group)),
        "all_gather": lambda size: (lambda i=torch.ones(size // 4 // n, device=device),
                                    o=torch.empty(size // 4 // n * n, device=device):
                                    gather(o, i, group=group)),
        "reduce_scatter": lambda size: (lambda i=torch.ones(size // 4 // n * n, device=device),
                                        o=torch.empty(size // 4 // n, device=device):
                                        scatter(o, i, group=group)),
        "send_recv": lambda size: _exchange(torch.ones(size // 4, device=device), rank, n, group),
    }
    fits = {}
    for name, make in ops.items():
        ok = torch.ones(1, device=device)
        try:
            make(SIZES[0])()  # the backend may lack it: then every rank fails here, before sending
        except (RuntimeError, NotImplementedError):
            ok.zero_()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # every rank skips it, or none
        if not ok.item():
            continue
        times = [_median_time(make(size), group, device, repeats) for size in SIZES]
        slowest = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        ts = slowest.tolist()
        mean_x, mean_t = statistics.fmean(SIZES), statistics.fmean(ts)
        slope = sum((x - mean_x) * (t - mean_t) for x, t in zip(SIZES, ts)) / sum((x - mean_x) ** 2 for x in SIZES)
        intercept = max(0.0, mean_t - slope * mean_x)
        steps, share = {"all_reduce": (2 * (n - 1), 2 * (n - 1) / n), "send_recv": (1, 1.0)}.get(
            name, (n - 1, (n - 1) / n))
        fits[name] = (intercept / steps, share / slope if slope > 0 else float("inf"))
    return fits


def _exchange(buffer: torch.Tensor, rank: int, n: int, group: Any) -> Any:
    """One message from each even rank to the next odd one (a pipeline's send)."""
    peer = rank + 1 if rank % 2 == 0 else rank - 1

    def run() -> None:
        if peer >= n:
            return
        to = peer if group is None or group is dist.group.WORLD else dist.get_global_rank(group, peer)
        if rank % 2 == 0:
            dist.send(buffer, to, group=group)
        else:
            dist.recv(buffer, to, group=group)
    return run


def _median_time(run: Any, group: Any, device: torch.device, repeats: int) -> float:
    run()  # warm-up: connections, allocations
    samples = []
    for _ in range(repeats):
        dist.barrier(group=group)
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def local_hardware(device: torch.device, world: int, latency: float, bandwidth: float,
                   links: dict[str, tuple[float, float]] | None = None) -> cost.Hardware:
    """This host as the cost model sees it: the link (and each collective's fit, ``links``),
    memory per process, and cores."""
    if device.type == "cuda":
        memory = float(torch.cuda.get_device_properties(device).total_memory)
        slots = 0
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(world, 1)
        slots = cores()
    like = cost.HARDWARE["cpu" if device.type == "cpu" else "h100"]  # software overheads of this kind of host
    return cost.Hardware(name=f"this {device.type} host", flops={"fp32": 1.0, "bf16": 1.0}, memory=memory,
                         intra_bw=bandwidth, inter_bw=bandwidth, devices_per_node=max(world, 1),
                         latency=latency, efficiency=1.0, reserved=256 * 2**20, slots=slots,
                         overlap=device.type == "cuda", fsdp_overhead=like.fsdp_overhead,
                         call_overhead=like.call_overhead, split_overhead=like.split_overhead, contention=like.contention,
                         measured=tuple((k, *v) for k, v in sorted((links or {}).items())))


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch's CPU kernels on ``n`` threads for a while (0: leave them be)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rank_processes(profile: Callable[[int], cost.Workload], hardware: Callable[[int], cost.Hardware],
                   choices: list[tuple[int, int]], batch: int, *, budget: float | None = None,
                   fixed: dict[str, Any] | None = None, show: bool = True
                   ) -> tuple[list[cost.Estimate], dict[int, cost.Workload]]:
    """Every plan for each (processes, threads per process) choice, ranked together.

    ``profile(threads)`` is measured once per distinct thread count, with torch on that
    many threads (0: as it is), so the ranking knows from measurement whether fewer processes
    with more threads each beat more processes. Returns the ranking (each estimate
    carrying its threads) and the profile per thread count."""
    from meshwise.search import rank, search

    profiles: dict[int, cost.Workload] = {}
    out: list[cost.Estimate] = []
    mismatch = None
    fixed = dict(fixed or {})
    bar = Progress(len({t for _, t in choices}), enabled=show, desc="profiling")
    for processes, threads in choices:
        if threads not in profiles:
            with torch_threads(threads):
                profiles[threads] = profile(threads)
            bar.update()
        try:
            results = search(profiles[threads], hardware(processes), processes, batch,
                             precision=fixed.get("precision", "fp32"), budget=budget, fixed=fixed)
        except ValueError as error:  # fixed degrees that need another process count
            mismatch = error
            continue
        out += [dataclasses.replace(r, threads=threads) for r in results]
    bar.close()
    if not out and mismatch is not None:
        raise mismatch
    return rank(out), profiles


def _profile_together(measure: Callable[[], cost.Workload], thread_counts: list[int], device: torch.device,
                      world: int) -> tuple[dict[int, cost.Workload], BaseException | None]:
    """Rank 0's profile at each thread count (a collective), and the error that stopped it.

    On a CPU host, as many ranks as processes of that many threads fill the cores profile
    at once (the others' results are dropped), so the profile sees the host as busy as
    training keeps it: cores that share caches, memory bandwidth or a physical core
    (hyperthreads) compute slower together than one alone does."""
    rank = dist.get_rank()
    profiles: dict[int, cost.Workload] = {}
    failure: BaseException | None = None
    bar = Progress(len(thread_counts), enabled=rank == 0, desc="profiling")
    for threads in thread_counts:
        together = min(world, max(1, cores() // threads)) if device.type == "cpu" and threads else 1
        dist.barrier()
        if rank < together and failure is None:
            try:
                with torch_threads(threads):
                    profiles[threads] = measure()
            except Exception as error:  # rank 0's reaches every rank through the plan's broadcast
                failure = error
        bar.update()
    bar.close()
    return (profiles, failure) if rank == 0 else ({}, None)


def rank_job(model: torch.nn.Module, sample: Any, device: torch.device, batch: int, *, loss_fn: Any = None,
             optimizer: Any = None) -> Callable[[], tuple[list[cost.Estimate], cost.Workload, cost.Hardware]]:
    """Measure for this job (a collective): the links, and the model at the job's threads
    per process and, on CPU hosts, at the threads of every smaller process count.

    Returns, for rank 0, a function that ranks the plans (raising what the profile raised):
    (every estimate, fewer processes included; the profile at the job's threads; this
    host as hardware for the job)."""
    world = dist.get_world_size()
    links = fit_links(dist.group.WORLD, device)
    latency, bandwidth = links.get("all_reduce", (0.0, float("inf")))
    now = torch.get_num_threads() if device.type == "cpu" else 0
    choices = [(world, now)]
    if device.type == "cpu":
        choices += [(p, max(1, cores() // p)) for p in range(1, world)]
    agreed = [(now, choices)]  # rank 0's: every rank must run the same profiling rounds
    dist.broadcast_object_list(agreed, src=0)
    now, choices = agreed[0]
    measured, failure = _profile_together(
        lambda: profile_model(model, sample, device, loss_fn, optimizer, tp_upto=world),
        list(dict.fromkeys(t for _, t in choices)), device, world)

    def ranking() -> tuple[list[cost.Estimate], cost.Workload, cost.Hardware]:
        if failure is not None:
            raise failure
        results, _ = rank_processes(lambda threads: measured[threads],
                                    lambda p: local_hardware(device, p, latency, bandwidth, links), choices, batch,
                                    fixed={"precision": "fp32"}, show=False)  # measured: _profile_together's bar
        return results, measured[now], local_hardware(device, world, latency, bandwidth, links)

    return ranking


def auto_plan(model: torch.nn.Module, sample: Any, device: torch.device, batch: int, *, is_main: bool,
              loss_fn: Any = None, optimizer: Any = None) -> tuple[Plan, Any]:
    """Profile, search and agree on a plan on every rank (a collective); rank 0 says why.

    On CPU hosts rank 0 also profiles with the threads fewer processes would have, and
    says when fewer processes are predicted faster (the job's size is the user's to change).
    Returns the plan and its predicted step seconds as a function of the global batch."""
    world = dist.get_world_size()
    ranking = rank_job(model, sample, device, batch, loss_fn=loss_fn, optimizer=optimizer)
    message: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            results, work, hw = ranking()
            best = [r for r in results if r.feasible and r.plan.world_size == world]
            if not best:
                reasons = sorted({r.reason for r in results if r.plan.world_size == world})[:3]
                raise ValueError(f"--plan auto found no feasible plan for {world} processes and a global batch of "
                                 f"{batch}: {'; '.join(reasons)}")
            fewer = next((r for r in results if r.feasible), best[0])
            hint = ""
            if fewer.plan.world_size < world and fewer.step_time < 0.9 * best[0].step_time:
                hint = (f"meshwise: --plan auto: {fewer.plan.world_size} process(es) with {fewer.threads} threads "
                        f"each are predicted faster ({fewer.step_time * 1e3:.1f} ms a step with {fewer.plan}, "
                        f"{best[0].step_time / fewer.step_time:.2f}x): run OMP_NUM_THREADS={fewer.threads} "
                        f"meshwise run --nproc {fewer.plan.world_size} --plan auto ...")
            message = [("ok", best[0], best[1:3], work, hw, hint)]
        except Exception as error:  # every rank must hear of it, or they wait in the broadcast
            message = [("error", f"{error}" if isinstance(error, (ValueError, TypeError))
                        else f"--plan auto failed on rank 0: {type(error).__name__}: {error}")]
    dist.broadcast_object_list(message, src=0)
    if message[0][0] == "error":
        raise ValueError(message[0][1])
    _, chosen, runners_up, work, hw, hint = message[0]
    if is_main:
        note(f"meshwise: --plan auto: planned for a global batch of {batch} rows (parallelize's batch_size, "
             f"else the sample's)")
        fitted = ", ".join(f"{name} {lat * 1e6:.0f} us + {bw / 1e9:.2f} GB/s" for name, lat, bw in hw.measured)
        note(f"meshwise: --plan auto: profiled {len(work.layers)} layers of {work.name}; links: "
             f"{fitted or 'none (one process)'}; {hw.slots or 'no'} core limit")
        for label, e in [("chose", chosen), *[("next", r) for r in runners_up]]:
            assert e.memory is not None
            note(f"meshwise: {label} {e.plan}: predicted step {e.step_time * 1e3:.1f} ms, {e.samples_per_s:.0f} "
                 f"samples/s, {e.memory.total / 2**20:.0f} MiB per process")
        if hint:
            note(hint)

    def predict(rows: int) -> float:
        return cost.estimate(work, chosen.plan, hw, rows).step_time

    predict.facts = {"step_s": chosen.step_time, "batch": batch, "samples_per_s": chosen.samples_per_s,  # type: ignore[attr-defined]
                     "compute_s": chosen.compute, "communication_s": chosen.communication,
                     "bubble_s": chosen.bubble, "optimizer_s": chosen.optimizer}
    return chosen.plan, predict


def _budget(budget: float | None, device: torch.device) -> str:
    if budget:
        return f"{budget / 1e9:.1f} GB each"
    return "the RAM divided among the processes" if device.type == "cpu" else "the GPU's memory"


def answer_search(model: torch.nn.Module, sample: Any, device: torch.device, loss_fn: Any, optimizer: Any,
                  request: dict[str, Any]) -> None:
    """``meshwise plan SCRIPT``: profile here, rank the plans for ``devices`` processes of this
    kind, print them (table or JSON), and stop the script (SystemExit 0).

    On a CPU host ``devices`` is the most processes: each count from 1 up is ranked, with
    the cores shared out as threads, each thread count measured."""
    from meshwise.search import chart, dumps, table

    if sample is None:
        raise ValueError("meshwise plan SCRIPT profiles the model on a sample: pass sample=(x, y) to parallelize")
    preset = cost.HARDWARE[request.get("hardware") or ("cpu" if device.type == "cpu" else "h100")]
    devices = int(request["devices"])

    def hardware(processes: int) -> cost.Hardware:
        hw = local_hardware(device, processes, preset.latency, preset.intra_bw)
        return cost.Hardware(**{**hw.__dict__, "inter_bw": preset.inter_bw,
                                "devices_per_node": processes if device.type == "cpu" else preset.devices_per_node})

    batch = request.get("batch") or data.batch_size_of(data.unpack(sample)[0])
    fixed: dict[str, Any] = {"precision": request.get("precision") or "fp32"}
    if request.get("evaluate"):
        named = {part.split("=", 1)[0].strip() for part in request["evaluate"].split(",") if part.strip()}
        fixed.update({k: v for k, v in Plan.parse(request["evaluate"]).to_dict().items() if k in named})
    budget = request.get("memory")  # else each process count's own share of this host's memory
    choices = [(p, max(1, cores() // p)) for p in range(1, devices + 1)] if device.type == "cpu" else [(devices, 0)]
    results, profiles = rank_processes(
        lambda _: profile_model(model, sample, device, loss_fn, optimizer, tp_upto=devices), hardware, choices, batch,
        budget=budget, fixed=fixed)
    work = next(iter(profiles.values()))
    where = f"up to {devices} processes on {cores()} cores" if device.type == "cpu" else f"{devices} processes"
    if request.get("chart"):
        chart(results, request["chart"], f"{work.name}: {where}, batch {batch}")
    if request.get("json"):
        print(dumps(results, int(request["top"])))
    else:
        print(f"{work.name} ({len(work.layers)} layers profiled on {device.type}, {work.params / 1e6:.2f}M parameters); "
              f"{where}, links {preset.name}, budget {_budget(budget, device)}; global batch {batch}")
        print(table(results, int(request["top"]), budget or hardware(devices).memory))
        best = next((r for r in results if r.feasible), None)
        if best is not None:
            threads = f"OMP_NUM_THREADS={best.threads} " if best.threads else ""
            print(f"run the best: {threads}meshwise run --nproc {best.plan.world_size} --plan {best.plan} "
                  f"{request.get('script') or 'SCRIPT'}")
    raise SystemExit(0)
