"""The cost model: step time and memory per device of any Plan, from numbers alone.

Pure Python (no torch, no processes), so a laptop can plan a cluster of thousands of
GPUs. Three inputs:

* a **Workload**: per-layer forward FLOPs, parameters and saved-activation bytes per
  sample, plus the embedding/head (``Workload.transformer`` builds one from layers,
  hidden, heads, ffn, sequence and vocabulary);
* a **Hardware** preset (``HARDWARE``): peak FLOP/s per precision, memory, and links;
* a **Plan** and the global batch.

``estimate`` returns an ``Estimate``: step time split into compute, exposed
communication and pipeline bubble, throughput, achieved TFLOP/s, and memory per
device split into parameters, gradients, optimizer state and activations. The
pipeline's timing comes from **simulating the schedule's order of actions**
(``meshwise.schedule.simulate``), not from the bubble formula alone.

Conventions, stated once:

* FLOPs are model FLOPs: 2 per multiply-add, backward = 2 x forward, recomputation not
  counted. That is how published TFLOP/s figures (Megatron-LM's) count them.
* Mixed-precision Adam (``precision="bf16"``): 2 bytes of bf16 weights, 2 of bf16
  gradients and 12 of fp32 optimizer state (master weights and two moments) per
  parameter, so 16P in all. ZeRO shards it over dp replicas: zero=1 4P + 12P/dp,
  zero=2 2P + 14P/dp, zero=3 16P/dp. ``precision="fp32"``: 4 + 4 + 8 bytes.
* Activations saved for backward per layer and sample follow Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models"), for 2-byte
  activations and attention by a fused kernel that keeps no s x s scores (as
  ``scaled_dot_product_attention`` and FlashAttention do): s*h*(10 + 24/t) bytes with
  tensor parallelism t; with full recomputation only the layer's input, 2*s*h. fp32
  doubles them.
* Collectives are ring collectives: an all-reduce of B bytes over n ranks moves
  2(n-1)/n * B over the slowest link in the group, plus a latency per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from meshwise.plan import Plan, interleaved_rounds_ok
from meshwise.schedule import simulate

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One kind of device and the links between them."""

    name: str
    flops: dict[str, float]
    """Peak dense FLOP/s per precision ("bf16", "fp32")."""
    memory: float
    """Bytes of device memory."""
    intra_bw: float
    """Bytes/s per device, one direction, between devices of one node (NVLink)."""
    inter_bw: float
    """Bytes/s per device, one direction, between nodes (InfiniBand)."""
    devices_per_node: int
    latency: float = 10e-6
    """Seconds per collective step."""
    slots: int = 0
    """Devices that compute at once on one host (CPU cores for one-thread processes); more
    processes than slots share them and each computes slower. 0: one per device."""
    efficiency: float = 0.65
    """Fraction of peak FLOP/s that matrix products reach: 0.65 fits Megatron-LM's published
    H100 runs best (docs/planner.md); the other GPU presets assume the same."""
    reserved: float = 2 * GIB
    """Memory the framework and the allocator take beside the model (CUDA context, fragmentation)."""
    memory_bw: float = 2e12
    """Bytes/s of device memory, for the optimizer step."""
    fsdp_overhead: float = 0.2e-3
    """Seconds FSDP spends per sharded block and collective beyond the transfer (bookkeeping,
    copies): 3.5 ms on the 2-core CPU host (fitted with bench/planner.py at world 2); the GPU
    figure is an assumption, not a measurement."""
    call_overhead: float = 20e-6
    """Seconds of software overhead per collective call beyond the link's latency: 0.6 ms on the
    2-core CPU host (fitted with bench/planner.py at world 2, from ZeRO-1's per-tensor
    broadcasts); the GPU figure is an assumption."""
    contention: float = 1.0
    """How much slower processes compute when they outnumber the cores, beyond sharing them
    (switching, caches): 1.4 on the 2-core CPU host (fitted with bench/planner.py at world 4)."""
    split_overhead: float = 50e-6
    """Seconds per module split by tensor parallelism and micro-batch, forward and backward
    together, beyond its compute and collectives (DTensor's dispatch): 3 ms on the 2-core CPU
    host (fitted with bench/planner.py at world 2); the GPU figure is an assumption."""
    measured: tuple[tuple[str, float, float], ...] = ()
    """(collective, latency s per step, bandwidth bytes/s) fitted on the job's own links
    (``meshwise.profile.fit_links``): "all_reduce", "all_gather", "reduce_scatter",
    "send_recv". They replace ``latency`` and the bandwidths for those collectives."""
    overlap: bool = True
    """Whether gradient communication overlaps backward compute (GPUs: yes; CPU processes that
    share their cores with gloo's threads: no)."""


