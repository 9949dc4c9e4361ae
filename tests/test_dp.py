"""Transparency of data parallelism: dp ranks make the single-process update.

Every case trains a seeded MLP with AdamW for two epochs (at least 6 steps) under
``Plan(dp, microbatches)`` and, in the same rank, a deep copy of the same model in one
process on the whole global batches, then compares every parameter by name.
Tolerance 1e-5 (fp32): the parallel run sums the same per-sample gradients in another
order (per replica, then all-reduce), which moves the last bits only.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import harness
import meshwise as mw
from models import classification, max_diff_by_name, mlp

TOL = 1e-5
# (samples, global batch, microbatches, dataset kind): even; uneven tail; uneven tail
# with uneven micro-batches; a tail of 2 samples, fewer than dp=4 replicas, from
# tensors and from a plain list of (x, y) pairs (the generic collate path).
CASES = [(64, 16, 1, "tensors"), (61, 16, 1, "tensors"), (61, 16, 3, "tensors"), (50, 16, 4, "tensors"),
         (50, 16, 1, "list")]
EPOCHS = 2


def reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> list[float]:
    """One process, whole global batches in the loader's documented order."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for idx in order.split(batch):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def train_cases(dp: int, ref_device: str = "cpu") -> list[dict]:
    out = []
    for n, batch, microbatches, kind in CASES:
        model = mlp(seed=n)
        ref = copy.deepcopy(model)
        x, y = classification(n)
        engine = mw.parallelize(
            model, mw.Plan(dp=dp, microbatches=microbatches), loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), sample=(x[:2], y[:2]),
        )
        dataset = (x, y) if kind == "tensors" else list(zip(x, y))
        losses = [engine.step(b) for e in range(EPOCHS) for b in engine.loader(dataset, batch, seed=7, epoch=e)]
        ref_losses = reference(ref.to(ref_device), x.to(ref_device), y.to(ref_device), batch, seed=7)
        out.append({
            "case": (n, batch, microbatches, kind),
            "diffs": max_diff_by_name(engine.model, ref),
            "losses": losses,
            "ref_losses": ref_losses,
            "steps": engine.steps,
        })
    return out


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_dp_matches_single_process(dp: int) -> None:
    per_rank = harness.run(train_cases, world=dp, args=(dp,), deadline=120)
    for rank_results in per_rank:
        for result in rank_results:
            case = result["case"]
            assert result["steps"] >= 6, case
            worst = max(result["diffs"].items(), key=lambda kv: kv[1])
            assert worst[1] <= TOL, f"dp={dp} case {case}: {worst[0]} differs by {worst[1]:.2e}"
            assert result["losses"] == pytest.approx(result["ref_losses"], abs=TOL), case
    # the returned loss is the global mean: bitwise the same on every rank
    for results in zip(*per_rank):
        assert all(r["losses"] == results[0]["losses"] for r in results)


def predict_cases(dp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    model = mlp(seed=3)
    x, y = classification(37)
    engine = mw.parallelize(model, mw.Plan(dp=dp), loss_fn=F.cross_entropy,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), sample=(x[:2], y[:2]))
    engine.step((x[engine.rank::dp], y[engine.rank::dp]))  # predict after a step: replicas still agree
    model.eval()
    with torch.no_grad():
        single = model(x)
    model.train()
    pairs = [
        (engine.predict(x), single),
        (engine.predict(x, batch_size=5), single),
        (engine.predict(torch.utils.data.TensorDataset(x, y), batch_size=4), single),  # (input, target) items
        (engine.predict(x[:3]), single[:3]),  # fewer rows than replicas when dp=4
    ]
    assert model.training, "predict must restore train mode"

    class Rotary(torch.nn.Module):  # a complex buffer, as rotary embeddings keep
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 4)
            self.register_buffer("freqs", torch.polar(torch.ones(4), torch.arange(4.0)))

        def forward(self, x):
            return self.lin(x) * self.freqs.real

    rotary = mw.parallelize(Rotary(), mw.Plan(dp=dp), loss_fn=F.cross_entropy,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), sample=(x[:2], y[:2]))
    with torch.no_grad():
        pairs.append((rotary.predict(x), rotary.model(x)))
    return pairs


@pytest.mark.parametrize("dp", [2, 4])
def test_predict_returns_all_outputs_in_order_on_every_rank(dp: int) -> None:
    for rank, pairs in enumerate(harness.run(predict_cases, world=dp, args=(dp,), deadline=120)):
        for got, want in pairs:
            # per-row results; only the matmul blocking differs with the row count
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank}: {m}")


def prefetched(dp: int) -> list[float]:
    """Training through a prefetching thread, rank 0 slower: the ranks' threads run out of step."""
    import queue
    import threading
    import time

    class Slow(torch.utils.data.Dataset):  # collating a batch takes a while, as with real data
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            time.sleep(0.001)
            return self.x[i], self.y[i]

    def prefetch(batches, depth=1):
        q: queue.Queue = queue.Queue(maxsize=depth)
        threading.Thread(target=lambda: [q.put(b) for b in batches] + [q.put(None)], daemon=True).start()
        while (b := q.get()) is not None:
            yield b

    x, y = classification(61)
    engine = mw.parallelize(mlp(), mw.Plan(dp=dp), loss_fn=F.cross_entropy,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), sample=(x[:1], y[:1]))
    losses = []
    for batch in prefetch(engine.loader(Slow(x, y), 8)):
        if engine.rank == 0:
            time.sleep(0.03)  # rank 0's thread fetches the next batch meanwhile; rank 1's does not
        losses.append(engine.step(batch))
    return losses


def test_prefetching_threads_keep_ranks_in_step() -> None:
    per_rank = harness.run(prefetched, world=2, args=(2,), deadline=90)
    assert len(per_rank[0]) == 8 and per_rank[0] == per_rank[1]
