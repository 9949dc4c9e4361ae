"""Checkpoints: save under one plan, load under any other, nothing half-written.

A checkpoint is a directory ``step-00000100/`` under the checkpoint root:

* ``rank-R.safetensors``: the tensors rank R wrote. Every tensor is written whole, once,
  by one rank, under the model's own names: ``model/<name>`` for parameters and
  buffers, ``optim/<name>/<key>`` for optimizer state (``exp_avg``...), and
  ``rng/<rank>`` for each rank's random-number generator. Split and sharded tensors are
  gathered whole before they are written; ranks write their files in parallel.
* ``meta.json``: the format, step, plan, world size, data position, optimizer class and
  hyperparameters, and for every tensor its file, shape and dtype.
* ``COMPLETE``: written last. A directory without it is not a checkpoint.

Loading reads only what this rank needs (safetensors reads tensors by name, and
nothing is unpickled) and cuts each tensor to this rank's share, so a checkpoint saved
with dp=2,pp=2 loads with dp=4, with tp=2, with zero=3 or in one process.

Saving is atomic: the files are written to ``.partial-step-00000100`` and fsynced,
then the directory is renamed into place and the directory entries fsynced. A worker
killed mid-save leaves the previous checkpoints as they were; the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from meshwise import dist as mwdist
from meshwise import lr_schedule

FORMAT = 1
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_HYPER = (bool, int, float, str)


def save(engine: Any, root: str, *, keep: int = 3) -> str:
    """Write a checkpoint of ``engine`` under ``root`` (a collective); return its directory."""
    if type(keep) is not int or keep < 1:
        raise ValueError(f"keep={keep!r} is invalid: keep at least the last checkpoint (keep >= 1)")
    schedule = lr_schedule.state(engine.scheduler)  # checked before anything is written
    name = f"step-{engine.steps:08d}"
    partial = os.path.join(root, f".partial-{name}")
    final = os.path.join(root, name)
    if engine.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        os.makedirs(partial)
        newer = [d for d in complete(root) if int(os.path.basename(d)[5:]) > engine.steps]
        if newer:
            warnings.warn(f"{root} holds {os.path.basename(newer[-1])}, newer than this save (step {engine.steps}): "
                          f"a resume would take that one; give each run its own checkpoint directory", stacklevel=3)
    dist.barrier()
    tensors = _gather(engine)
    covered: list[Any] = [None] * engine.world_size
    dist.all_gather_object(covered, [k for k in tensors if k.startswith("model/")])
    if engine.is_main and hasattr(engine, "_state_names"):  # a pipeline: state no stage holds (a buffer
        # forward never touches) is the model's own, unchanged by training
        held = {k for part in covered for k in part}
        for name, value in engine._model.state_dict().items():
            if f"model/{name}" not in held:
                tensors[f"model/{name}"] = _whole(value).detach().cpu().clone()
    tensors[f"rng/{engine.rank}"] = torch.get_rng_state()
    if engine.device.type == "cuda":
        tensors[f"rng-cuda/{engine.rank}"] = torch.cuda.get_rng_state(engine.device)
    from safetensors.torch import save_file

    file = f"rank-{engine.rank}.safetensors"
    path = os.path.join(partial, file)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    _fsync(path)
    index = {k: {"file": file, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
             for k, v in tensors.items()}
    indexes: list[Any] = [None] * engine.world_size if engine.is_main else []
    dist.gather_object(index, indexes if engine.is_main else None, dst=0)
    if engine.is_main:
        merged: dict[str, Any] = {}
        for part in indexes:
            for key, entry in part.items():
                merged.setdefault(key, entry)  # a key two ranks hold (never, by construction) keeps the first
        meta = {"format": FORMAT, "step": engine.steps, "plan": str(engine.plan), "world_size": engine.world_size,
                "position": list(engine.position) if engine.position else None, "saved_at": time.time(),
                "optimizer": _hyperparameters(engine.optimizer), "scheduler": schedule, "tensors": merged}
        _write(os.path.join(partial, "meta.json"), json.dumps(meta, indent=1))
        _write(os.path.join(partial, COMPLETE), "")
        _fsync(partial)
        replaced = os.path.join(root, f".old-{name}")
        if os.path.exists(final):  # the same step saved again: moved aside, deleted once the new one is in
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(partial, final)
        _fsync(root)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in [d for d in complete(root) if d != final][:max(0, len(complete(root)) - keep)]:
            aside = os.path.join(root, f".old-{os.path.basename(old)}")  # no longer a checkpoint, then gone
            os.rename(old, aside)
            shutil.rmtree(aside, ignore_errors=True)
    dist.barrier()
    return final


def complete(root: str) -> list[str]:
    """The complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [os.path.join(root, d) for d in sorted(os.listdir(root))
             if _STEP_DIR.match(d) and os.path.isfile(os.path.join(root, d, COMPLETE))]
    return found


