"""Tiny seeded models and data shared by the tests."""

from __future__ import annotations

import torch


def mlp(seed: int = 0, d_in: int = 8, hidden: int = 16, classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
        torch.nn.Linear(hidden, classes),
    )


def classification(n: int, d_in: int = 8, classes: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x[n, d_in] float32, y[n] int64), a fixed random problem."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def max_diff_by_name(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, float]:
    """Max abs difference of every parameter, matched by name (names must agree)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys(), (sorted(pa), sorted(pb))
    return {name: (pa[name].detach().cpu() - pb[name].detach().cpu()).abs().max().item() for name in pa}
