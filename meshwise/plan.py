"""The Plan: the one object that says how work is split across devices.

A Plan is written by the user (``--plan dp=2,microbatches=4``), later produced by the
planner, consumed by the runtime, and recorded in run directories. It validates itself,
prints as the same ``k=v,k=v`` string it parses from, and round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any

SCHEDULES = ("gpipe", "1f1b", "interleaved")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Plan:
    """How one training or inference job is split. World size = dp * pp * tp."""

    dp: int = 1
    """Data-parallel replicas: each takes a slice of every global batch."""
    pp: int = 1
    """Pipeline stages: consecutive layers on different devices."""
    tp: int = 1
    """Tensor-parallel degree: one layer's matrices split across devices."""
    zero: int = 0
    """ZeRO stage across the dp axis: 0 none, 1 optimizer state, 2 +gradients, 3 +parameters."""
    microbatches: int | None = None
    """Micro-batches per rank per step (gradient accumulation; pipeline micro-batches).
    None (the default) means 1 without a pipeline and 2 * pp with one (see ``resolved``)."""
    schedule: str = "1f1b"
    """Pipeline schedule: one of gpipe, 1f1b, interleaved. Ignored when pp == 1."""
    checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them."""
    precision: str = "fp32"
    """Compute precision: fp32, or bf16 autocast with fp32 master weights."""

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "tp", "microbatches"):
            value = getattr(self, name)
            if name == "microbatches" and value is None:
                continue
            if type(value) is not int or value < 1:
                raise ValueError(f"plan field {name}={value!r} is invalid: it must be an integer >= 1")
        if type(self.zero) is not int or self.zero not in (0, 1, 2, 3):
            raise ValueError(f"plan field zero={self.zero!r} is invalid: it must be 0, 1, 2 or 3")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"plan field schedule={self.schedule!r} is invalid: it must be one of "
                f"{', '.join(SCHEDULES)}{_did_you_mean(str(self.schedule), SCHEDULES)}"
            )
        if type(self.checkpointing) is not bool:
            raise ValueError(
                f"plan field checkpointing={self.checkpointing!r} is invalid: it must be true or false"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"plan field precision={self.precision!r} is invalid: it must be one of "
                f"{', '.join(PRECISIONS)}{_did_you_mean(str(self.precision), PRECISIONS)}"
            )

    def resolved(self) -> Plan:
        """This plan with defaults made concrete: microbatches = 1, or 2 * pp for a pipeline
        (so 1F1B can run and the bubble, (pp-1)/(m+pp-1), stays near a third)."""
        if self.microbatches is not None:
            return self
        return dataclasses.replace(self, microbatches=2 * self.pp if self.pp > 1 else 1)

    @property
    def world_size(self) -> int:
        """Processes (devices) the plan needs: dp * pp * tp."""
        return self.dp * self.pp * self.tp

    @classmethod
    def parse(cls, spec: str) -> Plan:
        """Parse ``"dp=2,pp=2,microbatches=4"``; fields not named keep their defaults."""
        if not isinstance(spec, str):
            raise TypeError(f"Plan.parse expects a string like 'dp=2,microbatches=4', got {type(spec).__name__}")
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            key, eq, raw = (s.strip() for s in item.partition("="))
            if not eq or not raw:
                raise ValueError(f"plan item {item!r} in {spec!r} is not key=value; write e.g. 'dp=2,microbatches=4'")
            if key not in kinds:
                raise ValueError(
                    f"plan field {key!r} in {spec!r} is unknown; fields are "
                    f"{', '.join(kinds)}{_did_you_mean(key, kinds)}"
                )
            if key in values:
                raise ValueError(f"plan field {key!r} is given twice in {spec!r}")
            values[key] = _convert(key, raw, kinds[key])
        return cls(**values)

    def __str__(self) -> str:
        """Every field that differs from its default, as ``k=v,k=v`` (``dp=1`` if none)."""
        items = [
            f"{f.name}={_format(getattr(self, f.name))}"
            for f in fields(self)
            if getattr(self, f.name) != f.default
        ]
        return ",".join(items) or "dp=1"

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The inverse of ``to_dict``; unknown keys are an error, missing keys take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"plan dict has unknown fields {unknown}; fields are {', '.join(sorted(known))}")
        return cls(**data)


def _convert(key: str, raw: str, kind: Any) -> Any:
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind in ("int", "int | None"):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"plan field {key}={raw!r} is invalid: it must be an integer") from None
    if kind == "bool":
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"plan field {key}={raw!r} is invalid: it must be true or false")
    return raw


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_plan(plan: Plan | str | None, world_size: int) -> Plan:
    """The plan a job of ``world_size`` processes runs: given, parsed, or dp = world size."""
    if plan is None:
        return Plan(dp=world_size)
    if isinstance(plan, str):
        plan = Plan.parse(plan)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a meshwise.Plan, a string like 'dp=2' or None, got {type(plan).__name__}")
    if plan.world_size != world_size:
        raise ValueError(
            f"plan {plan} needs {plan.world_size} processes (dp*pp*tp) but the job has {world_size}; "
            f"run with --nproc {plan.world_size} or change the plan's degrees to multiply to {world_size}"
        )
    return plan



def interleaved_rounds_ok(microbatches: int, pp: int) -> bool:
    """torch's interleaved 1F1B runs micro-batches in rounds of pp: m must be a multiple of max(1, m // pp)."""
    rounds = max(1, microbatches // pp)
    return microbatches % rounds == 0
