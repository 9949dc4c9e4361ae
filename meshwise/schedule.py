"""The pipeline schedules' order of actions, run as events: makespan, micro-batches in
flight and activation memory per device. Pure Python, used by ``meshwise.cost``."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4096)
def simulate(schedule: str, pp: int, m: int, v: int, fwd: tuple[float, ...], bwd: tuple[float, ...],
             p2p: float, acts: tuple[float, ...] | None = None) -> tuple[float, tuple[int, ...], tuple[float, ...]]:
    """Run the schedule's order of actions: (makespan, most micro-batches in flight per chunk,
    most activation bytes held per device, given ``acts[c]``, one micro-batch's on chunk c).

    ``fwd[c]``/``bwd[c]``: one micro-batch's time on stage chunk c (``pp * v`` chunks; device
    d holds chunks d, d + pp, ...). Each device runs its actions in the schedule's order; an
    action starts when its device is free and its input has arrived (``p2p`` after the
    neighbouring chunk finished). GPipe: every forward, then every backward. 1F1B: pp - d - 1
    warm-up forwards, then one forward, one backward. Interleaved (Megatron's order): warm-up
    of (pp - d - 1) * 2 + (v - 1) * pp chunk-forwards, micro-batches taken pp at a time per chunk.
    """
    chunks = pp * v
    orders = [_order(schedule, pp, m, v, d) for d in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * pp
    position = [0] * pp
    live = [0] * chunks
    most = [0] * chunks
    held = [0.0] * pp
    peak = [0.0] * pp
    weight = acts or (0.0,) * chunks
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for d in range(pp):
            while position[d] < len(orders[d]):
                kind, c, i = orders[d][position[d]]
                if kind == "F":
                    dep = done.get(("F", c - 1, i)) if c > 0 else 0.0
                    ready = None if dep is None else dep + (p2p if c > 0 else 0.0)
                    cost = fwd[c]
                else:
                    dep = done.get(("B", c + 1, i)) if c < chunks - 1 else done.get(("F", c, i))
                    ready = None if dep is None else dep + (p2p if c < chunks - 1 else 0.0)
                    cost = bwd[c]
                if ready is None:
                    break
                start = max(clock[d], ready)
                clock[d] = start + cost
                done[(kind, c, i)] = clock[d]
                live[c] += 1 if kind == "F" else -1
                most[c] = max(most[c], live[c])
                held[d] += weight[c] if kind == "F" else -weight[c]
                peak[d] = max(peak[d], held[d])
                position[d] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule} with pp={pp}, m={m}, v={v} deadlocks in simulation")
    return max(clock), tuple(most), tuple(peak)


def _order(schedule: str, pp: int, m: int, v: int, d: int) -> list[tuple[str, int, int]]:
    if schedule == "gpipe":
        chunks = [d + k * pp for k in range(v)]
        return ([("F", c, i) for c in chunks for i in range(m)]
                + [("B", c, i) for c in reversed(chunks) for i in range(m)])
    if schedule == "1f1b" or v == 1:
        warm = min(pp - d - 1, m)
        out = [("F", d, i) for i in range(warm)]
        for i in range(m - warm):
            out += [("F", d, warm + i), ("B", d, i)]
        out += [("B", d, i) for i in range(m - warm, m)]
        return out
    total = m * v

    def unit(k: int, backward: bool) -> tuple[int, int]:
        group, within = divmod(k, pp * v)
        chunk, mb = divmod(within, pp)
        if backward:
            chunk = v - 1 - chunk
        return d + chunk * pp, group * pp + mb

    warm = min((pp - d - 1) * 2 + (v - 1) * pp, total)
    out = [("F", *unit(k, False)) for k in range(warm)]
    f, b = warm, 0
    while f < total:
        out.append(("F", *unit(f, False)))
        out.append(("B", *unit(b, True)))
        f, b = f + 1, b + 1
    out += [("B", *unit(k, True)) for k in range(b, total)]
    return out
