"""Pipeline partitioning: the exact balancer, chain detection, measured costs. Pure: no processes."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import meshwise as mw
from meshwise.partition import balance, chain_layers, measure


def brute_force(costs: list[float], stages: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        edges = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(edges, edges[1:])))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balance_is_optimal(seed: int) -> None:
    rng = random.Random(seed)
    costs = [rng.choice([1.0, 2.0, 3.0, 8.0]) * rng.random() for _ in range(rng.randint(2, 9))]
    stages = rng.randint(1, len(costs))
    bounds = balance(costs, stages)
    assert len(bounds) == stages and bounds[0][0] == 0 and bounds[-1][1] == len(costs)
    assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    assert max(sum(costs[a:b]) for a, b in bounds) == pytest.approx(brute_force(costs, stages))


def test_balance_beats_equal_layer_counts_on_unequal_layers() -> None:
    costs = [4.0, 4.0, 1.0, 1.0, 1.0, 1.0]  # equal counts: [4,4,1] | [1,1,1] -> 9
    assert balance(costs, 2) == [(0, 1), (1, 6)]  # 4 | 8


def test_balance_respects_a_memory_limit() -> None:
    costs = [1.0, 1.0, 1.0, 1.0]
    assert balance(costs, 2) == [(0, 2), (2, 4)]
    # the fastest split would put 30 + 10 bytes on stage 0: the limit forces a slower one
    assert balance(costs, 2, memory=[30, 10, 10, 10], limit=30) == [(0, 1), (1, 4)]
    with pytest.raises(ValueError, match="within 25 bytes.*layer 2 alone needs 30"):
        balance(costs, 3, memory=[10, 10, 30, 10], limit=25)


def test_balance_rejects_more_stages_than_layers() -> None:
    with pytest.raises(ValueError, match="cannot cut 3 layers into 4"):
        balance([1.0, 1.0, 1.0], 4)


class Blocks(torch.nn.Module):
    """The transformer shape: an input layer, a ModuleList of blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Residual(Blocks):
    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_chain_of_children_with_a_module_list_is_found_in_call_order() -> None:
    names = [name for name, _ in chain_layers(Blocks(), torch.randn(2, 8))]
    assert names == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]


def test_a_model_that_is_not_a_chain_says_why_and_what_to_do() -> None:
    with pytest.raises(ValueError, match="blocks.1 does not receive exactly the output of blocks.0.*residual"):
        chain_layers(Residual(), torch.randn(2, 8))
    with pytest.raises(ValueError, match="1 child module"):
        chain_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.randn(1, 2))


def test_partition_measures_and_balances_unequal_layers() -> None:
    torch.manual_seed(0)
    wide, narrow = 512, 32
    model = torch.nn.Sequential(
        torch.nn.Linear(narrow, wide), torch.nn.Linear(wide, wide), torch.nn.Linear(wide, narrow),
        *[torch.nn.Linear(narrow, narrow) for _ in range(6)],
    )
    part = mw.partition(model, (torch.randn(256, narrow), torch.zeros(256)), stages=2)
    assert [layer.name for layer in part.layers] == [str(i) for i in range(9)]
    assert part.layers[1].params == wide * wide + wide
    assert part.layers[1].activation_bytes == 256 * wide * 4  # Linear saves its input only
    # the wide layers cost far more than the narrow ones, so stage 0 holds fewer layers
    assert part.bounds[0][1] < 9 - part.bounds[0][1]
    assert part.bottleneck_ms == max(part.stage_ms(0), part.stage_ms(1))
    text = str(part)
    assert text.splitlines()[0].split()[:2] == ["stage", "layers"] and "bottleneck" in text.splitlines()[-1]


def test_partition_rejects_more_stages_than_layers_naming_them() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"cannot cut Sequential into 4 stages: it has 3 splittable layers \(0, 1, 2\)"):
        mw.partition(model, torch.randn(1, 2), stages=4)


def test_measure_counts_saved_activations_not_parameters() -> None:
    lin, relu = torch.nn.Linear(64, 32), torch.nn.ReLU()
    x = torch.randn(16, 64)
    args = {"lin": ((x,), {}), "relu": ((lin(x).detach(),), {})}
    layers = measure([("lin", lin), ("relu", relu)], args, [16 * 32 * 4, 0], repeats=1)
    assert layers[0].activation_bytes == 16 * 64 * 4  # the input, not the weight or its transpose
    assert layers[1].activation_bytes == 16 * 32 * 4  # ReLU saves its output
    assert layers[0].output_bytes == 16 * 32 * 4 and layers[0].param_bytes == (64 * 32 + 32) * 4


