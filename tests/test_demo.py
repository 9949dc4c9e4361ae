"""`meshwise demo` at its defaults: accuracy, throughput, run directory, rank 0 speaks alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_demo_defaults(tmp_path) -> None:
    out_dir = tmp_path / "run"
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "meshwise"), "demo", "--out", str(out_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("held-out accuracy") == 1, proc.stdout  # rank 0 only
    assert "plan dp=2 on 2 process(es)" in proc.stdout

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["accuracy"] >= 0.95
    assert summary["plan"]["dp"] == 2 and summary["world_size"] == 2
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > summary["train_s"] > 0

    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == summary["steps"] == 20 * 23  # 1437 samples / 64 per batch = 23 steps per epoch
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert {"step", "loss", "samples_per_s", "elapsed_s"} <= records[0].keys()
    assert records[-1]["loss"] < records[0]["loss"] / 10
