"""Transparency of pipeline parallelism: pp stages (and dp x pp meshes) make the single-process update.

For each mesh (pp=2, pp=4, dp=2 x pp=2) and each schedule (GPipe, 1F1B, interleaved
1F1B), a seeded MLP and a GPT-like model with tied input/output embeddings train for 6
steps under the plan and, in rank 0, a deep copy trains in one process on the same
global batches. The gathered parameters are compared by name. Tolerance 1e-5 (fp32):
the pipeline sums the same per-sample gradients in another order (per micro-batch,
then per replica), which moves the last bits only. The data has an uneven last batch,
so a step with fewer micro-batches than the plan's is covered too.
"""

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
SCHEDULES = ("gpipe", "1f1b", "interleaved")
STEPS = 6


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(8, 16), torch.nn.Tanh()]
    for _ in range(3):
        layers += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(16, 4))


def gpt(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab=24, context=8, layers=6, hidden=16, heads=2))


def problem(kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "mlp":
        return classification(n)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 24, (n, 9), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def optimizer(kind: str):
    """AdamW for the MLP; SGD with momentum for the GPT: its attention key bias has an exactly zero
    gradient (softmax ignores a shift), so Adam would turn rounding noise of either order of
    summation into full-size steps of random sign, a difference that says nothing about the pipeline."""
    if kind == "mlp":
        return lambda p: torch.optim.AdamW(p, lr=1e-2)
    return lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)


def reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, loss_fn, kind: str) -> list[float]:
    opt = optimizer(kind)(model.parameters())
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))
    losses = []
    for idx in order.split(batch)[:STEPS]:
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train(dp: int, pp: int, schedules: tuple[str, ...] = SCHEDULES, kinds: tuple[str, ...] = ("mlp", "gpt")) -> list[dict]:
    out = []
    for kind in kinds:
        for schedule in schedules:
            microbatches = 4
            batch = dp * microbatches * 2
            n = batch * (STEPS - 1) + dp * 2  # the last batch: 2 rows per replica, so 2 micro-batches
            model = mlp(seed=pp) if kind == "mlp" else gpt(seed=pp)
            ref = copy.deepcopy(model)
            x, y = problem(kind, n)
            loss_fn = F.cross_entropy if kind == "mlp" else lm_loss
            engine = mw.parallelize(
                model, mw.Plan(dp=dp, pp=pp, microbatches=microbatches, schedule=schedule), loss_fn=loss_fn,
                optimizer=optimizer(kind), sample=(x[:batch], y[:batch]),
            )
            losses = [engine.step(b) for b in engine.loader((x, y), batch, seed=7)]
            state = engine.full_state_dict()
            predicted = engine.predict(x[:5])
            result = {"case": (kind, schedule), "losses": losses, "predict_shape": tuple(predicted.shape)}
            if engine.is_main:
                ref_losses = reference(ref, x, y, batch, loss_fn, kind)
                ref.eval()
                with torch.no_grad():
                    result["predict_diff"] = (predicted - ref(x[:5])).abs().max().item()
                ref_state = ref.state_dict()
                assert state.keys() == ref_state.keys(), sorted(set(state) ^ set(ref_state))
                result["diffs"] = {k: (state[k] - ref_state[k]).abs().max().item() for k in ref_state}
                result["loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses))
                result["steps"] = len(losses)
                if kind == "gpt":
                    result["tied_equal"] = bool(torch.equal(state["wte.weight"], state["head.weight"]))
            out.append(result)
    return out


def check(results: list[list[dict]]) -> None:
    main = results[0]
    for rank_results in results[1:]:  # every rank saw the same global mean loss and predictions
        for mine, theirs in zip(main, rank_results):
            assert mine["losses"] == pytest.approx(theirs["losses"], abs=1e-6), mine["case"]
            assert mine["predict_shape"] == theirs["predict_shape"]
    for r in main:
        assert r["steps"] == STEPS, r["case"]
        worst = max(r["diffs"], key=r["diffs"].get)
        assert r["diffs"][worst] <= TOL, (r["case"], worst, r["diffs"][worst])
        assert r["loss_diff"] <= TOL, r["case"]
        assert r["predict_diff"] <= TOL, r["case"]
        if r["case"][0] == "gpt":
            assert r["tied_equal"], r["case"]


@pytest.mark.parametrize(("dp", "pp"), [(1, 2), (1, 4), (2, 2)])
def test_pipeline_matches_one_process(dp: int, pp: int) -> None:
    check(harness.run(train, dp * pp, (dp, pp), deadline=240))


# -- bad input: every rank gets the same clear error, before any training step ----------------------


def errors() -> list[str]:
    from test_partition import DictAcross

    x, y = classification(40)
    x4 = torch.randn(4, 4)
    seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    cases = {
        "too many stages": lambda: mw.parallelize(torch.nn.Sequential(torch.nn.Linear(8, 4)), "pp=2",
                                                  loss_fn=F.cross_entropy, sample=(x[:4], y[:4])),
        "sample": lambda: mw.parallelize(seq, "pp=2", loss_fn=F.cross_entropy, sample=(torch.randn(4, 5), y[:4])),
        "no sample": lambda: mw.parallelize(seq, "pp=2", loss_fn=F.cross_entropy),
        "interleaved": lambda: mw.parallelize(seq, "pp=2,schedule=interleaved,microbatches=5",
                                              loss_fn=F.cross_entropy, sample=(x[:4], y[:4])),
        "1f1b": lambda: mw.parallelize(seq, "pp=2,microbatches=1", loss_fn=F.cross_entropy, sample=(x[:4], y[:4])),
        "stages": lambda: mw.parallelize(seq, "pp=2", loss_fn=F.cross_entropy, sample=(x[:4], y[:4]),
                                         stages=[(0, 1), (2, 3)]),
        "batch": lambda: mw.parallelize(seq, "pp=2,microbatches=4", loss_fn=F.cross_entropy,
                                        sample=(x[:4], y[:4])).loader((x, y), 10),
        "blocked cut": lambda: mw.parallelize(DictAcross(), "pp=2", loss_fn=F.mse_loss, sample=(x4, x4),
                                              stages=[(0, 2), (2, 4)]),
    }
    out = []
    for name, make in cases.items():
        try:
            make()
            out.append(f"{name}: no error")
        except (ValueError, TypeError) as error:
            out.append(f"{name}: {error}")
    return out


def test_bad_pipeline_input_is_refused_with_the_values_and_the_fix() -> None:
    results = harness.run(errors, 2, deadline=120)
    assert results[0] == results[1]  # the same verdict on every rank, none left waiting
    got = dict(line.split(": ", 1) for line in results[0])
    assert "cannot cut Sequential into 2 stages: it has 1 splittable layers (0)" in got["too many stages"]
    assert "sample does not run through Sequential" in got["sample"]
    assert "needs sample=(x, y)" in got["no sample"]
    assert "cannot run microbatches=5" in got["interleaved"] and "use one of [1, 2, 3, 4, 6, 8]" in got["interleaved"]
    assert "microbatches=1 < pp=2; use microbatches>=2" in got["1f1b"]
    assert "not 2 contiguous" in got["stages"]
    assert "batch_size=10 gives replicas [10] samples each, which microbatches=4 does not divide" in got["batch"]
    assert "e.g. 8" in got["batch"]
    assert "cuts before layer 2 (b), where no cut is possible: value d is a Python dict" in got["blocked cut"]


def unseeded() -> dict:
    """Each rank builds its model from its own seed, with an in-place ReLU: the engine starts from
    rank 0's weights everywhere (as DDP does) and the in-place layer works on a stage's input."""
    import os

    torch.manual_seed(100 + int(os.environ["RANK"]))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 8),
                                torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 4))
    initial = copy.deepcopy(model.state_dict())
    x, y = classification(16)
    engine = mw.parallelize(model, "pp=2", loss_fn=F.cross_entropy, optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
                            sample=(x[:8], y[:8]), stages=[(0, 2), (2, 5)])  # stage 1 starts with the in-place ReLU
    engine.step((x[:8], y[:8]))
    return {"initial": initial, "state": engine.full_state_dict()}


