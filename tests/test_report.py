"""meshwise.report: a run directory as one offline HTML page (pure: no processes but Chromium)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import statistics
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from meshwise import report, rundir, trace

CHROMIUM = "/usr/bin/chromium"
STEPS, WORLD, MICROBATCHES = 30, 4, 4
CHARTS = ("loss", "throughput", "breakdown", "memory", "trace")


def _events() -> list[dict[str, Any]]:
    """A GPipe timeline of dp=2, pp=2, 4 micro-batches for the last 4 steps: forwards 2 ms, backwards 4 ms."""
    events, f, b = [], 0.002, 0.004
    for step in range(STEPS - 3, STEPS + 1):
        origin = 1_000.0 + step * 0.05
        for dp in range(2):
            for pp in range(2):
                for mb in range(MICROBATCHES):
                    common = {"rank": dp * 2 + pp, "pp": pp, "dp": dp, "step": step, "stage": pp, "mb": mb}
                    t0 = origin + (mb + pp) * f
                    events.append({**common, "kind": "F", "t0": t0, "t1": t0 + f})
                    t0 = origin + (MICROBATCHES + 1) * f + (MICROBATCHES - 1 - mb + 1 - pp) * b
                    events.append({**common, "kind": "B", "t0": t0, "t1": t0 + b})
    return events


def make_run(path: str, *, predicted: bool = True, traced: bool = True) -> str:
    """A run directory as the spec describes it (docs/report.md): dp=2,pp=2 on 4 ranks, 30 steps."""
    os.makedirs(path)
    info = {
        "command": ["train.py", "--lr", "0.1", "--name=<x>&y"], "started": "2026-11-30T21:50:01Z",
        "plan": "dp=2,pp=2,microbatches=4", "world_size": WORLD,
        "mesh": {"dp": 2, "pp": 2, "tp": 1, "zero": 0, "microbatches": 4, "schedule": "1f1b", "precision": "fp32",
                 "checkpointing": False},
        "layout": "rank = (dp_rank * pp + pp_rank) * tp + tp_rank",
        "stages": [{"stage": 0, "pp_rank": 0, "layers": ["wte", "wpe", "blocks.0", "blocks.1"], "params": 7072, "ms": 3.2},
                   {"stage": 1, "pp_rank": 1, "layers": ["blocks.2", "blocks.3", "ln_f", "<b>head</b>"], "params": 6912,
                    "ms": 3.1}],
        "tensor": None,
        "host": {"hostname": "node<1>", "platform": "Linux-6.1-x86_64", "python": "3.11.7", "torch": "2.13.0",
                 "meshwise": "0.1.0", "cpus": 2, "threads_per_process": 1, "device": "cpu", "gpus": []},
        "predicted": {"step_s": 0.038, "batch": 32, "samples_per_s": 842.0, "compute_s": 0.026,
                      "communication_s": 0.004, "bubble_s": 0.006, "optimizer_s": 0.002} if predicted else None,
    }
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump(info, f)
    time_s = 0.0
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in range(1, STEPS + 1):
            step_s = 0.5 if step == 1 else 0.041 + 0.003 * math.sin(step)
            time_s += step_s
            f.write(json.dumps({"step": step, "time_s": time_s, "loss": 0.4 + 2.8 * math.exp(-step / 10), "rows": 32,
                                "tokens": 2048, "step_s": step_s, "samples_per_s": 32 / step_s,
                                "tokens_per_s": 2048 / step_s, "memory_mb": 512.3 + step, "state_mb": 1.2}) + "\n")
    for rank in range(WORLD):
        with open(os.path.join(path, f"rank-{rank}.jsonl"), "w") as f:
            for step in range(1, STEPS + 1):
                f.write(json.dumps({"step": step, "step_s": 0.041, "memory_mb": 480.0 + 20 * rank + step,
                                    "state_mb": 0.6 + 0.1 * (rank % 2)}) + "\n")
    if traced:
        trace.write(path, _events(), title=info["plan"])
    return path


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(run directory, report.html) of a run with every file."""
    run = make_run(str(tmp_path_factory.mktemp("report") / "run"))
    return run, report.write(run)