def latest(root: str) -> str | None:
    """The newest complete checkpoint under ``root`` (or ``root`` itself if it is one)."""
    if os.path.isfile(os.path.join(root, COMPLETE)):
        return root
    found = complete(root)
    return found[-1] if found else None


def agreed_latest(root: str) -> str | None:
    """``latest(root)`` as rank 0 sees it, on every rank (a collective in a job): ranks whose
    view of a shared filesystem lags must not load another checkpoint."""
    found = [latest(root)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0]


def read_meta(path: str) -> dict[str, Any]:
    """A checkpoint's ``meta.json``, checked: a clear error for anything that is not one."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise ValueError(f"{path} is not a complete meshwise checkpoint (no {COMPLETE} marker): it was not "
                         f"written to the end; use an earlier one, or the checkpoint root to take the latest")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{meta_path} cannot be read as a checkpoint's metadata: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("tensors"), dict):
        raise ValueError(f"{meta_path} is not meshwise checkpoint format {FORMAT}")
    return meta


def load(engine: Any, path: str) -> dict[str, Any]:
    """Load a checkpoint into ``engine`` (a collective), whatever plan saved it.

    Every tensor this rank needs is read and checked (present, same shape, readable)
    before anything is changed; a problem on any rank stops every rank with its message.
    Returns the checkpoint's metadata."""
    problems: list[str] = []
    meta: dict[str, Any] = {}
    try:
        meta = read_meta(path)
    except ValueError as error:
        problems.append(str(error))
    _agree(problems, engine)
    index = meta["tensors"]
    model = {f"model/{name}": value for name, value, _ in _named(engine)}
    values = _read(path, index, model, meta, problems)
    problems += [p for p in [lr_schedule.problem(engine.scheduler, meta.get("scheduler"), path)] if p]
    _agree(problems, engine)
    made = _materialize(engine)  # the optimizer's state, to fill (a collective under zero=1)
    state = _state_targets(engine)
    # a parameter without state in the checkpoint had none (it never had a gradient): drop the made one
    stateless = {t.param for k, t in state.items() if k not in index}
    state = {k: t for k, t in state.items() if all(t.param is not p for p in stateless)}
    values.update(_read(path, index, state, meta, problems))
    own = {k: f"{k}/{engine.rank}" for k in ("rng", "rng-cuda")}
    same_world = meta["world_size"] == engine.world_size  # else the random streams do not correspond
    rng = {key: _Plain(torch.get_rng_state() if k == "rng" else torch.cuda.get_rng_state(engine.device))
           for k, key in own.items() if same_world and key in index and (k == "rng" or engine.device.type == "cuda")}
    values.update(_read(path, index, rng, meta, problems))
    undo = _restore_schedule(engine, meta.get("scheduler"), path, problems)
    try:
        _agree(problems, engine)
    except ValueError:
        if made:  # back to an optimizer that has not stepped
            _clear_state(engine.optimizer)
        undo()
        raise
    _drop_state(engine.optimizer, stateless)
    with torch.no_grad():
        for key, target in {**model, **state}.items():
            _assign(target, values[key])
    if own["rng"] in rng:
        torch.set_rng_state(values[own["rng"]])
    if own["rng-cuda"] in rng:
        torch.cuda.set_rng_state(values[own["rng-cuda"]], engine.device)
    _set_hyperparameters(engine.optimizer, meta.get("optimizer") or {})
    if engine.scheduler is not None and meta.get("scheduler") is None:  # its own rates, not the saved ones
        for group, lr in zip(engine.optimizer.param_groups, engine.scheduler.get_last_lr()):
            group["lr"] = lr
    engine.steps = int(meta["step"])
    engine.resume_position(meta.get("position"))
    dist.barrier()
    return meta


def _read(path: str, index: dict[str, Any], targets: dict[str, Any], meta: dict[str, Any],
          problems: list[str]) -> dict[str, torch.Tensor]:
    """Read and check the checkpoint's tensors for ``targets``; add what is wrong to ``problems``."""
    from safetensors import safe_open

    wrong = []
    for key, target in targets.items():
        entry = index.get(key)
        if entry is None:
            wrong.append(f"{key} is missing")
        elif list(entry["shape"]) != list(target.shape):
            wrong.append(f"{key} has shape {entry['shape']} in the checkpoint, {list(target.shape)} here")
    if wrong:
        problems.append(f"checkpoint {path} does not fit this model (saved with plan {meta.get('plan')}): "
                        f"{'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}; is it another model's?")
        return {}
    values = {}
    for file in sorted({index[k]["file"] for k in targets}):
        where = os.path.join(path, file)
        try:
            with safe_open(where, framework="pt") as f:
                for key in (k for k in targets if index[k]["file"] == file):
                    values[key] = f.get_tensor(key)
        except Exception as error:  # missing, truncated or not a safetensors file
            problems.append(f"checkpoint file {where} cannot be read ({type(error).__name__}: {error}); "
                            f"the checkpoint is damaged: load an earlier one")
            return {}
    return values


