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
    assert {"step", "loss", "samples_per_s", "time_s", "step_s", "memory_mb"} <= records[0].keys()
    assert (out_dir / "run.json").exists() and (out_dir / "rank-1.jsonl").exists()
    assert records[-1]["loss"] < records[0]["loss"] / 10


def test_gpt_demo_trains_in_a_pipeline_and_writes_its_timeline(tmp_path) -> None:
    out_dir, trace = tmp_path / "run", tmp_path / "trace"
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "meshwise"), "demo", "--model", "gpt",
                           "--plan", "pp=2", "--steps", "120", "--trace", str(trace), "--out", str(out_dir)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sample:") == 1 and "2 pipeline stages" in proc.stdout  # rank 0 only
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["plan"]["pp"] == 2 and summary["steps"] == 120
    assert summary["final_loss"] < 0.75 * summary["first_loss"]  # 4.49 -> about 2.7 at 120 steps
    assert summary["held_out_loss"] < 0.75 * summary["first_loss"]
    assert len(summary["sample"]) == 4 + 200 and summary["sample"].startswith("The ")
    assert 0 <= summary["bubble"]["measured"] < 1 and summary["bubble"]["theoretical"] == 0.2
    assert (trace / "trace.json").exists() and (trace / "trace.png").exists()
