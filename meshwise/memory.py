"""Memory savers that are plan options: bf16 autocast and per-block activation recomputation.

* ``precision=bf16``: forward passes (and the loss) run under ``torch.autocast`` with
  bfloat16; parameters, their gradients, the gradient all-reduce and the optimizer stay
  fp32 (the parameters are the fp32 master weights autocast casts from).
* ``checkpointing=true``: each block (the layers a pipeline would cut between: the
  model's children, and the items of a ModuleList or Sequential child) keeps only its
  inputs in the forward pass and recomputes its activations in the backward pass
  (``torch.utils.checkpoint``, non-reentrant). Parameter names do not change.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """The forward-pass context for ``precision``: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def full_precision(value: Any) -> Any:
    """Outputs computed under bf16 autocast, back in fp32 (other dtypes untouched)."""
    from meshwise import data

    return data.map_tensors(lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t, value)


def autocast_forward(module: torch.nn.Module, device: torch.device, precision: str) -> None:
    """Run ``module``'s forward under ``autocast(device, precision)`` (in place, names unchanged)."""
    if precision == "fp32":
        return
    forward = module.forward

    @functools.wraps(forward)
    def cast(*args: Any, **kwargs: Any) -> Any:
        with autocast(device, precision):
            return forward(*args, **kwargs)

    module.forward = cast


def checkpoint_blocks(model: torch.nn.Module) -> list[str]:
    """Make every block of ``model`` recompute its activations in backward; their names.

    Each block's class is swapped for a subclass whose ``forward`` runs the original under
    ``torch.utils.checkpoint`` (once per block), so names, ``state_dict`` and deep copies
    behave as before, and a pipeline's stages, which call the same modules, recompute too.
    """
    from meshwise.split import _candidates

    names = []
    for name, block in _candidates(model):
        if getattr(type(block), "_meshwise_checkpointed", False):
            names.append(name)
            continue
        if not any(p.requires_grad for p in block.parameters()):
            continue  # nothing to recompute for: a weightless layer's activations are its neighbours'
        block.__class__ = _recomputing(type(block))
        names.append(name)
    return names


def _as_original(cls: type, state: dict[str, Any]) -> torch.nn.Module:
    """A copy of a recomputing block as its original class (it does not recompute)."""
    module = cls.__new__(cls)
    module.__dict__.update(state)
    return module


@functools.cache
def _recomputing(cls: type) -> type:
    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = super(recomputing, self).forward
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    def __reduce_ex__(self: torch.nn.Module, protocol: Any) -> Any:
        return _as_original, (cls, self.__dict__)  # pickled and deep-copied as the original class

    recomputing = type(cls.__name__, (cls,), {"forward": forward, "_meshwise_checkpointed": True,
                                              "__reduce_ex__": __reduce_ex__, "__module__": cls.__module__,
                                              "__qualname__": cls.__qualname__})
    return recomputing


def saved_activation_bytes(model: torch.nn.Module, inputs: Any) -> int:
    """Bytes one forward pass of ``model`` on ``inputs`` keeps for backward, parameters excluded
    (counted with saved-tensor hooks, as the partitioner does)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    def kept_inputs(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal total  # a recomputing block keeps its inputs instead of its activations
        for t in [*args, *kwargs.values()]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                total += t.numel() * t.element_size()

    hooks = [m.register_forward_pre_hook(kept_inputs, with_kwargs=True) for m in model.modules()
             if getattr(type(m), "_meshwise_checkpointed", False)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    del out
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank


def param_bytes(model: torch.nn.Module) -> int:
    return sum(_local(p).numel() * p.element_size() for p in model.parameters())


def grad_bytes(model: torch.nn.Module) -> int:
    return sum(_local(p.grad).numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer state this rank holds (a ZeroRedundancyOptimizer: its own partition)."""
    inner = getattr(optimizer, "optim", optimizer)
    total = 0
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += _local(value).numel() * value.element_size()
    return total


def broadcast_state(model: torch.nn.Module, device: torch.device) -> None:
    """Make every rank's copy of ``model`` rank 0's (parameters and buffers), as DDP does at wrap time."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(torch.view_as_real(t.data) if t.is_complex() else t.data, 0)