def _agree(problems: list[str], engine: Any) -> None:
    """Raise on every rank if any rank found a problem (a collective), with the first one."""
    said: list[Any] = [None] * engine.world_size
    dist.all_gather_object(said, problems[0] if problems else None)
    first = next(((r, p) for r, p in enumerate(said) if p), None)
    if first is not None:
        raise ValueError(first[1] if first[0] == engine.rank or problems else f"rank {first[0]}: {first[1]}")


def export(path: str, out: str) -> int:
    """Write the model of checkpoint ``path`` (a step directory, or a root: its latest) as
    one safetensors file, usable without meshwise. Returns the tensors written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    found = latest(path)
    if found is None:
        raise ValueError(f"{path} holds no complete meshwise checkpoint")
    meta = read_meta(found)
    model = {k: v for k, v in meta["tensors"].items() if k.startswith("model/")}
    tensors = {}
    for file in sorted({v["file"] for v in model.values()}):
        try:
            with safe_open(os.path.join(found, file), framework="pt") as f:
                for key in (k for k, v in model.items() if v["file"] == file):
                    tensors[key.removeprefix("model/")] = f.get_tensor(key)
        except Exception as error:
            raise ValueError(f"checkpoint file {os.path.join(found, file)} cannot be read: {error}") from None
    tmp = f"{out}.partial"
    save_file(tensors, tmp, metadata={"format": "pt", "meshwise_step": str(meta["step"])})
    _fsync(tmp)
    os.replace(tmp, out)
    return len(tensors)


# --- what each rank writes and reads --------------------------------------------------


def _named(engine: Any) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is a parameter) for this rank's model state, in a fixed order."""
    out = []
    names = engine._state_names() if hasattr(engine, "_state_names") else None
    for module in engine._state_modules():
        params = {id(p) for p in module.parameters()}
        for name, value in module.state_dict(keep_vars=True).items():
            if names is None or name in names:
                out.append((name, value, id(value) in params))
    return out


def _optimizer_states(optimizer: Any) -> dict[int, dict[str, Any]]:
    """id(parameter) -> its optimizer state, for the parameters whose state lives on this rank
    (under zero=1 over split parameters, keyed by the parameter, not its local view)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if optimizer is None:
        return {}
    if isinstance(optimizer, ZeroRedundancyOptimizer):  # zero=1: the owner holds the state
        pairs = getattr(optimizer, "_pairs", None)
        views = {id(view): p for p, view in pairs} if pairs else {}
        return {id(views.get(id(p), p)): s for p, s in optimizer.optim.state.items() if s}
    return {id(p): s for p, s in optimizer.state.items() if s}


def _gather(engine: Any) -> dict[str, torch.Tensor]:
    """This rank's share of the checkpoint: whole tensors, each written by one rank."""
    writes = engine._writes_model()
    states = _optimizer_states(engine.optimizer)
    zero1 = engine.plan.zero == 1
    out: dict[str, torch.Tensor] = {}
    with mwdist.quiet_gathers():
        for name, value, is_param in _named(engine):
            whole = _whole(value)
            if writes:
                out[f"model/{name}"] = whole.detach().cpu().clone()
            if not is_param:
                continue
            state = states.get(id(value))
            if state is None:
                continue
            for key, tensor in sorted(state.items()):
                if not isinstance(tensor, torch.Tensor):
                    continue
                if hasattr(value, "device_mesh") and not hasattr(tensor, "device_mesh") and tensor.dim():
                    from torch.distributed.tensor import DTensor  # a zero=1 shard of a split parameter

                    tensor = DTensor.from_local(tensor, value.device_mesh, value.placements, run_check=False)
                whole_state = _whole(tensor)
                if writes or (zero1 and getattr(engine, "tp_rank", 0) == 0):  # zero=1: the owner writes
                    out[f"optim/{name}/{key}"] = whole_state.detach().cpu().clone()
    return out


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _state_targets(engine: Any) -> dict[str, Any]:
    """This rank's optimizer state tensors, by checkpoint key."""
    states = _optimizer_states(engine.optimizer)
    out: dict[str, Any] = {}
    for name, value, is_param in _named(engine):
        state = states.get(id(value)) if is_param else None
        for key, tensor in sorted((state or {}).items()):
            if isinstance(tensor, torch.Tensor):
                out[f"optim/{name}/{key}"] = _Shaped(tensor, value)
    return out


