"""Learning-rate schedulers in an engine and through its checkpoints.

``parallelize(..., scheduler=lambda opt: OneCycleLR(opt, 3e-4, total_steps=N))`` builds
the scheduler on the engine's optimizer (``build``); the engine steps it after every
update, before that step's checkpoint. A scheduler the script steps itself (per epoch,
``ReduceLROnPlateau``) is assigned to ``engine.scheduler``.

A checkpoint keeps the scheduler's class and ``state_dict()`` in ``meta.json`` as JSON
(``state``): nothing is pickled. JSON alone would turn ``MultiStepLR``'s milestones, a
``Counter`` keyed by integers, into string keys that never match a step again, so
non-string keys, counters and tuples are written tagged and read back as they were
(``plain`` / ``unplain``); anything else (a tensor, a function) is refused when the
scheduler is built, not hours later at the first save. Loading (``restore``) maps the
lists that hold one value per parameter group onto this rank's groups: a pipeline's
stages can hold different numbers of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

PER_GROUP = ("base_lrs", "_last_lr", "max_lrs", "min_lrs", "lr_lambdas")
"""State entries with one value per parameter group (torch.optim.lr_scheduler)."""


def build(make: Callable[[Any], Any], optimizer: Any) -> Any:
    """The scheduler ``make(optimizer)``, checked: it steps without a metric and its state can be saved."""
    if optimizer is None:
        raise ValueError("scheduler= needs an optimizer: pass optimizer= too")
    if not callable(make):
        raise TypeError(f"scheduler must be a function of the optimizer (lambda opt: "
                        f"torch.optim.lr_scheduler.StepLR(opt, 100)), got {type(make).__name__}")
    made = make(optimizer)
    if isinstance(made, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError("scheduler=ReduceLROnPlateau cannot be stepped after every update: it needs a metric. "
                         "Make it yourself, engine.scheduler = ReduceLROnPlateau(engine.optimizer), and call "
                         "engine.scheduler.step(metric); checkpoints still keep its state")
    if not (hasattr(made, "step") and hasattr(made, "state_dict") and hasattr(made, "load_state_dict")):
        raise TypeError(f"scheduler= must return a learning-rate scheduler (step, state_dict, load_state_dict), "
                        f"got {type(made).__name__}")
    state(made)  # refused now if it could not be saved
    return made


def state(scheduler: Any) -> dict[str, Any] | None:
    """What a checkpoint keeps of ``scheduler``: its class, its groups and its state, as JSON values."""
    if scheduler is None:
        return None
    try:
        saved = plain(scheduler.state_dict())
    except TypeError as error:
        raise ValueError(f"the state of scheduler {type(scheduler).__name__} cannot be saved ({error}): "
                         f"checkpoints hold numbers, strings and containers of them, never pickles; use a "
                         f"scheduler from torch.optim.lr_scheduler, whose state is plain numbers") from None
    return {"class": type(scheduler).__name__, "groups": len(scheduler.optimizer.param_groups), "state": saved}


def problem(scheduler: Any, saved: dict[str, Any] | None, path: str) -> str | None:
    """Why ``saved`` cannot be loaded into ``scheduler``, or None."""
    if scheduler is not None and saved is not None and saved.get("class") != type(scheduler).__name__:
        return (f"checkpoint {path} was saved with scheduler {saved.get('class')}, this engine has "
                f"{type(scheduler).__name__}: make the same scheduler to resume its schedule")
    return None


def restore(scheduler: Any, saved: dict[str, Any]) -> Callable[[], None]:
    """Load ``saved`` into ``scheduler``; return a function that puts back its state before."""
    before = scheduler.state_dict()
    groups = len(scheduler.optimizer.param_groups)
    scheduler.load_state_dict(_regroup(unplain(saved["state"]), saved.get("groups"), groups))
    return lambda: scheduler.load_state_dict(before)


def _regroup(state: dict[str, Any], saved: int | None, groups: int) -> dict[str, Any]:
    """Per-group lists from ``saved`` groups onto ``groups`` (the first group's value for all),
    inside chained schedulers too."""
    out = dict(state)
    for key in PER_GROUP:
        value = out.get(key)
        if isinstance(value, list) and value and saved is not None and len(value) == saved != groups:
            out[key] = [value[0]] * groups
    if isinstance(out.get("_schedulers"), list):
        out["_schedulers"] = [_regroup(s, saved, groups) if isinstance(s, dict) else s for s in out["_schedulers"]]
    return out


def plain(value: Any) -> Any:
    """``value`` as JSON values; non-string keys, counters and tuples tagged so ``unplain`` restores them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Counter):
        return {"__counter__": [[plain(k), plain(v)] for k, v in value.items()]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: plain(v) for k, v in value.items()}
        return {"__items__": [[plain(k), plain(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [plain(v) for v in value]}
    if isinstance(value, list):
        return [plain(v) for v in value]
    raise TypeError(f"a {type(value).__name__} is not a number, a string or a container of them")


def unplain(value: Any) -> Any:
    """The inverse of ``plain``."""
    if isinstance(value, list):
        return [unplain(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__counter__" in value:
        return Counter({unplain(k): unplain(v) for k, v in value["__counter__"]})
    if "__items__" in value:
        return {unplain(k): unplain(v) for k, v in value["__items__"]}
    if "__tuple__" in value:
        return tuple(unplain(v) for v in value["__tuple__"])
    return {k: unplain(v) for k, v in value.items()}