def test_replicas_start_from_rank_0s_weights_and_in_place_layers_run() -> None:
    first, second = harness.run(unseeded, 2, deadline=120)
    assert second["state"] is None
    assert all(torch.equal(first["state"][k], first["initial"][k]) for k in first["initial"])  # lr 0: rank 0's
    assert not all(torch.equal(first["initial"][k], second["initial"][k]) for k in first["initial"])


# -- the timeline -------------------------------------------------------------------------------------------


def traced(directory: str) -> dict | None:
    x, y = problem("gpt", 48)
    engine = mw.parallelize(gpt(0), mw.Plan(pp=2, microbatches=4, schedule="1f1b"), loss_fn=lm_loss,
                            optimizer=optimizer("gpt"), sample=(x[:16], y[:16]), trace=True)
    for batch in engine.loader((x, y), 16, shuffle=False):
        engine.step(batch)
    return engine.write_trace(directory)


def test_trace_records_every_forward_and_backward_and_measures_the_bubble(tmp_path) -> None:
    import json

    figures = harness.run(traced, 2, (str(tmp_path),), deadline=120)[0]
    assert figures["theoretical"] == pytest.approx(1 / 5)  # (p-1)/(m+p-1), p=2, m=4
    assert 0.0 <= figures["measured"] < 1.0 and figures["steps"] == 2  # 3 steps, the first not counted
    events = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    last = [e for e in events if e["args"]["step"] == 2]
    assert sorted((e["tid"], e["name"]) for e in last) == sorted(
        (rank, f"{kind}{mb}") for rank in (0, 1) for kind in "FB" for mb in range(4))
    for rank in (0, 1):  # 1F1B on each rank: spans do not overlap, and B0 comes before F3
        mine = sorted((e for e in last if e["tid"] == rank), key=lambda e: e["ts"])
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1 for a, b in zip(mine, mine[1:]))
        names = [e["name"] for e in mine]
        assert names.index("B0") < names.index("F3")
    assert (tmp_path / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_meshwise_run_trace_merges_the_ranks_timelines(tmp_path) -> None:
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "scripts", "train_pp.py")
    trace, run = tmp_path / "trace", tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "meshwise.cli", "run", "--nproc", "2", "--plan", "pp=2",
                          "--trace", str(trace), "--run-dir", str(run), "--tensorboard", script],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "trained 4 steps" in out.stdout
    assert "pipeline bubble: measured" in out.stdout + out.stderr and "theoretical 20.0%" in out.stdout + out.stderr
    assert sorted(p.name for p in trace.iterdir()) == ["trace.json", "trace.png"]  # per-rank files merged
    # the run directory: rank 0's shared files, one file per rank, the timeline, TensorBoard's events
    import json

    facts = json.loads((run / "run.json").read_text())
    assert facts["plan"] == "pp=2" and facts["world_size"] == 2 and facts["host"]["device"] == "cpu"
    assert [s["pp_rank"] for s in facts["stages"]] == [0, 1] and facts["stages"][1]["layers"][-1] == "head"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["rows"] == 16 and m["tokens"] == 128 for m in metrics)
    assert all(m["samples_per_s"] > 0 and m["memory_mb"] > 0 and m["state_mb"] > 0 for m in metrics)
    for rank in (0, 1):
        assert len((run / f"rank-{rank}.jsonl").read_text().splitlines()) == 4
    assert (run / "trace.json").read_bytes() == (trace / "trace.json").read_bytes()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    losses = [e.value for e in board.Scalars("loss")]
    assert losses == pytest.approx([m["loss"] for m in metrics])
    from meshwise import report

    page = report.write(str(run))
    assert "pp rank 1" in open(page).read()
