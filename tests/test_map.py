"""meshwise.map: chunks along axis 0, order kept, the original exception surfaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import meshwise as mw


def row_norms(a):
    return (a * a).sum(axis=1) if isinstance(a, np.ndarray) else (a * a).sum(dim=1)


def fail_on_negative(a):
    if (a < 0).any():
        raise ValueError(f"negative row in chunk of {len(a)}")
    return a


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_equals_the_whole_array_computation(backend: str) -> None:
    arr = np.random.default_rng(0).normal(size=(103, 5))
    np.testing.assert_array_equal(mw.map(row_norms, arr, workers=4, backend=backend), row_norms(arr))
    t = torch.from_numpy(arr)
    assert torch.equal(mw.map(row_norms, t, workers=3, backend=backend), row_norms(t))


def test_more_workers_than_rows_and_lists() -> None:
    arr = np.arange(3)
    assert mw.map(lambda a: a * 2, arr, workers=8).tolist() == [0, 2, 4]
    assert mw.map(lambda a: [int(v) + 1 for v in a], np.arange(10), workers=4) == list(range(1, 11))


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_an_error_in_a_chunk_is_the_original_exception(backend: str) -> None:
    arr = np.ones(20)
    arr[17] = -1
    with pytest.raises(ValueError, match="negative row in chunk of 5"):
        mw.map(fail_on_negative, arr, workers=4, backend=backend)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="backend='gpu'"):
        mw.map(row_norms, np.ones((2, 2)), backend="gpu")
    with pytest.raises(ValueError, match="workers=0"):
        mw.map(row_norms, np.ones((2, 2)), workers=0)
    with pytest.raises(TypeError, match="NumPy array or a torch tensor"):
        mw.map(row_norms, [[1, 2]])