HARDWARE: dict[str, Hardware] = {
    # NVIDIA datasheets (dense, without sparsity); links: NVLink per direction, 1 HDR/NDR NIC per GPU
    "a100-40gb": Hardware("a100-40gb", {"bf16": 312e12, "fp32": 19.5e12}, 40 * GB, 300 * GB, 25 * GB, 8,
                          memory_bw=1.55e12),
    "a100-80gb": Hardware("a100-80gb", {"bf16": 312e12, "fp32": 19.5e12}, 80 * GB, 300 * GB, 25 * GB, 8,
                          memory_bw=2.0e12),
    "h100": Hardware("h100", {"bf16": 989e12, "fp32": 67e12}, 80 * GB, 450 * GB, 50 * GB, 8, memory_bw=3.35e12),
    "h200": Hardware("h200", {"bf16": 989e12, "fp32": 67e12}, 141 * GB, 450 * GB, 50 * GB, 8, memory_bw=4.8e12),
    # this kind of development machine: 2 CPU cores, one process per core, gloo over loopback
    "cpu": Hardware("cpu", {"bf16": 20e9, "fp32": 40e9}, 24 * GB, 1 * GB, 1 * GB, 2, latency=110e-6,
                    efficiency=0.5, reserved=0.5 * GIB, memory_bw=10e9, slots=2, fsdp_overhead=3.5e-3, call_overhead=0.6e-3,
                    split_overhead=3e-3, contention=1.4, overlap=False),
}


@dataclass(frozen=True)
class Layer:
    """One pipeline-cuttable layer's cost per sample."""

    name: str
    flops: float
    """Forward FLOPs per sample (all tp ranks together)."""
    params: float
    act_bytes: float
    """Bytes saved for backward per sample, 2-byte activations, no tensor parallelism."""
    act_bytes_tp: float = 0.0
    """The part of ``act_bytes`` that tensor parallelism divides by tp."""
    tp_comm_bytes: float = 0.0
    """Bytes per sample all-reduced across tp ranks in forward (as many again in backward)."""
    recompute_bytes: float = 0.0
    """Bytes per sample kept with recomputation (the layer's input)."""
    seconds: float = 0.0
    """Measured forward + backward seconds per sample (a profile); used instead of ``flops``."""
    fixed_seconds: float = 0.0
    """Measured forward + backward seconds per micro-batch, whatever its size (a profile)."""
    points: tuple[tuple[int, float], ...] = ()
    """Measured (rows, forward + backward seconds) of a profile, ascending: ``time`` follows
    them, straight between points and along the end segments beyond them."""
    forward_share: float = 1 / 3
    """The forward's part of the measured seconds (a profile; by FLOPs, a third)."""
    tp_share: float = 1.0
    """The part of the measured per-sample seconds that tensor parallelism divides by tp (a
    profile: the FLOPs of the modules it splits, over the layer's)."""
    whole_params: float = 0.0
    """Parameters tensor parallelism leaves whole on every rank (norms, unsplit layers)."""
    tp_calls: int = 0
    """Tensor-parallel collectives per forward (as many in backward), each costing the
    hardware's ``call_overhead`` beyond its bytes (a profile; 0: not counted)."""
    tp_modules: int = 0
    """Modules tensor parallelism splits, each costing the hardware's ``split_overhead``
    (a profile; 0: not counted)."""

    def time(self, rows: float, tp: int = 1) -> float:
        """Measured forward + backward seconds of a micro-batch of ``rows`` on each of ``tp``
        ranks: the part beyond the fixed seconds that ``tp_share`` covers divides by tp."""
        if len(self.points) >= 2:
            pts = self.points
            i = next((k for k in range(1, len(pts) - 1) if rows <= pts[k][0]), len(pts) - 1)
            (r0, t0), (r1, t1) = pts[i - 1], pts[i]
            slope = (t1 - t0) / (r1 - r0) if r1 != r0 else 0.0
            if rows > r1:  # beyond the largest measured size time does not fall, whatever the noise
                slope = max(0.0, slope)
            total = max(0.0, t0 + slope * (rows - r0))
        else:
            total = self.fixed_seconds + self.seconds * rows
        varying = max(0.0, total - self.fixed_seconds)
        return total - varying * self.tp_share * (1 - 1 / tp)