def run_stages(part, *inputs):
    h = inputs
    for module in part.stage_modules():
        h = module(*h)
        h = h if isinstance(h, tuple) else (h,)
    return h[0]


def test_a_residual_forward_is_cut_through_its_graph_and_stages_compute_the_model() -> None:
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(3, 8)
    part = mw.partition(model, (x, None), stages=3)
    assert [layer.name for layer in part.layers] == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert torch.equal(run_stages(part, x), model(x))
    y = torch.randn(5, 8)  # another batch size runs too: shapes are not baked into the stages
    assert torch.equal(run_stages(part, y), model(y))
    # parameters keep their names on their stages
    names = [sorted(n for n, _ in m.named_parameters()) for m in part.stage_modules()]
    assert sorted(sum(names, [])) == sorted(n for n, _ in model.named_parameters())


def test_the_gpt_shape_splits_with_its_tied_embedding_on_both_ends() -> None:
    from meshwise.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=24, context=8, layers=4, hidden=16, heads=2))
    idx = torch.randint(0, 24, (4, 8))
    part = mw.partition(model, (idx, None), stages=2)
    first, last = part.stage_modules()
    assert first.get_parameter("wte.weight") is last.get_parameter("head.weight")  # one tensor, two stages
    assert torch.equal(run_stages(part, idx), model(idx))


class SizeAcross(torch.nn.Module):
    """A Python int (x.shape[1]) is read after the first layer: it is recomputed where it is read."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        n = x.shape[1]
        h = self.a(x)
        h = self.b(h) * n
        return self.c(h) * n


class Pair(torch.nn.Module):
    def forward(self, x):
        return {"h": x, "n": 2}


class DictAcross(SizeAcross):
    """Layer ``d`` returns a dict, which cannot be sent: no cut may fall right after it."""

    def __init__(self) -> None:
        super().__init__()
        self.d = Pair()

    def forward(self, x):
        out = self.d(self.a(x))
        return self.c(self.b(out["h"]) * out["n"])


def test_shape_values_are_recomputed_and_cuts_are_only_where_values_can_cross() -> None:
    torch.manual_seed(0)
    model, x = SizeAcross(), torch.randn(2, 4)
    part = mw.partition(model, (x, None), stages=3)
    assert part.bounds == ((0, 1), (1, 2), (2, 3))
    assert torch.equal(run_stages(part, x), model(x))
    with pytest.raises(ValueError, match="can be cut at 2 places, too few for 4 stages; cuts are impossible before b "
                                         r"\(value d is a Python dict"):
        mw.partition(DictAcross(), (x, None), stages=4)


def test_a_sample_that_does_not_run_through_the_model_says_so() -> None:
    with pytest.raises(ValueError, match="sample does not run through Sequential.*mat1 and mat2"):
        mw.partition(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)), (torch.randn(2, 5), None), 2)


class Backbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, idx, scale=None):
        h = self.embed(idx)
        for layer in self.layers:
            h = torch.tanh(layer(h)) * scale
        return h


class Head(torch.nn.Module):
    def forward(self, h, *, bias):
        return h.sum(-1) + bias


class WithBackbone(torch.nn.Module):
    """The Hugging Face shape in plain PyTorch: a backbone child holding the blocks, a head
    called with a keyword argument, a mask-like value made in forward and read by every block."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.head = Head()

    def forward(self, idx):
        scale = (idx >= 0).float()[..., None]
        return self.head(self.backbone(idx, scale=scale), bias=torch.ones(()))


def test_a_backbone_child_is_opened_and_keyword_inputs_cross_stages() -> None:
    torch.manual_seed(0)
    model, idx = WithBackbone(), torch.randint(0, 10, (3, 5))
    part = mw.partition(model, (idx, None), stages=3)
    assert [layer.name for layer in part.layers] == [
        "backbone.embed", "backbone.layers.0", "backbone.layers.1", "backbone.layers.2", "head"]
    assert torch.equal(run_stages(part, idx), model(idx))
    other = torch.randint(0, 10, (6, 5))
    assert torch.equal(run_stages(part, other), model(other))