def _sources(page: str) -> list[str]:
    """Every address the page names: src=, href= and CSS url( )."""
    return re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)|url\(\s*["']?([^"')\s]+)""", page)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def test_every_section_and_chart(full: tuple[str, str]) -> None:
    run, out = full
    assert out == os.path.join(run, "report.html")
    page = open(out, encoding="utf-8").read()
    for section in ("Run", "Loss", "Throughput", "Step time", "Memory per rank", "Mesh", "Predicted against measured",
                    "Pipeline timeline"):
        assert f"<h2>{section}</h2>" in page
    assert "not recorded" not in page
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(CHARTS) == page.count("<img")
    for name, data in zip(CHARTS, images):  # each embedded chart is the file written beside the page
        with open(os.path.join(run, f"report-{name}.png"), "rb") as f:
            written = f.read()
        assert base64.b64decode(data) == written
        width, height = _png_size(written)
        assert width >= 400 and height >= 150
    assert "dp=2,pp=2,microbatches=4" in page and "warm-up" in page
    assert re.search(r'<text[^>]*class="num">3</text>', page)  # the mesh draws ranks 0..3
    assert "stage 1: blocks.2 .. &lt;b&gt;head&lt;/b&gt; (4)" in page


def test_offline_and_escaped(full: tuple[str, str]) -> None:
    page = open(full[1], encoding="utf-8").read()
    addresses = [a or b for a, b in _sources(page)]
    assert addresses and all(a.startswith("data:") for a in addresses), [a[:40] for a in addresses]
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page
    assert "<b>head</b>" not in page and "&lt;b&gt;head&lt;/b&gt;" in page
    assert "node<1>" not in page and "node&lt;1&gt;" in page
    assert "--name=&lt;x&gt;&amp;y" in page  # the command, shell-quoted and escaped
    assert "<x>" not in page


def test_predicted_against_measured(full: tuple[str, str]) -> None:
    page = open(full[1], encoding="utf-8").read()
    table = page[page.index("<h2>Predicted against measured</h2>"):page.index("<h2>Pipeline timeline</h2>")]
    measured_ms = statistics.median(0.041 + 0.003 * math.sin(s) for s in range(report.WARMUP + 1, STEPS + 1)) * 1e3
    assert f"<td>38.00</td><td>{measured_ms:.2f}</td><td>{(measured_ms / 38 - 1) * 100:+.0f} %</td>" in table
    assert "steps 6 to 30" in table
    # trace.json: 20 % bubble (1 - 48 busy ms / (2 ranks x 30 ms span)) of a 30 ms pipeline span: 6 ms a step
    assert rundir.bubble_ms(report.load(full[0])) == pytest.approx(6.0)


def test_mesh_of_an_interleaved_tensor_parallel_plan(tmp_path: Path) -> None:
    """dp=2,pp=2,tp=2 with 4 stages, 2 on each pipeline rank; run.json alone is a run directory."""
    stages = [{"stage": s, "pp_rank": s % 2, "layers": [f"blocks.{2 * s}", f"blocks.{2 * s + 1}"]} for s in range(4)]
    info = {"plan": "dp=2,pp=2,tp=2,schedule=interleaved", "world_size": 8, "stages": stages,
            "mesh": {"dp": 2, "pp": 2, "tp": 2, "schedule": "interleaved"}, "tensor": {"split": 8, "modules": 12}}
    (tmp_path / "run.json").write_text(json.dumps(info))
    page = open(report.write(str(tmp_path)), encoding="utf-8").read()
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert re.findall(r'class="num">(\d+)<', svg) == [str(r) for r in range(8)]  # drawn dp, then pp, then tp
    assert re.findall(r'class="tp">tp (\d)<', svg) == ["0", "1"] * 4
    columns = svg.split("pp rank 1")
    assert "stage 0: blocks.0, blocks.1" in columns[0] and "stage 2: blocks.4, blocks.5" in columns[0]
    assert "stage 1: blocks.2, blocks.3" in columns[1] and "stage 3: blocks.6, blocks.7" in columns[1]
    assert "8 of 12 modules split" in page and "metrics.jsonl not recorded" in page


def test_missing_sections_say_how_to_record_them(tmp_path: Path) -> None:
    run = make_run(str(tmp_path / "run"), predicted=False, traced=False)
    page = open(report.write(run), encoding="utf-8").read()
    assert "The pipeline timeline not recorded: run with `meshwise run --trace DIR" in page
    assert "A prediction not recorded: run.json holds one when the planner chose the plan (`--plan auto`)" in page
    assert "The predicted breakdown not recorded" in page and "The measured bubble not recorded" in page
    assert page.count("<img") == 4 and not os.path.exists(os.path.join(run, "report-trace.png"))


def test_metrics_only_and_out_elsewhere(tmp_path: Path) -> None:
    """A run directory with nothing but metrics.jsonl, whose last line is still being written."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "step_s": 0.01}) for s in range(1, 4)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    out = report.write(str(run), str(tmp_path / "elsewhere" / "mine.html"))
    page = open(out, encoding="utf-8").read()
    assert os.path.exists(tmp_path / "elsewhere" / "mine-loss.png")
    assert "3 (steps 1 to 3)" in page
    assert "run.json not recorded" in page and "The mesh not recorded" in page
    assert "Throughput not recorded" in page and "Memory not recorded" in page


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no metrics.jsonl and no run.json; to get one, run `meshwise run \.\.\.` "
                                         r"or `meshwise demo`"):
        report.write(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        report.write(str(tmp_path / "nowhere"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\nnot json\n{"step": 4}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 3 is not a JSON object: 'not json'"):
        report.write(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "run.json").write_text('{"plan": "dp=2", ')
    with pytest.raises(ValueError, match=r"run.json is not valid JSON"):
        report.write(str(tmp_path))


def _chromium(page: str, *args: str, profile: str) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, f"file://{page}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_renders_in_chromium(full: tuple[str, str], tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium) to render the page")
    dom = _chromium(full[1], "--dump-dom", profile=str(tmp_path / "profile-dom"))
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert 'data-ready="1"' in body, body
    assert f'data-images-loaded="{len(CHARTS)}"' in body and 'data-images-failed="0"' in body, body
    shot = tmp_path / "shot.png"
    proc = _chromium(full[1], f"--screenshot={shot}", "--window-size=1280,2400", profile=str(tmp_path / "profile-shot"))
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    assert shot.stat().st_size > 50_000 and _png_size(shot.read_bytes()) == (1280, 2400)