@dataclass(frozen=True)
class Workload:
    """What one sample costs, layer by layer, and the boundaries a pipeline may cut at."""

    name: str
    layers: tuple[Layer, ...]
    output_bytes: float
    """Bytes per sample a pipeline stage sends to the next (2-byte activations)."""
    heads: int = 0
    """Attention heads: tensor parallelism must divide them (0: no constraint)."""
    tokens: int = 1
    """Tokens per sample."""
    extra_first: tuple[Layer, ...] = ()
    """Layers that stay on the first stage (embeddings)."""
    extra_last: tuple[Layer, ...] = ()
    """Layers that stay on the last stage (final norm, output head and loss)."""
    value_bytes: int = 2
    """Bytes per activation value the byte counts above assume (a profile: what it measured)."""
    tensors: int = 0
    """Parameter tensors (ZeRO-1 broadcasts each one from the rank that updated it)."""
    optimizer_seconds: float = 0.0
    """Measured seconds of one optimizer step over all parameters (a profile); 0: from memory bandwidth."""
    optimizer: str = "adam"
    """The optimizer whose state ``BYTES`` counts: "adam" or "sgd" (with momentum)."""
    state_bytes: float | None = None
    """Measured optimizer-state bytes per parameter (a profile; 0 for plain SGD); None: from ``BYTES``."""

    def sizes(self, precision: str) -> tuple[float, float, float]:
        """(parameter, gradient, optimizer-state) bytes per parameter in ``precision``."""
        p, g, o = BYTES[precision, self.optimizer]
        return (p, g, o) if self.state_bytes is None else (p, g, self.state_bytes)
    tp_degrees: tuple[int, ...] | None = None
    """The tensor-parallel degrees that split the model (a profile: the degrees that split all
    that tp=2 splits); None: any degree that divides the heads."""

    @property
    def params(self) -> float:
        return sum(x.params for x in (*self.extra_first, *self.layers, *self.extra_last))

    @property
    def flops(self) -> float:
        """Model FLOPs per sample, forward and backward (3x forward)."""
        return 3 * sum(x.flops for x in (*self.extra_first, *self.layers, *self.extra_last))

    @classmethod
    def transformer(cls, *, layers: int, hidden: int, heads: int, seq: int, vocab: int, ffn: int | None = None,
                    tied: bool = True) -> Workload:
        """A GPT-style decoder: per layer attention (4 h x h projections) and an MLP (h -> ffn -> h)."""
        h, s, a, f = hidden, seq, heads, ffn or 4 * hidden
        mlp_extra = 4 * s * (f - 4 * h)  # Korthikanti's 19sh for the MLP assumes ffn = 4h
        block = Layer(
            name="block",
            flops=2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h,
            params=4 * h * h + 2 * h * f + 4 * h + f + 5 * h,
            act_bytes=34 * s * h + mlp_extra,
            act_bytes_tp=24 * s * h + mlp_extra,
            tp_comm_bytes=2 * (2 * s * h),
            recompute_bytes=2 * s * h,
        )
        embed = Layer("embedding", flops=0.0, params=vocab * h, act_bytes=0.0)
        head = Layer("head", flops=2 * s * h * vocab, params=0.0 if tied else vocab * h,
                     act_bytes=4 * s * vocab, act_bytes_tp=4 * s * vocab, tp_comm_bytes=0.0)
        return cls(name=f"transformer l={layers} h={h} a={a} s={s} V={vocab}", layers=(block,) * layers,
                   output_bytes=2 * s * h, heads=heads, tokens=s, extra_first=(embed,), extra_last=(head,))


