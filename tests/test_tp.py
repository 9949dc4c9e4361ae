"""Tensor parallelism: the plan says what is split and why; tp=2 and dp=2 x tp=2 make the
single-process update (parameters gathered by name, max abs diff <= 1e-5 in fp32: the
row-parallel all-reduce sums partial products in another order)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import harness
import meshwise as mw
from meshwise.gpt import GPT, GPTConfig, lm_loss
from models import classification

TOL = 1e-5


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 4))


def gpt(heads: int = 4) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab=24, context=8, layers=2, hidden=16, heads=heads))


def test_the_plan_splits_attention_by_heads_and_mlp_pairs_and_says_why_the_rest_stays_whole() -> None:
    plan = mw.tensor_plan(gpt(), tp=2)
    styles = {d.name: d.style for d in plan.decisions}
    assert styles["blocks.0.attn.q"] == styles["blocks.0.attn.k"] == styles["blocks.0.attn.v"] == "colwise"
    assert styles["blocks.0.attn.proj"] == "rowwise"
    assert styles["blocks.0.mlp.0"] == "colwise" and styles["blocks.0.mlp.2"] == "rowwise"
    assert styles["wte"] == "rowwise" and styles["head"] == "colwise"  # the vocabulary, tied: split alike
    assert styles["wpe"] == "replicate" and "small embedding" in next(d.why for d in plan.decisions if d.name == "wpe")
    assert styles["blocks.0.ln1"] == "replicate"
    text = str(plan)
    assert "2 of 4 heads per rank" in text and "32 of 64 hidden units per rank" in text
    assert "12 of 24 rows per rank; logits gathered" in text
    # 3 heads: tp=2 does not divide them, so attention stays whole, and the plan says so
    odd = mw.tensor_plan(GPT(GPTConfig(vocab=24, context=8, layers=1, hidden=12, heads=3)), tp=2)
    why = next(d.why for d in odd.decisions if d.name == "blocks.0.attn.q")
    assert "3 heads" in why and "does not divide" in why
    assert {d.style for d in odd.decisions if d.name.startswith("blocks.0.attn")} == {"replicate"}
    # overrides by name, checked
    over = mw.tensor_plan(gpt(), tp=2, overrides={"blocks.0.mlp.0": "replicate", "blocks.0.mlp.2": "replicate"})
    assert "blocks.0.mlp.0" not in over.sharded
    with pytest.raises(ValueError, match="override names 'nope'"):
        mw.tensor_plan(gpt(), tp=2, overrides={"nope": "colwise"})
    with pytest.raises(ValueError, match="only Linear and Embedding layers can be split, blocks.0.ln1 is a LayerNorm"):
        mw.tensor_plan(gpt(), tp=2, overrides={"blocks.0.ln1": "colwise"})


def train(plan: str) -> list[dict]:
    x, y = classification(45)
    t = torch.randint(0, 24, (45, 9), generator=torch.Generator().manual_seed(3))
    cases = [("mlp", mlp(), (x, y), F.cross_entropy, lambda p: torch.optim.AdamW(p, lr=1e-2)),
             ("gpt", gpt(), (t[:, :-1], t[:, 1:]), lm_loss, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))]
    out = []
    for name, model, (a, b), loss_fn, opt in cases:
        ref = copy.deepcopy(model)
        engine = mw.parallelize(model, plan, loss_fn=loss_fn, optimizer=opt, sample=(a[:4], b[:4]))
        losses = [engine.step(batch) for e in range(2) for batch in engine.loader((a, b), 8, seed=3, epoch=e)]
        state = engine.full_state_dict()
        predicted = engine.predict(a[:5])
        result = {"model": name, "losses": losses, "split": len(engine.tensor_plan.sharded),
                  "bytes": engine.state_bytes()}
        if engine.is_main:
            ref_opt = opt(ref.parameters())
            ref_losses = []
            for e in range(2):
                for idx in torch.randperm(len(a), generator=torch.Generator().manual_seed(3 + e)).split(8):
                    ref_opt.zero_grad()
                    loss = loss_fn(ref(a[idx]), b[idx])
                    loss.backward()
                    ref_opt.step()
                    ref_losses.append(loss.item())
            with torch.no_grad():
                result["predict"] = (predicted.cpu() - ref.eval()(a[:5])).abs().max().item()
            ref_state = ref.state_dict()
            assert state.keys() == ref_state.keys()
            result["diff"] = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
            result["loss_diff"] = max(abs(p - q) for p, q in zip(losses, ref_losses))
        out.append(result)
    return out


@pytest.mark.parametrize(("plan", "world"), [("tp=2", 2), ("dp=2,tp=2,microbatches=2", 4)])
def test_tensor_parallel_matches_one_process(plan: str, world: int) -> None:
    results = harness.run(train, world, (plan,), deadline=240)
    for r in results[0]:
        assert r["split"] >= 2, r
        assert r["diff"] <= TOL and r["loss_diff"] <= TOL and r["predict"] <= TOL, r
        for ranks in results[1:]:
            assert next(o for o in ranks if o["model"] == r["model"])["losses"] == pytest.approx(r["losses"], abs=1e-6)