class _Plain:
    """A tensor read as it is (a random state), for ``_read``'s checks."""

    def __init__(self, like: torch.Tensor) -> None:
        self.shape = tuple(like.shape)


def _drop_state(optimizer: Any, params: set[Any]) -> None:
    if params:
        state = getattr(optimizer, "optim", optimizer).state
        pairs = getattr(optimizer, "_pairs", None)
        views = {id(p): view for p, view in pairs} if pairs else {}
        for p in params:
            state.pop(views.get(id(p), p), None)


class _Shaped:
    """An optimizer state tensor and the parameter it belongs to (for its whole shape)."""

    def __init__(self, tensor: torch.Tensor, param: torch.Tensor) -> None:
        self.tensor, self.param = tensor, param
        split = hasattr(param, "device_mesh") and not hasattr(tensor, "device_mesh") and tensor.dim()
        self.shape = tuple(param.shape) if split else tuple(tensor.shape)


def _clear_state(optimizer: Any) -> None:
    getattr(optimizer, "optim", optimizer).state.clear()


def _materialize(engine: Any) -> bool:
    """Give an optimizer that has not stepped its state, with a step of zero gradients and
    learning rate 0 (a collective under zero=1), so that a checkpoint can fill it. Returns
    whether it did (every rank decides alike: a zero=1 owner of nothing has no state)."""
    optimizer = engine.optimizer
    if optimizer is None or engine.steps:
        return False
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    pairs = getattr(optimizer, "_pairs", None)
    owners = [p for p, _ in pairs if p.requires_grad] if pairs else params
    for p in owners:
        p.grad = torch.zeros_like(p)
    rates = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    try:
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, rates):
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
    return True


def _assign(target: Any, whole: torch.Tensor) -> None:
    """Copy ``whole`` (the full tensor) into ``target``: this rank's share of it."""
    if isinstance(target, _Shaped):
        tensor, param = target.tensor, target.param
        if hasattr(param, "device_mesh") and not hasattr(tensor, "device_mesh") and tensor.dim():
            whole = _local(whole, param)
        target = tensor
    if hasattr(target, "device_mesh"):
        target.to_local().copy_(_local(whole, target))
    else:
        target.copy_(whole)


def _local(whole: torch.Tensor, like: Any) -> torch.Tensor:
    """This rank's piece of ``whole`` laid out as the DTensor ``like`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def _hyperparameters(optimizer: Any) -> dict[str, Any]:
    """The optimizer's class and each parameter group's settings (``lr``, ``betas``, a
    scheduler's ``initial_lr``...): numbers, strings and tuples of them."""
    if optimizer is None:
        return {}
    groups = []
    for group in optimizer.param_groups:
        kept: dict[str, Any] = {}
        for key, value in group.items():
            if key == "params":
                continue
            if isinstance(value, _HYPER) or (isinstance(value, (tuple, list)) and all(isinstance(v, _HYPER) for v in value)):
                kept[key] = list(value) if isinstance(value, (tuple, list)) else value
        groups.append(kept)
    return {"class": type(getattr(optimizer, "optim", optimizer)).__name__, "groups": groups}


def _set_hyperparameters(optimizer: Any, saved: dict[str, Any]) -> None:
    """Each group's saved settings; with another number of groups (a pipeline's stages hold
    some of them), the first group's settings for all."""
    groups = saved.get("groups") or []
    if optimizer is None or not groups:
        return
    for i, group in enumerate(optimizer.param_groups):
        for key, value in (groups[i] if len(groups) == len(optimizer.param_groups) else groups[0]).items():
            group[key] = tuple(value) if isinstance(group.get(key), tuple) else value


def _restore_schedule(engine: Any, saved: dict[str, Any] | None, path: str, problems: list[str]) -> Any:
    """Load the learning-rate schedule, before the ranks agree (a rank that cannot says so);
    return how to undo it. With no scheduler yet, the state waits for ``engine.scheduler = ...``;
    a checkpoint without one leaves the scheduler at its beginning, with a warning."""
    scheduler = engine.scheduler
    if scheduler is None or saved is None:
        engine._pending_schedule = saved
        if scheduler is not None and engine.is_main and not problems:
            warnings.warn(f"checkpoint {path} holds no learning-rate scheduler state: {type(scheduler).__name__} "
                          f"starts from its beginning", stacklevel=4)
        return lambda: None
    try:
        return lr_schedule.restore(scheduler, saved)
    except Exception as error:  # noqa: BLE001  (any rank's failure must reach every rank)
        problems.append(f"checkpoint {path}: the {saved.get('class')} state does not load into this engine's "
                        f"scheduler ({type(error).__name__}: {error})")
        return lambda: None


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: str) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
