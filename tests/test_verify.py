"""``meshwise verify``: a correct script passes; planted mistakes fail, each with its cause.

tests/scripts/verify_target.py trains a small classifier under dp=2 (45 rows in batches
of 8: the sixth step has 5 rows) and plants one mistake per mode.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from meshwise import verify as mv

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "verify_target.py")


def _verify(*args: str) -> subprocess.CompletedProcess:
    """verify under a deadline that stops it and both of its runs, every process of them."""
    command = [sys.executable, "-m", "meshwise.cli", "verify", SCRIPT, *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"meshwise verify still running after 120 s (killed):\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_verify_passes_a_correct_script_under_several_plans_at_once() -> None:
    out = _verify("--plan", "dp=2", "--plan", "dp=2,zero=1", "--steps", "8", "--", "ok")
    assert out.returncode == 0, out.stdout + out.stderr
    for words in ["PASS: dp=2 trains like one process", "PASS: dp=2,zero=1 trains like one process",
                  "2 of 2 plans train like one process", "worst parameter:", "fp32 keeps 24 significant bits"]:
        assert words in out.stdout, (words, out.stdout)
    table = [row for row in (line.split() for line in out.stdout.splitlines()) if len(row) == 4 and row[0].isdigit()]
    assert [int(row[0]) for row in table] == [*range(1, 9)] * 2 and all(float(row[3]) <= 1e-4 for row in table)


@pytest.mark.parametrize(("mode", "code", "words"), [
    ("sum", 1, ["FAIL", "the first update is 0.5x the single-process one", "reduction='sum'"]),
    ("dropout", 1, ["FAIL", "draws random numbers", "seeds by rank"]),
    ("tail", 1, ["FAIL", "rows trained differ from step 6: 5 in one process, 8 under dp=2", "uneven last batch"]),
])
def test_verify_names_each_planted_mistake(mode: str, code: int, words: list[str]) -> None:
    out = _verify("--plan", "dp=2", "--steps", "8", "--", mode)
    assert out.returncode == code, out.stdout + out.stderr
    text = " ".join(out.stdout.split())  # the causes are wrapped over lines
    for w in words:
        assert w in text, (w, out.stdout)
    table = [row for row in (line.split() for line in out.stdout.splitlines()) if len(row) == 4 and row[0].isdigit()]
    assert [int(row[0]) for row in table] == list(range(1, 9))  # one row per step compared


def test_verify_refuses_bad_input(capsys) -> None:
    from meshwise.cli import main

    for args, words in [([SCRIPT, "--plan", "dp=1"], "runs in one process, which is the reference"),
                        ([SCRIPT, "--plan", "dp=2", "--nproc", "3"], "needs 2 processes but --nproc is 3"),
                        ([SCRIPT, "--plan", "dp=2", "--steps", "0"], "--steps 0 is invalid"),
                        ([SCRIPT, "--plan", "dp=2", "--tolerance", "-1"], "--tolerance -1 is invalid"),
                        ([SCRIPT, "--plan", "dq=2"], "dq"),
                        (["nowhere.py", "--plan", "dp=2"], "script 'nowhere.py' not found")]:
        with pytest.raises(SystemExit) as done:
            main(["verify", *args])
        assert done.value.code == 2 and words in capsys.readouterr().err, args


def _run(losses: list[float], precision: str = "fp32", shift: float = 0.0, first: float | None = None) -> mv.Run:
    states = {"final": {"w": torch.ones(3) + shift}}
    if first is not None:
        states.update(initial={"w": torch.ones(3)}, first={"w": torch.ones(3) + first})
    return mv.Run("dp=2", losses, [8] * len(losses), precision, states, [])


def test_a_summed_loss_is_named_under_adam_too() -> None:
    # Adam's first update hardly changes when the loss is scaled; the step-1 loss does
    failed, text = mv.compare(_run([9.2, 8.0], first=-0.01), _run([4.6, 4.0], first=-0.01, shift=1e-3), 2)
    assert not failed and "the step-1 loss is 0.5x the single-process one from the same weights" in " ".join(
        text.split())


def test_the_tolerance_follows_the_precision() -> None:
    # 1e-3 apart: out of fp32's 1e-4, within bf16's 5e-2
    assert not mv.compare(_run([1.0, 0.9]), _run([1.0, 0.901]), 2)[0]
    passed, text = mv.compare(_run([1.0, 0.9], "bf16"), _run([1.0, 0.901], "bf16"), 2)
    assert passed and "bf16 autocast keeps 8 significant bits" in text
    assert mv.compare(_run([1.0, 0.9]), _run([1.0, 0.901]), 2, tolerance=1e-2)[0]
    failed, text = mv.compare(_run([1.0]), _run([1.0], shift=1e-3), 1)
    assert not failed and "worst parameter: w, difference 1.00e-03" in text