@dataclass(frozen=True)
class Memory:
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    reserved: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.reserved


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    feasible: bool
    reason: str
    step_time: float = math.inf
    compute: float = 0.0
    communication: float = 0.0
    bubble: float = 0.0
    optimizer: float = 0.0
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    tflops_per_device: float = 0.0
    memory: Memory | None = None
    notes: tuple[str, ...] = field(default=())
    threads: int = 0
    """Compute threads per process the estimate assumes (CPU hosts); 0: one device per process."""


BYTES = {("bf16", "adam"): (2, 2, 12), ("fp32", "adam"): (4, 4, 8), ("bf16", "sgd"): (2, 2, 8), ("fp32", "sgd"): (4, 4, 4)}
"""(parameter, gradient, optimizer-state) bytes per parameter, by precision and optimizer: Adam
keeps two moments, SGD one momentum buffer; mixed precision adds fp32 master weights."""


def model_state_bytes(params: float, zero: int, dp: int, precision: str = "bf16",
                      optimizer: str = "adam", sizes: tuple[float, float, float] | None = None
                      ) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer) bytes per device for ``params`` parameters under ZeRO
    (``sizes``: bytes per parameter, instead of ``BYTES``' for the precision and optimizer)."""
    p, g, o = (params * b for b in (sizes or BYTES[precision, optimizer]))
    if zero >= 1:
        o /= dp
    if zero >= 2:
        g /= dp
    if zero >= 3:
        p /= dp
    return p, g, o


def allreduce_time(nbytes: float, n: int, bw: float, latency: float) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * latency


def gather_time(nbytes: float, n: int, bw: float, latency: float) -> float:
    """An all-gather (or reduce-scatter) whose whole result is ``nbytes``."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) / n * nbytes / bw + (n - 1) * latency


def _stage_layers(work: Workload, stages: int, rows: int) -> list[int]:
    """Layers per stage. Layers of a profile are cut as the pipeline engine cuts them, by
    measured time (``balance``); layers by FLOPs, as even in count as can be (the earlier
    stages take the remainder)."""
    if any(x.seconds or x.fixed_seconds or x.points for x in work.layers):
        return list(_balanced(tuple(x.time(rows) for x in work.layers), stages))
    base, extra = divmod(len(work.layers), stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


@lru_cache(maxsize=1024)
def _balanced(costs: tuple[float, ...], stages: int) -> tuple[int, ...]:
    return tuple(j - i for i, j in balance(costs, stages))


def balance(costs: Sequence[float], stages: int, *, memory: Sequence[int] | None = None,
            limit: int | None = None, allowed: set[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous split of ``costs`` into ``stages`` non-empty parts minimising the largest sum.

    With ``memory`` and ``limit``, every part's memory sum must stay <= limit; with
    ``allowed``, a part may only begin at an index in it (0 always may). Exact:
    best[k][i] = min over j < i of max(best[k-1][j], cost(j, i)), the cheapest way to
    put the first i layers into k stages.
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} layers into {stages} non-empty stages; use 1..{n} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    mem_prefix = [0]
    for m in memory or [0] * n:
        mem_prefix.append(mem_prefix[-1] + m)

    def fits(j: int, i: int) -> bool:
        return limit is None or mem_prefix[i] - mem_prefix[j] <= limit

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf or not fits(j, i) or (allowed is not None and j and j not in allowed):
                    continue
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    if best[stages][n] == inf and limit is None:
        raise ValueError(f"cannot cut {n} layers into {stages} stages at the allowed points "
                         f"{sorted(allowed or ())}; use fewer stages")
    if best[stages][n] == inf:
        worst = max(range(n), key=lambda i: mem_prefix[i + 1] - mem_prefix[i])
        raise ValueError(
            f"no split into {stages} stages keeps every stage within {limit:,} bytes (layer {worst} alone "
            f"needs {mem_prefix[worst + 1] - mem_prefix[worst]:,}); raise the limit or use more stages"
        )
    bounds, i = [], n
    for k in range(stages, 0, -1):
        bounds.append((cut[k][i], i))
        i = cut[k][i]
    return bounds[::-1]




def estimate(work: Workload, plan: Plan, hw: Hardware, batch: int, *, budget: float | None = None,
             megatron: bool = False) -> Estimate:
    """Predicted step time and memory per device of ``plan`` for global batches of ``batch`` samples.

    ``megatron``: model a run as Megatron-LM does it, to compare with its published
    figures: sequence parallelism (all of a layer's activations divide by tp) and, for
    zero=1, its distributed optimizer (reduce-scatter and all-gather, overlapped).
    meshwise's own zero=1 is DDP's all-reduce, then ``ZeroRedundancyOptimizer``'s
    parameter broadcasts after the step, which nothing overlaps."""
    plan = plan.resolved()
    dp, pp, tp, m = plan.dp, plan.pp, plan.tp, plan.microbatches or 1
    budget = hw.memory if budget is None else budget
    reason = _infeasible(work, plan, batch)
    if reason:
        return Estimate(plan, False, reason)
    v = 2 if plan.schedule == "interleaved" and pp > 1 else 1
    b = batch // (dp * m)  # samples per micro-batch
    sizes = work.sizes(plan.precision)
    scale = (4 if plan.precision == "fp32" else 2) / work.value_bytes  # activation bytes in the plan's precision
    peak = hw.flops[plan.precision] * hw.efficiency
    shared = max(1.0, min(plan.world_size, hw.devices_per_node) / hw.slots) if hw.slots else 1.0
    counts = _stage_layers(work, pp * v, b)
    chunks: list[list[Layer]] = []
    start = 0
    for c in counts:
        chunks.append(list(work.layers[start:start + c]))
        start += c
    chunks[0] = [*work.extra_first, *chunks[0]]
    chunks[-1] = [*chunks[-1], *work.extra_last]
    fitted = {name: (bw, lat) for name, lat, bw in hw.measured}

    def link(name: str, bw: float) -> tuple[float, float]:
        """(bandwidth, latency) of collective ``name`` on a link of bandwidth ``bw``."""
        return fitted.get(name, (bw, hw.latency))

    tp_bw = hw.intra_bw if tp <= hw.devices_per_node else hw.inter_bw
    pp_bw = hw.intra_bw if tp * pp <= hw.devices_per_node else hw.inter_bw
    dp_bw = hw.intra_bw if dp * pp * tp <= hw.devices_per_node else hw.inter_bw

    fwd, bwd, acts, params = [], [], [], []
    cpu = 0.0  # one micro-batch's work through this device's chunks that keeps a processor busy
    for chunk in chunks:
        flops = sum(x.flops for x in chunk) * b / tp
        comm = sum(allreduce_time(x.tp_comm_bytes * b * scale, tp, *link("all_reduce", tp_bw)) for x in chunk)
        software = 0.0
        if tp > 1:  # per collective call and split module, beyond the bytes (a profile's layers)
            software = (sum(x.tp_calls for x in chunk) * hw.call_overhead
                        + sum(x.tp_modules for x in chunk) * hw.split_overhead / 2)
        # element-wise work (norms, activations, residuals) is bound by memory: its bytes once
        # written and read in forward, twice in backward
        stream = sum(x.act_bytes for x in chunk if x.flops) * b * scale / tp / hw.memory_bw
        # forward a third of the FLOPs' time; a profile's measured time split as measured
        busy = flops / peak + stream
        forward = busy + sum(x.time(b, tp) * x.forward_share for x in chunk)
        backward = 2 * busy + sum(x.time(b, tp) * (1 - x.forward_share) for x in chunk)
        action = hw.call_overhead if pp > 1 else 0.0  # a pipeline schedule's work per action and send
        fwd.append(forward + comm + software + action)
        bwd.append(backward + comm + software + action + (forward + comm + software if plan.checkpointing else 0.0))
        cpu += (1 + plan.checkpointing) * forward + backward + (2 + plan.checkpointing) * software + 2 * action
        per_sample = sum((x.recompute_bytes if plan.checkpointing and x.recompute_bytes else
                          x.act_bytes / tp if megatron else x.act_bytes - x.act_bytes_tp + x.act_bytes_tp / tp)
                         for x in chunk)
        acts.append(per_sample * b * scale)
        params.append(sum((x.params - x.whole_params) / tp + x.whole_params for x in chunk))
    p2p_bw, p2p_latency = link("send_recv", pp_bw)
    p2p = work.output_bytes * b * scale / tp / p2p_bw + p2p_latency if pp > 1 else 0.0
    # one stage: gradient accumulation runs each micro-batch's forward and backward in turn
    makespan, _, peaks = simulate(plan.schedule if pp > 1 else "1f1b", pp, m, v, tuple(fwd), tuple(bwd), p2p,
                                  tuple(acts))
    compute_time = sum(fwd[s] + bwd[s] for s in range(len(chunks))) * m / pp

    # data parallelism: gradients reduced once a step, overlapping the last micro-batch's backward
    per_device = [sum(params[d + k * pp] for k in range(v)) for d in range(pp)]
    worst = max(range(pp), key=lambda d: per_device[d])
    grad_bytes = per_device[worst] * sizes[1]
    if plan.zero >= 3 and pp == 1:  # parameters gathered per micro-batch in forward and backward
        gathers = 2 * m * gather_time(per_device[worst] * sizes[0], dp, *link("all_gather", dp_bw))
        dp_comm = gather_time(grad_bytes, dp, *link("reduce_scatter", dp_bw)) + gathers
        overlap = compute_time / 2
    elif plan.zero >= 2 or (plan.zero == 1 and megatron):  # reduce-scatter the gradients, all-gather the
        # updated parameters (zero=2; zero=3 in a pipeline, whose stages gather once a step)
        dp_comm = gather_time(grad_bytes, dp, *link("reduce_scatter", dp_bw)) + gather_time(
            per_device[worst] * sizes[0], dp, *link("all_gather", dp_bw))
        overlap = sum(bwd[worst + k * pp] for k in range(v))
    else:  # DDP's all-reduce, one call per 25 MB bucket
        dp_comm = allreduce_time(grad_bytes, dp, *link("all_reduce", dp_bw)) + hw.call_overhead * math.ceil(
            grad_bytes / 25e6)
        overlap = sum(bwd[worst + k * pp] for k in range(v))
    exposed = max(0.0, dp_comm - (overlap if hw.overlap else 0.0)) if dp > 1 else 0.0
    overheads = 0.0  # software time of the collectives below, which keeps a processor busy
    if plan.zero == 1 and not megatron and dp > 1:  # ZeroRedundancyOptimizer: each updated parameter broadcast
        # from its owner after the step, tensor by tensor, overlapping nothing
        exposed += gather_time(per_device[worst] * sizes[0], dp, *link("all_gather", dp_bw))
        exposed += work.tensors / pp * hw.latency
        overheads = work.tensors / pp * hw.call_overhead
        exposed += overheads
    if plan.zero >= 2 and dp > 1:  # FSDP's per-block collectives: one unit per layer of this device, and the root
        units = sum(counts[worst + k * pp] for k in range(v)) + 1
        # every micro-batch passes FSDP's hooks again (outside a pipeline it gathers again, and zero=3
        # again in backward); each unit reduce-scatters once a step
        calls = m + 1 if pp > 1 or plan.zero == 2 else 2 * m + 1
        exposed += units * calls * hw.fsdp_overhead  # mostly waiting on the slowest rank: not in ``overheads``
    # this device's part of the optimizer's work: its parameters, and 1/dp of them under ZeRO
    share = (dp if plan.zero else 1) * (work.params / per_device[worst] if per_device[worst] else 1.0)
    optimizer = (work.optimizer_seconds / share if work.optimizer_seconds else
                 per_device[worst] * (sum(sizes) * 2) / (hw.memory_bw * (dp if plan.zero else 1)))
    step = makespan + exposed + optimizer
    if shared > 1:  # processes that share cores: each runs at full speed while another waits, but together
        # they cannot take less than the cores give them; and they run slower for switching between them
        busy_step = (cpu * m / pp + overheads + optimizer) * shared
        factor = max(step, busy_step) * hw.contention / step
        step, makespan, compute_time, exposed, optimizer = (x * factor for x in (step, makespan, compute_time,
                                                                                exposed, optimizer))

    p, g, o = model_state_bytes(per_device[worst], plan.zero, dp, sizes=sizes)
    if pp > 1 and plan.zero >= 2:  # a pipeline stage holds its parameters and gradients whole during a step
        p, g = (per_device[worst] * x for x in sizes[:2])
    act = max(peaks)
    mem = Memory(parameters=p, gradients=g, optimizer=o, activations=act, reserved=hw.reserved)
    samples = batch / step
    tflops = work.flops * batch / step / plan.world_size / 1e12
    if mem.total > budget:
        return Estimate(plan, False, f"needs {mem.total / GB:.1f} GB per device, budget {budget / GB:.1f} GB",
                        step, compute_time, exposed, makespan - compute_time, optimizer, samples, samples * work.tokens,
                        tflops, mem)
    return Estimate(plan, True, "", step, compute_time, exposed, makespan - compute_time, optimizer, samples,
                    samples * work.tokens, tflops, mem)


def _infeasible(work: Workload, plan: Plan, batch: int) -> str:
    dp, pp, tp, m = plan.dp, plan.pp, plan.tp, plan.microbatches or 1
    v = 2 if plan.schedule == "interleaved" and pp > 1 else 1
    if batch < 1:
        return f"global batch {batch}: it must be >= 1"
    if work.heads and work.heads % tp:
        return f"tp={tp} does not divide {work.heads} heads"
    if tp > 1 and work.tp_degrees is not None and tp not in work.tp_degrees:
        return (f"tp={tp} splits nothing of {work.name} (no attention, MLP pair or vocabulary to split)"
                if not work.tp_degrees else f"tp={tp} would leave some of what tp={work.tp_degrees[0]} splits whole "
                f"(widths or heads it does not divide): tp in {{{', '.join(map(str, work.tp_degrees))}}}")
    if pp * v > len(work.layers):
        return f"{pp * v} pipeline stages for {len(work.layers)} layers"
    if batch % (dp * m):
        return f"global batch {batch} is not divisible by dp x microbatches = {dp} x {m}"
    if plan.zero and dp == 1:
        return f"zero={plan.zero} needs dp > 1 (it shards over data-parallel replicas)"
    if pp > 1 and plan.schedule == "1f1b" and m < pp:
        return f"schedule=1f1b needs microbatches >= pp ({m} < {pp})"
    if pp > 1 and plan.schedule == "interleaved" and (m % pp or not interleaved_rounds_ok(m, pp)):
        return (f"schedule=interleaved is simulated in Megatron's order, which takes micro-batches pp at a time: "
                f"microbatches={m} is not a multiple of pp={pp}")
    return ""
