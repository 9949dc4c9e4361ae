"""The README's code and commands work when pasted."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def test_readme_python_example_runs() -> None:
    readme = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code += "\nassert predictions.shape == (2048, 4) and isinstance(loss, float)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_quickstart_under_meshwise_run_learns() -> None:
    proc = subprocess.run([f"{BIN}/meshwise", "run", "--nproc", "2", "examples/quickstart.py"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plan dp=2 on 2 process(es)" in proc.stdout
    accuracy = float(re.search(r"training accuracy ([0-9.]+)", proc.stdout).group(1))
    assert accuracy > 0.9, proc.stdout

