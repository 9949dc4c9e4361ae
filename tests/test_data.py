"""The loader's index arithmetic and batch checks. Pure: no processes."""

from __future__ import annotations

import pytest
import torch

from meshwise import data


@pytest.mark.parametrize("n", [1, 7, 32, 33, 50])
@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_every_sample_once_per_epoch_across_replicas(n: int, batch: int, dp: int) -> None:
    batches = data.global_batches(n, batch, shuffle=True, seed=3, epoch=1, drop_last=False)
    seen = [i for b in batches for r in range(dp) for i in data.share(b, r, dp).tolist()]
    assert sorted(seen) == list(range(n))
    for b in batches:
        sizes = [len(data.share(b, r, dp)) for r in range(dp)]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(b)


def test_order_is_deterministic_per_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        return torch.cat(data.global_batches(40, 8, shuffle=True, seed=seed, epoch=epoch, drop_last=False)).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert torch.cat(data.global_batches(10, 4, shuffle=False, seed=0, epoch=0, drop_last=False)).tolist() == list(range(10))


def test_drop_last_only_drops_the_short_tail() -> None:
    assert [len(b) for b in data.global_batches(10, 4, shuffle=False, seed=0, epoch=0, drop_last=True)] == [4, 4]
    assert [len(b) for b in data.global_batches(8, 4, shuffle=False, seed=0, epoch=0, drop_last=True)] == [4, 4]
    assert [len(b) for b in data.global_batches(10, 4, shuffle=False, seed=0, epoch=0, drop_last=False)] == [4, 4, 2]


def test_split_into_microbatches_keeps_rows_together_and_drops_empty_parts() -> None:
    x, y = torch.arange(5).float()[:, None], torch.arange(5)
    parts = data.split((x, y), 3)
    assert [len(p[1]) for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert len(data.split((x[:2], y[:2]), 4)) == 2


def test_fetch_collates_generic_datasets() -> None:
    items = [(torch.full((3,), float(i)), i) for i in range(6)]
    x, y = data.fetch(items, torch.tensor([4, 1]))
    assert x.shape == (2, 3) and y.tolist() == [4, 1]


def test_batches_that_differ_from_the_sample_name_both() -> None:
    sample = (torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))
    data.check_spec((torch.ones(7, 64), torch.ones(7, dtype=torch.long)), sample)  # batch size may differ
    with pytest.raises(ValueError) as info:
        data.check_spec((torch.ones(7, 32), torch.ones(7, dtype=torch.long)), sample)
    assert "(B, 32) float32" in str(info.value) and "(B, 64) float32" in str(info.value)
    with pytest.raises(ValueError) as info:
        data.check_spec((torch.ones(7, 64, dtype=torch.float64), torch.ones(7, dtype=torch.long)), sample)
    assert "float64" in str(info.value) and "float32" in str(info.value)


def test_as_dataset_rejects_what_it_cannot_index() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        data.as_dataset((torch.zeros(3), torch.zeros(4)))
    with pytest.raises(ValueError, match="for columns such as \\(x, y\\) pass a tuple"):
        data.as_dataset([torch.zeros(3, 2), torch.zeros(3)])
    with pytest.raises(TypeError, match="map-style dataset"):
        data.as_dataset(iter([1, 2]))
