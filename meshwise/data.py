"""This rank's share of every global batch, and splitting a share into micro-batches.

Over an epoch the dataset's indices are permuted once (seeded by ``seed + epoch``, so
every rank draws the same order) and cut into global batches of ``batch_size``. Each
global batch is cut into ``dp`` contiguous, near-equal shares (sizes differ by at most
one); replica ``r`` takes share ``r``. Every sample is used exactly once per epoch
across replicas. An uneven last batch keeps all its samples: some replicas get one
fewer, or none; the engine weights each share by its size so the update still equals
the single-process one (see ``Engine.step``).

    global batch  [ 0 1 2 3 4 5 6 | 7 8 9 ]    batch_size=7, 10 samples, dp=2
    replica 0     [ 0 1 2 3 ]     [ 7 8 ]
    replica 1     [ 4 5 6 ]       [ 9 ]
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate


def as_dataset(data: Any) -> Dataset:
    """A map-style dataset from a Dataset, a tensor, or a tuple of equally long tensors (columns).

    A list is a dataset of its items (a list of per-sample tensors stays one), never columns.
    """
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data):
        lengths = {len(t) for t in data}
        if len(lengths) != 1:
            raise ValueError(f"tensors given as a dataset differ in length along dim 0: {sorted(lengths)}")
        return TensorDataset(*data)
    if isinstance(data, list) and len(data) > 1 and all(isinstance(t, torch.Tensor) for t in data) \
            and len({tuple(t.shape) for t in data}) > 1:
        raise ValueError(
            f"a list is a dataset of its items, but these tensors differ in shape "
            f"({', '.join(str(tuple(t.shape)) for t in data[:3])}); for columns such as (x, y) pass a tuple"
        )
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return data
    raise TypeError(
        f"expected a map-style dataset (with __len__ and __getitem__), a tensor or a tuple of "
        f"tensors, got {type(data).__name__}; wrap iterables in a list or a TensorDataset"
    )


def global_batches(
    n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool
) -> list[torch.Tensor]:
    """The index tensors of an epoch's global batches, identical on every rank."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def share(indices: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    """Replica ``dp_rank``'s contiguous slice of a global batch (sizes differ by <= 1)."""
    return indices.tensor_split(dp_size)[dp_rank]


def fetch(dataset: Dataset, indices: torch.Tensor) -> Any:
    """Collate ``dataset[i] for i in indices`` into one batch (one gather for tensor data).

    No indices give a batch of the dataset's structure with 0 rows.
    """
    if len(indices) == 0 and not isinstance(dataset, TensorDataset):
        return map_tensors(lambda t: t[:0], fetch(dataset, torch.zeros(1, dtype=torch.long)))
    if isinstance(dataset, TensorDataset):
        batch = tuple(t[indices] for t in dataset.tensors)
        return batch[0] if len(batch) == 1 else batch
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(indices.tolist()) if getitems else [dataset[i] for i in indices.tolist()]
    return default_collate(items)


class _SizedTuple(tuple):
    global_size: int


class _SizedList(list):
    global_size: int


class _SizedDict(dict):
    global_size: int


def tag(batch: Any, global_size: int, position: tuple[int, int, int] | None = None) -> Any:
    """The batch, marked with the size of the global batch it is a share of, and with its
    position in the data: (epoch, batches of the epoch up to this one, batches in the epoch).

    The marks travel with the object (through a prefetching thread, say), so every rank
    decides the same way whether ``step`` must ask the others for the global size, and a
    checkpoint knows where training stands. A tuple, list or dict stays one (a subclass);
    other batches are returned unmarked.
    """
    kind = {tuple: _SizedTuple, list: _SizedList, dict: _SizedDict}.get(type(batch))
    if kind is None:
        return batch
    marked = kind(batch)
    marked.global_size = global_size
    marked.position = position
    return marked


def global_size(batch: Any) -> int | None:
    """The global batch size a loader marked on ``batch``, or None."""
    return getattr(batch, "global_size", None)


def position(batch: Any) -> tuple[int, int, int] | None:
    """(epoch, batches up to and with this one, batches in the epoch) a loader marked, or None."""
    return getattr(batch, "position", None)


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length along dim 0 of its first tensor."""
    tensor = first_tensor(batch)
    if tensor is None:
        raise TypeError(f"a batch must hold tensors (inputs, targets); got {type(batch).__name__}")
    return len(tensor) if tensor.dim() else 1


def first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        return first_tensor(list(value.values()))
    return None


def split(batch: Any, chunks: int) -> list[Any]:
    """Cut every tensor of a batch into ``chunks`` near-equal parts along dim 0; empty parts dropped."""
    parts = _split(batch, chunks)
    return [p for p in parts if batch_size_of(p) > 0]


def _split(value: Any, chunks: int) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return list(value.tensor_split(chunks))
    if isinstance(value, (tuple, list)):
        columns = [_split(item, chunks) for item in value]
        return [type(value)(col[i] for col in columns) for i in range(chunks)]
    if isinstance(value, dict):
        columns = {k: _split(v, chunks) for k, v in value.items()}
        return [{k: col[i] for k, col in columns.items()} for i in range(chunks)]
    return [value] * chunks


def map_tensors(fn: Any, value: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict, keeping the structure."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor in a nested batch to ``device`` (no copy when already there)."""
    return map_tensors(lambda t: t.to(device, non_blocking=True), value)


def tensors_only(value: Any) -> Any:
    """A model output without its non-tensor entries (a dict's generation cache, say), for gathering."""
    if isinstance(value, dict):
        return {k: tensors_only(v) for k, v in value.items() if _all_tensors(v)}
    return value


def _all_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_all_tensors(v) for v in value)
    if isinstance(value, dict):
        return all(_all_tensors(v) for v in value.values())
    return False


def concat(parts: list[Any]) -> Any:
    """Concatenate same-structured batches along dim 0."""
    head = parts[0]
    if isinstance(head, torch.Tensor):
        return torch.cat(parts)
    if isinstance(head, (tuple, list)):
        return type(head)(concat([p[i] for p in parts]) for i in range(len(head)))
    if isinstance(head, dict):
        return {k: concat([p[k] for p in parts]) for k in head}
    raise TypeError(f"cannot concatenate model outputs of type {type(head).__name__}; return tensors")


def spec(value: Any) -> Any:
    """Per-sample shape and dtype of every tensor in a batch: what the sample fixes."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape[1:]), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(spec(v) for v in value)
    if isinstance(value, dict):
        return {k: spec(v) for k, v in value.items()}
    return type(value).__name__


def describe(value: Any) -> str:
    """``(B, 64) float32`` style text of a batch, for error messages."""
    if isinstance(value, torch.Tensor):
        dims = ", ".join(["B", *map(str, value.shape[1:])]) if value.dim() else ""
        return f"({dims}) {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def check_spec(batch: Any, sample: Any) -> None:
    """Raise if ``batch`` differs from ``sample`` in structure, per-sample shape or dtype."""
    if spec(batch) != spec(sample):
        raise ValueError(
            f"batch {describe(batch)} does not match the sample given to parallelize, "
            f"{describe(sample)} (B = batch dimension); every batch must have the sample's "
            f"per-sample shapes and dtypes: convert the data or pass a matching sample"
        )


def unpack(batch: Any) -> tuple[Any, Any]:
    """A training batch is ``(inputs, targets)``; inputs may be a tensor or a tuple of them."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a training batch must be a pair (inputs, targets), got {describe(batch)}; "
        f"yield (x, y) from the dataset"
    )


def call(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*x)`` for a tuple, ``model(**x)`` for a dict."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)

