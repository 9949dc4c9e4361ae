"""Bad input to the API: each gets an error that names the values and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import harness
import meshwise as mw
from models import classification, mlp


def _message(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _warning(fn) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return " | ".join(str(w.message) for w in caught) or "no warning"


def api_errors() -> dict[str, str]:
    x, y = classification(16)
    opt = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    engine = mw.parallelize(mlp(), loss_fn=F.cross_entropy, optimizer=opt, sample=(x[:1], y[:1]))
    sum_engine = mw.parallelize(mlp(), loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"), optimizer=opt)
    return {
        "world": _message(lambda: mw.parallelize(mlp(), mw.Plan(dp=4), loss_fn=F.cross_entropy, optimizer=opt)),
        "tp": _warning(lambda: mw.parallelize(torch.nn.Linear(8, 4), mw.Plan(tp=2), loss_fn=F.cross_entropy,
                                              optimizer=opt)),
        "shape": _message(lambda: engine.step((torch.zeros(4, 5), y[:4]))),
        "dtype": _message(lambda: engine.step((x[:4].double(), y[:4]))),
        "pair": _message(lambda: engine.step(x[:4])),
        "small_batch": _message(lambda: next(engine.loader((x, y), batch_size=1))),
        "empty": _message(lambda: next(engine.loader((x[:0], y[:0]), batch_size=4))),
        "loss": _message(lambda: sum_engine.step((x[:4], y[:4]))),
        "optimizer": _message(lambda: mw.parallelize(mlp(), loss_fn=F.cross_entropy, optimizer="adam")),
        "model": _message(lambda: mw.parallelize(lambda v: v, loss_fn=F.cross_entropy, optimizer=opt)),
        "plan": _message(lambda: mw.parallelize(mlp(), "dp=two", loss_fn=F.cross_entropy, optimizer=opt)),
        "plan_key": _message(lambda: mw.parallelize(mlp(), "dp=2,stages=2", loss_fn=F.cross_entropy, optimizer=opt)),
        "timeout": _message(lambda: mw.parallelize(mlp(), loss_fn=F.cross_entropy, optimizer=opt, timeout=-1)),
        "every": _message(lambda: mw.parallelize(mlp(), loss_fn=F.cross_entropy, optimizer=opt, checkpoint_every=5)),
        "save": _message(lambda: engine.save()),
        "load": _message(lambda: engine.load("/nonexistent/checkpoints")),
    }


@pytest.fixture(scope="module")
def errors() -> dict[str, str]:
    return harness.run(api_errors, world=2, deadline=90)[0]


@pytest.mark.parametrize(("case", "words"), [
    ("world", ["ValueError", "needs 4 processes", "has 2"]),
    ("tp", ["tp=2: no layer of Linear can be split", "use dp=2 instead"]),
    ("shape", ["ValueError", "(B, 5) float32", "(B, 8) float32"]),
    ("dtype", ["ValueError", "float64", "float32"]),
    ("pair", ["TypeError", "(inputs, targets)"]),
    ("small_batch", ["ValueError", "batch_size=1", "batch_size >= 2"]),
    ("empty", ["ValueError", "empty"]),
    ("loss", ["ValueError", "(4,)", "scalar", "mean"]),
    ("optimizer", ["TypeError", "function of the parameters"]),
    ("model", ["TypeError", "torch.nn.Module"]),
    ("plan", ["ValueError", "dp='two'", "integer"]),
    ("plan_key", ["ValueError", "stages"]),
    ("timeout", ["ValueError", "timeout=-1", "> 0"]),
    ("every", ["ValueError", "checkpoint_every=5", "checkpoint=DIR"]),
    ("save", ["ValueError", "save needs a directory"]),
    ("load", ["ValueError", "/nonexistent/checkpoints holds no complete meshwise checkpoint"]),
])
def test_api_errors_name_the_values(errors: dict[str, str], case: str, words: list[str]) -> None:
    for word in words:
        assert word in errors[case], errors[case]
