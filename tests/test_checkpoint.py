"""Checkpoints: exact resume, loading under other plans, atomic saves, damaged checkpoints,
export, ``meshwise run --resume`` and restarts after a killed worker.

* **Exact resume** (dp=2 and dp=2,pp=2): 3 steps, save, a fresh engine loads and trains to
  the end of epoch 2 (10 steps, shuffled): its parameters equal an uninterrupted run's
  bit for bit (CPU, fp32). (dp=4 agreed within 1e-6, by hand: see docs/checkpoints.md.)
* **Another plan**: the dp=2,pp=2 checkpoint loads with dp=4, dp=2,tp=2, dp=4,zero=3 and in
  one process, and one saved with dp=2,tp=2,zero=1 loads with dp=2,pp=2,zero=3; training
  continues to the single-process result within 1e-4 (AdamW turns the last-bit
  differences of parallel sums into about 1e-5 after 10 steps; an optimizer state lost
  at the resume puts it 8e-3 off).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

import harness
import meshwise as mw
from meshwise import checkpoint
from meshwise.gpt import GPT, GPTConfig, lm_loss

CONFIG = GPTConfig(vocab=24, context=8, layers=4, hidden=16, heads=4)
TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "train_resume.py")


def gpt(config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(0)
    return GPT(config)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, CONFIG.vocab, (40, 9), generator=torch.Generator().manual_seed(3))
    return tokens[:, :-1], tokens[:, 1:]


def _engine(plan: str, **kwargs) -> mw.Engine:
    x, y = _data()
    return mw.parallelize(gpt(), plan, loss_fn=lm_loss, sample=(x[:2], y[:2]),
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **kwargs)


def _train(engine: mw.Engine, stop: int = 0) -> mw.Engine:
    """Train to the end of epoch 2 from where the engine stands, or until ``stop`` steps."""
    for epoch in range(engine.epoch, 2):
        for batch in engine.loader(_data(), 8, shuffle=True, epoch=epoch):
            engine.step(batch)
            if engine.steps == stop:
                return engine
    return engine


def single_process() -> dict[str, torch.Tensor]:
    model = gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = _data()
    for epoch in range(2):
        for idx in torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).split(8):
            opt.zero_grad()
            lm_loss(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.state_dict()


def resume(root: str, plans: list[str], **kwargs) -> dict:
    """Per plan, the largest difference between a run stopped after 3 steps and resumed from
    its checkpoint by a fresh engine, and an uninterrupted run (rank 0; 0.0: bit for bit)."""
    out: dict = {}
    for plan in plans:
        straight = _train(_engine(plan, **kwargs)).full_state_dict()
        first = _train(_engine(plan, checkpoint=os.path.join(root, plan), **kwargs), stop=3)
        first.save()
        resumed = _engine(plan, **kwargs)
        resumed.load(os.path.join(root, plan))
        assert (resumed.steps, resumed.epoch) == (3, 0)
        state = _train(resumed).full_state_dict()
        if state is not None:
            out[plan] = max((state[k] - v).abs().max().item() for k, v in straight.items())
    return out


class Unused(torch.nn.Module):
    """A model with a buffer its forward never touches: no pipeline stage holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        self.register_buffer("version", torch.tensor([3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def resume_dp_and_save_a_pipeline(root: str) -> dict:
    # the learning rate changes every step: the schedule resumes where it stood, or the runs part
    out = resume(root, ["dp=2"], scheduler=lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=8))
    torch.manual_seed(0)
    engine = mw.parallelize(Unused(), "pp=2", loss_fn=torch.nn.functional.mse_loss, sample=(torch.zeros(2, 4),
                            torch.zeros(2, 2)), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    engine.step((torch.randn(4, 4), torch.randn(4, 2)))
    engine.save(os.path.join(root, "unused"))
    return out


def resume_and_reshard(root: str) -> dict:
    out = resume(root, ["dp=2,pp=2,microbatches=2"])
    for plan in ("dp=4", "dp=2,tp=2", "dp=4,zero=3"):
        engine = _engine(plan)
        engine.load(os.path.join(root, "dp=2,pp=2,microbatches=2"))
        out[f"from pp: {plan}"] = _train(engine).full_state_dict()
    # saved with split parameters and optimizer state sharded by owner, loaded into FSDP stages
    _train(_engine("dp=2,tp=2,zero=1", checkpoint=os.path.join(root, "tp-zero1")), stop=3).save()
    engine = _engine("dp=2,pp=2,zero=3,microbatches=2")
    engine.load(os.path.join(root, "tp-zero1"))
    out["from tp, zero=1: dp=2,pp=2,zero=3"] = _train(engine).full_state_dict()
    return out


def load_alone(root: str) -> dict[str, torch.Tensor]:
    engine = _engine("dp=1")
    engine.load(os.path.join(root, "dp=2,pp=2,microbatches=2"))
    return _train(engine).full_state_dict()


def test_resume_is_exact_and_checkpoints_load_under_other_plans(tmp_path) -> None:
    assert harness.run(resume_dp_and_save_a_pipeline, 2, (str(tmp_path),), deadline=120)[0] == {"dp=2": 0.0}
    out = tmp_path / "unused.safetensors"  # a pipeline's checkpoint holds the whole model, unused buffer too
    checkpoint.export(str(tmp_path / "unused"), str(out))
    from safetensors.torch import load_file

    plain = Unused()
    plain.load_state_dict(load_file(out), strict=True)
    assert plain.version.item() == 3.0
    results = harness.run(resume_and_reshard, 4, (str(tmp_path),), deadline=240)[0]
    assert results["dp=2,pp=2,microbatches=2"] == 0.0  # bit for bit
    reference = single_process()
    alone = harness.run(load_alone, 1, (str(tmp_path),), deadline=60)[0]
    for plan, state in [*((p, v) for p, v in results.items() if p.startswith("from ")), ("one process", alone)]:
        worst = max((state[k] - v).abs().max().item() for k, v in reference.items())
        assert worst <= TOL, (plan, worst)


def damaged(root: str) -> dict:
    """Checkpoints that must not load, each with its error, and nothing changed by trying."""
    import shutil

    engine = _train(_engine("dp=1", checkpoint=root), stop=2)
    good = engine.save()
    before = {k: v.clone() for k, v in engine.full_state_dict().items()}
    errors = {}
    truncated = good + "-truncated"
    shutil.copytree(good, truncated)
    file = os.path.join(truncated, "rank-0.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    lost = good + "-lost"
    shutil.copytree(good, lost)
    os.remove(os.path.join(lost, "rank-0.safetensors"))
    unfinished = good + "-unfinished"
    shutil.copytree(good, unfinished)
    os.remove(os.path.join(unfinished, checkpoint.COMPLETE))
    digests = {p: _digest(p) for p in (good, truncated, lost, unfinished)}
    for label, path in (("truncated", truncated), ("lost", lost), ("unfinished", unfinished)):
        with pytest.raises(ValueError) as caught:
            engine.load(path)
        errors[label] = str(caught.value)
    other = mw.parallelize(gpt(GPTConfig(vocab=24, context=8, layers=4, hidden=32, heads=4)), "dp=1",
                           loss_fn=lm_loss, optimizer=lambda p: torch.optim.AdamW(p))
    with pytest.raises(ValueError) as caught:
        other.load(good)
    errors["other model"] = str(caught.value)
    after = engine.full_state_dict()
    errors["unchanged"] = all(torch.equal(after[k], v) for k, v in before.items()) and engine.steps == 2
    errors["files unchanged"] = digests == {p: _digest(p) for p in digests}
    errors["state"] = before
    return errors


def _digest(directory: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def test_damaged_checkpoints_are_refused_and_export_gives_a_plain_file(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    errors = harness.run(damaged, 1, (root,), deadline=60)[0]
    assert "rank-0.safetensors cannot be read" in errors["truncated"] and "not fully covered" in errors["truncated"]
    assert "rank-0.safetensors cannot be read" in errors["lost"] and "No such file" in errors["lost"]
    assert "holds no complete meshwise checkpoint" in errors["unfinished"] and "COMPLETE marker" in errors["unfinished"]
    assert "does not fit this model" in errors["other model"] and "has shape" in errors["other model"]
    assert errors["unchanged"] and errors["files unchanged"]
    out = tmp_path / "model.safetensors"
    cli = os.path.join(os.path.dirname(sys.executable), "meshwise")
    done = subprocess.run([cli, "export", root, str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file

    model = gpt()
    model.load_state_dict(load_file(out), strict=True)  # without meshwise
    assert all(torch.equal(model.state_dict()[k], v) for k, v in errors["state"].items())
    bad = subprocess.run([cli, "export", str(tmp_path / "none"), str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "holds no complete meshwise checkpoint" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


def keeping(root: str) -> dict:
    """keep=2 over steps 0-8, a step saved twice, and another run's save into the same directory."""
    import warnings

    engine = _engine("dp=1", checkpoint=root, keep=2)
    engine.save()  # before any step: no optimizer state yet
    fresh = _engine("dp=1")
    fresh.load(root)
    out = {"state after a step-0 load": len(fresh.optimizer.state)}
    for stop in (2, 4, 6, 8):
        _train(engine, stop=stop)
        engine.save()
    engine.save()  # step 8 again
    out["kept"] = [os.path.basename(p) for p in checkpoint.complete(root)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _engine("dp=1", checkpoint=root, keep=2).save()  # another run, at step 0
    out["warning"] = " ".join(str(w.message) for w in caught)
    out["after"] = [os.path.basename(p) for p in checkpoint.complete(root)]
    return out


def test_the_last_checkpoints_are_kept_and_a_new_save_is_never_the_one_deleted(tmp_path) -> None:
    out = harness.run(keeping, 1, (str(tmp_path),), deadline=60)[0]
    assert out["state after a step-0 load"] == 0  # as saved: an optimizer that had not stepped
    assert out["kept"] == ["step-00000006", "step-00000008"]
    assert "holds step-00000008, newer than this save (step 0)" in out["warning"]
    assert out["after"] == ["step-00000000", "step-00000008"]


def killed_mid_save(root: str) -> None:
    """Rank 1 dies while writing the step-4 checkpoint."""
    import safetensors.torch

    engine = _train(_engine("dp=2", checkpoint=root), stop=2)
    engine.save()
    _train(engine, stop=4)
    if engine.rank == 1:
        write = safetensors.torch.save_file

        def write_then_die(tensors, path, metadata=None):
            write(tensors, path, metadata)
            os.kill(os.getpid(), 9)

        safetensors.torch.save_file = write_then_die
    engine.save()


def test_a_worker_killed_mid_save_leaves_the_previous_checkpoint(tmp_path) -> None:
    root = str(tmp_path)
    with pytest.raises(harness.RankFailed):
        harness.run(killed_mid_save, 2, (root,), deadline=60)
    assert checkpoint.latest(root) == os.path.join(root, "step-00000002")
    assert os.path.isdir(os.path.join(root, ".partial-step-00000004"))  # never renamed into place
    assert checkpoint.read_meta(checkpoint.latest(root))["step"] == 2


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cli = os.path.join(os.path.dirname(sys.executable), "meshwise")
    return subprocess.run([cli, "run", "--nproc", "2", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_meshwise_run_resumes_and_restarts_after_a_killed_worker(tmp_path) -> None:
    straight = _run(SCRIPT, str(tmp_path / "a"), str(tmp_path / "a.pt"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = _run(SCRIPT, str(tmp_path / "b"), str(tmp_path / "b.pt"), "0", "5")  # stops after step 5
    assert cut.returncode == 0 and not (tmp_path / "b.pt").exists(), cut.stderr[-3000:]
    # resumed from step 4; then rank 1 is killed before step 7, and the restart resumes from step 6
    resumed = _run("--resume", "--max-restarts", "1", SCRIPT, str(tmp_path / "b"), str(tmp_path / "b.pt"), "7")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stdout.splitlines() if line.startswith("meshwise: resumed from")]
    assert len(said) == 2 and "(step 4," in said[0] and "(step 6," in said[1], resumed.stdout
    reference, state = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert all(torch.equal(state[k], v) for k, v in reference.items())  # bit for bit


def schedules(root: str) -> dict:
    """A scheduler's state through a checkpoint, and the schedulers that cannot be used."""
    import warnings

    out = {}
    make = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=10)  # noqa: E731
    engine = _train(_engine("dp=1", scheduler=make, checkpoint=os.path.join(root, "one")), stop=4)
    engine.save()
    resumed = _engine("dp=1", scheduler=make)
    resumed.load(os.path.join(root, "one"))
    out["lr"] = (resumed.optimizer.param_groups[0]["lr"], engine.optimizer.param_groups[0]["lr"])
    out["epoch"] = (resumed.scheduler.last_epoch, engine.scheduler.last_epoch)
    # MultiStepLR keeps its milestones in a Counter keyed by integers, which JSON alone would make strings;
    # and a scheduler the script makes after the load takes the state the checkpoint held
    steps = lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [5, 7], 0.1)  # noqa: E731
    straight = _engine("dp=1", scheduler=steps)
    rates = [g["lr"] for _ in range(9) for g in [_train(straight, stop=straight.steps + 1).optimizer.param_groups[0]]]
    first = _train(_engine("dp=1", scheduler=steps, checkpoint=os.path.join(root, "steps")), stop=3)
    first.save()
    later = _engine("dp=1")
    later.load(os.path.join(root, "steps"))
    later.scheduler, later._steps_scheduler = steps(later.optimizer), True  # as a script would, then stepped
    out["milestones"] = (rates[3:], [g["lr"] for _ in range(6)
                                     for g in [_train(later, stop=later.steps + 1).optimizer.param_groups[0]]])
    # a checkpoint without a schedule: the scheduler starts over, at its own rate, and says so
    plain = _train(_engine("dp=1", checkpoint=os.path.join(root, "plain")), stop=2)
    plain.save()
    warm = _engine("dp=1", scheduler=lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warm.load(os.path.join(root, "plain"))
    out["start over"] = (warm.optimizer.param_groups[0]["lr"], [str(w.message) for w in caught])
    other = _engine("dp=1", scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3))
    for label, attempt in [("other", lambda: other.load(os.path.join(root, "one"))),
                           ("plateau", lambda: _engine("dp=1", scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)),
                           ("not a function", lambda: _engine("dp=1", scheduler=3))]:
        with pytest.raises((ValueError, TypeError)) as caught:
            attempt()
        out[label] = str(caught.value)
    out["other unchanged"] = other.steps == 0 and other.scheduler.last_epoch == 0
    return out


def test_a_learning_rate_schedule_resumes_where_it_stood(tmp_path) -> None:
    out = harness.run(schedules, 1, (str(tmp_path),), deadline=60)[0]
    assert out["lr"][0] == out["lr"][1] and out["epoch"] == (4, 4)
    expected, resumed = out["milestones"]
    assert resumed == expected and expected[1] != expected[-1]  # the same rates, decays included
    lr, said = out["start over"]
    assert lr == pytest.approx(1e-3 * 0.1) and any("holds no learning-rate scheduler state" in w for w in said)
    assert "saved with scheduler OneCycleLR, this engine has StepLR" in out["other"] and out["other unchanged"]
    assert "ReduceLROnPlateau cannot be stepped after every update: it needs a metric" in out["plateau"]
    assert "scheduler must be a function of the optimizer" in out["not a function"]
