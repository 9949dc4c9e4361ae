"""One run as one offline HTML page: ``meshwise report RUN_DIR [--out FILE]``.

Reads what a run left in its directory (docs/report.md: ``run.json``, ``metrics.jsonl``,
``rank-R.jsonl``, ``trace.json`` and ``trace.png``) and writes

* ``OUT`` (default ``RUN_DIR/report.html``): a page that needs no network. Its CSS and
  one small script are inline, the charts are ``data:`` URIs, the mesh is an inline SVG,
  and a Content-Security-Policy forbids the page every fetch;
* the same charts beside it as files: ``STEM-loss.png``, ``STEM-throughput.png``,
  ``STEM-breakdown.png``, ``STEM-memory.png``, ``STEM-trace.png`` (``report-loss.png`` ...).

A section is drawn when its data was recorded; otherwise one line says what is missing
and how to record it. Step 1 is warm-up (lazy initialisation, first allocations): it is
drawn apart, and measured medians use the steps after the first ``WARMUP``, as the
engine's own predicted-against-measured check does.

Once loaded, the page sets ``data-ready``, ``data-images-loaded`` and
``data-images-failed`` on ``<body>``, so a headless browser can check every chart drew.
"""

from __future__ import annotations

import base64
import collections
import glob
import html
import json
import os
import re
import shlex
import shutil
import statistics
from dataclasses import dataclass
from typing import Any

WARMUP = 5  # steps left out of measured medians (engine.AUTO_WARMUP_STEPS)
MAX_REPLICAS = 8  # dp rows drawn in the mesh diagram; the others repeat the layout
HOW = "run `meshwise run ...` or `meshwise demo`, which write runs/NAME-TIMESTAMP-XXXX/ (docs/report.md)"
PARTS = {"compute_s": "compute", "communication_s": "communication", "bubble_s": "bubble", "optimizer_s": "optimizer"}
COLOURS = {"compute": "#4C72B0", "communication": "#DD8452", "bubble": "#B0B0B0", "optimizer": "#55A868",
           "compute + communication + optimizer": "#8FAADC", "step (not broken down)": "#8FAADC"}
Record = dict[str, Any]


@dataclass
class Run:
    """What a run directory holds; a file that is absent reads as empty."""

    path: str
    info: Record  # run.json
    steps: list[Record]  # metrics.jsonl, rank 0
    ranks: dict[int, list[Record]]  # rank-R.jsonl by R
    trace: Record | None  # trace.json
    trace_png: str | None


def write(run_dir: str, out: str | None = None) -> str:
    """Write OUT (default RUN_DIR/report.html), a self-contained HTML page, and its PNG charts beside it
    (RUN_DIR/report-*.png or next to OUT); return the HTML path."""
    run = load(run_dir)
    out = os.path.abspath(out or os.path.join(run.path, "report.html"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    charts = _charts(run, os.path.splitext(out)[0])
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(_page(run, charts))
    os.replace(out + ".tmp", out)
    return out


def load(run_dir: str) -> Run:
    """Read a run directory; ValueError if it is none or a file in it is malformed."""
    path = os.path.abspath(run_dir)
    names = ("run.json", "metrics.jsonl", "trace.json", "trace.png")
    here = {name: os.path.join(path, name) for name in names if os.path.exists(os.path.join(path, name))}
    if "run.json" not in here and "metrics.jsonl" not in here:
        why = "it has no metrics.jsonl and no run.json" if os.path.isdir(path) else "it does not exist"
        raise ValueError(f"{run_dir} is not a run directory: {why}; to get one, {HOW}")
    ranks = {}
    for name in glob.glob(os.path.join(path, "rank-*.jsonl")):
        if match := re.fullmatch(r"rank-(\d+)\.jsonl", os.path.basename(name)):
            ranks[int(match.group(1))] = _read_jsonl(name)
    return Run(path, _read_json(here["run.json"]) if "run.json" in here else {},
               _read_jsonl(here["metrics.jsonl"]) if "metrics.jsonl" in here else [], dict(sorted(ranks.items())),
               _read_json(here["trace.json"]) if "trace.json" in here else None, here.get("trace.png"))


def _read_json(path: str) -> Record:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it is written whole by rank 0: "
                         "rerun, or delete the file to report without it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object; delete it to report without it")
    return value


def _read_jsonl(path: str) -> list[Record]:
    """One JSON object a line. An unterminated last line (a run still writing it) is ignored."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]  # what follows the last newline is unfinished, or empty
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number} is not a JSON object: {line[:80]!r}; each line is one "
                             "step's record: fix or delete that line")
        records.append(record)
    return records


# ---- what the sections show ---------------------------------------------------------------


def _series(records: list[Record], key: str) -> tuple[list[Any], list[float]]:
    """(steps, values) of the records that have ``key``."""
    kept = [r for r in records if isinstance(r.get(key), (int, float))]
    return [r.get("step", i + 1) for i, r in enumerate(kept)], [float(r[key]) for r in kept]


def _steady(steps: list[Record]) -> list[Record]:
    """The steps medians use: after the first WARMUP, or after the first, or all there are."""
    return steps[WARMUP:] if len(steps) > WARMUP else steps[1:] or steps


def _median(records: list[Record], key: str) -> float | None:
    values = _series(records, key)[1]
    return statistics.median(values) if values else None


def _span_text(records: list[Record]) -> str:
    return f"steps {records[0].get('step')} to {records[-1].get('step')}" if records else "no steps"


def _bubble_ms(run: Run) -> float | None:
    """Measured idle time of a pipeline rank in a step: bubble fraction x the pipeline's mean span
    over the traced steps after the first (as meshwise.trace counts them)."""
    figures = ((run.trace or {}).get("meshwise") or {}).get("bubble") or {}
    measured = figures.get("measured")
    spans: dict[tuple[Any, Any], list[tuple[float, float]]] = collections.defaultdict(list)
    for e in (run.trace or {}).get("traceEvents", []):
        if e.get("ph") == "X":
            spans[(e.get("args", {}).get("step"), e.get("pid"))].append((e["ts"], e["ts"] + e["dur"]))
    steps = sorted({step for step, _ in spans if step is not None})
    counted = [v for (step, _), v in spans.items() if step in steps[1:]] or list(spans.values())
    if not isinstance(measured, (int, float)) or measured != measured or not counted:
        return None
    span_us = statistics.mean(max(t1 for _, t1 in v) - min(t0 for t0, _ in v) for v in counted)
    return measured * span_us / 1e3


def _breakdown(run: Run) -> dict[str, dict[str, float]]:
    """The step-time bars in ms: 'predicted' by part; 'measured' as its bubble and the rest."""
    predicted = run.info.get("predicted") or {}
    bars: dict[str, dict[str, float]] = {}
    parts = {label: predicted[key] * 1e3 for key, label in PARTS.items() if isinstance(predicted.get(key), (int, float))}
    if parts:
        bars["predicted"] = parts
    median = _median(_steady(run.steps), "step_s")
    if median is not None:
        bubble = _bubble_ms(run)
        bars["measured"] = ({"bubble": bubble, "compute + communication + optimizer": max(0.0, median * 1e3 - bubble)}
                            if bubble is not None else {"step (not broken down)": median * 1e3})
    return bars


def _memory(run: Run) -> dict[int, tuple[float | None, float | None]]:
    """Per rank: (peak memory_mb, peak state_mb); rank 0's metrics when no rank-R.jsonl was written."""
    ranks = run.ranks or ({0: run.steps} if run.steps else {})
    peak = lambda records, key: max(_series(records, key)[1], default=None)  # noqa: E731
    found = {r: (peak(records, "memory_mb"), peak(records, "state_mb")) for r, records in ranks.items()}
    return {r: v for r, v in found.items() if v != (None, None)}


# ---- charts ---------------------------------------------------------------------------------


def _charts(run: Run, stem: str) -> dict[str, str]:
    """Draw each chart whose data exists to STEM-NAME.png; returns NAME -> path."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("meshwise report draws its charts with matplotlib: pip install 'meshwise[trace]'") from None
    matplotlib.use("Agg")
    charts = {}
    for name, draw in (("loss", _draw_loss), ("throughput", _draw_throughput), ("breakdown", _draw_breakdown),
                       ("memory", _draw_memory)):
        if draw(run, f"{stem}-{name}.png"):
            charts[name] = f"{stem}-{name}.png"
    if run.trace_png:
        charts["trace"] = f"{stem}-trace.png"
        shutil.copyfile(run.trace_png, charts["trace"])
    return charts


def _figure(rows: int = 1, height: float = 3.2) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=(9, height * rows), squeeze=False, sharex=True)
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    return fig, axes[:, 0]


def _save(fig: Any, path: str) -> bool:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _draw_loss(run: Run, path: str) -> bool:
    steps, losses = _series(run.steps, "loss")
    if not steps:
        return False
    fig, (ax,) = _figure()
    ax.plot(steps, losses, marker="o" if len(steps) <= 60 else None, ms=3, color=COLOURS["compute"])
    ax.set(xlabel="step", ylabel="loss", title="training loss (the global mean, from rank 0)")
    return _save(fig, path)


def _draw_throughput(run: Run, path: str) -> bool:
    keys = [k for k in ("samples_per_s", "tokens_per_s") if _series(run.steps, k)[0]]
    if not keys:
        return False
    fig, axes = _figure(len(keys), 2.6)
    use_time = all(isinstance(s.get("time_s"), (int, float)) for s in run.steps)
    for ax, key in zip(axes, keys):
        kept = [s for s in run.steps if isinstance(s.get(key), (int, float))]
        x = [s["time_s"] if use_time else s.get("step") for s in kept]
        y = [s[key] for s in kept]
        ax.scatter(x[1:], y[1:], s=12, alpha=0.45, color=COLOURS["compute"], label="each step")
        ax.plot(x[1:], _smooth(y[1:]), lw=2, color=COLOURS["compute"], label="median of 5 steps")
        ax.scatter(x[:1], y[:1], s=40, marker="x", color="#C44E52", label="first step (warm-up)")
        ax.set_ylabel(key.replace("_per_s", " / s"))
        ax.legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("seconds since the engine was made" if use_time else "step")
    axes[0].set_title("throughput")
    return _save(fig, path)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    half = window // 2
    return [statistics.median(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def _draw_breakdown(run: Run, path: str) -> bool:
    bars = _breakdown(run)
    if not bars:
        return False
    fig, (ax,) = _figure(height=0.9 * len(bars) + 1.4)
    for y, (name, parts) in enumerate(bars.items()):
        left = 0.0
        for part, ms in parts.items():
            ax.barh(y, ms, left=left, color=COLOURS[part], label=part, edgecolor="white")
            if ms > 0.06 * sum(p for b in bars.values() for p in b.values()) / len(bars):
                ax.text(left + ms / 2, y, f"{ms:.1f}", ha="center", va="center", fontsize=8, color="white")
            left += ms
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=5)
    ax.set_yticks(range(len(bars)), list(bars))
    ax.invert_yaxis()
    ax.set(xlabel="milliseconds per step", title="step time")
    return _save(fig, path)


def _draw_memory(run: Run, path: str) -> bool:
    import matplotlib.pyplot as plt

    peaks = _memory(run)
    if not peaks:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.0))
    for ax, index, title, colour in ((axes[0], 0, "peak memory (MB)", COLOURS["compute"]),
                                     (axes[1], 1, "peak state: params + grads + optimizer (MB)", COLOURS["communication"])):
        ax.bar([str(r) for r in peaks], [peaks[r][index] or 0 for r in peaks], color=colour)
        ax.set(xlabel="rank", title=title)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


# ---- the page ---------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _missing(what: str, how: str) -> str:
    return f'<p class="missing">{what} not recorded: {how}.</p>'


def _img(charts: dict[str, str], name: str, alt: str) -> str:
    with open(charts[name], "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] | None = None) -> str:
    top = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{top}{body}</table>"


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _header(run: Run) -> str:
    info, host = run.info, run.info.get("host") or {}
    gpus = host.get("gpus")
    command = info.get("command")
    facts = [("plan", info.get("plan")), ("world size", info.get("world_size")), ("host", host.get("hostname")),
             ("device", host.get("device")),
             ("GPUs", ", ".join(f"{n} × {g}" for g, n in collections.Counter(gpus).items()) if gpus else
              "none" if gpus == [] else None),
             ("CPUs", host.get("cpus")), ("threads per process", host.get("threads_per_process")),
             ("versions", " ".join(f"{k} {host[k]}" for k in ("python", "torch", "meshwise") if host.get(k)) or None),
             ("platform", host.get("platform")),
             ("command", shlex.join(map(str, command)) if isinstance(command, list) else command),
             ("started", info.get("started")), ("steps recorded", f"{len(run.steps)} ({_span_text(run.steps)})")]
    body = _table([(k, v) for k, v in facts if v not in (None, "")])
    if not info:
        body += _missing("run.json", "the plan, host and command are unknown; `meshwise run` and `meshwise demo` "
                                     "write it when the engine is made")
    return body + _glance(run)


def _glance(run: Run) -> str:
    if not run.steps:
        return _missing("metrics.jsonl", f"no training step was logged; to get one, {HOW}")
    steady, (_, losses) = _steady(run.steps), _series(run.steps, "loss")
    rows = [("first loss", _num(losses[0], 4) if losses else "n/a"), ("last loss", _num(losses[-1], 4) if losses else "n/a"),
            (f"median samples/s ({_span_text(steady)})", _num(_median(steady, "samples_per_s")))]
    if _series(steady, "tokens_per_s")[0]:
        rows.append((f"median tokens/s ({_span_text(steady)})", _num(_median(steady, "tokens_per_s"), 0)))
    return _table(rows)


def _throughput(run: Run, charts: dict[str, str]) -> str:
    if "throughput" not in charts:
        return _missing("Throughput", "metrics.jsonl has no samples_per_s; rank 0 logs it on every step")
    tokens = "" if _series(run.steps, "tokens_per_s")[0] else " Tokens/s were not recorded (the batches are not token ids)."
    return (f"<p>The first step is warm-up (lazy initialisation, first allocations): it is marked apart and left out "
            f"of the smoothed line and of the medians.{tokens}</p>" + _img(charts, "throughput", "throughput"))


def _step_time(run: Run, charts: dict[str, str]) -> str:
    if "breakdown" not in charts:
        return _missing("Step time", "no measured step_s in metrics.jsonl and no prediction in run.json")
    notes = []
    if "predicted" not in _breakdown(run):
        notes.append(_missing("The predicted breakdown", "run.json holds one when the planner chose the plan "
                                                         "(`--plan auto`)"))
    if _bubble_ms(run) is None:
        notes.append(_missing("The measured bubble", "record the pipeline timeline with `--trace RUN_DIR`; only "
                                                     "the bubble is measured apart, the rest of a step is not"))
    return (f"<p>Measured: the median step over {_span_text(_steady(run.steps))}; its bubble is the trace's measured "
            "fraction times the pipeline's span of a step.</p>"
            + _img(charts, "breakdown", "step time") + "".join(notes))


def _memory_section(run: Run, charts: dict[str, str]) -> str:
    if "memory" not in charts:
        return _missing("Memory", "no rank-R.jsonl and no memory_mb in metrics.jsonl; every rank writes its file "
                                  "on each step")
    note = "" if run.ranks else "<p>No rank-R.jsonl files: rank 0's metrics only.</p>"
    return ("<p>memory_mb: resident memory (CPU) or peak allocated CUDA memory in a step; state: parameters, "
            "gradients and optimizer state the rank holds. Peaks over the run.</p>" + note + _img(charts, "memory", "memory"))


def _mesh(run: Run) -> str:
    mesh = run.info.get("mesh")
    if not isinstance(mesh, dict):
        return _missing("The mesh", "run.json has no \"mesh\"; `meshwise run` and `meshwise demo` write it")
    dp, pp, tp = (int(mesh.get(axis) or 1) for axis in ("dp", "pp", "tp"))
    stages = run.info.get("stages") or []
    layout = run.info.get("layout") or "rank = (dp_rank * pp + pp_rank) * tp + tp_rank"
    text = [f"<p>{_e(', '.join(f'{k}={v if isinstance(v, str) else json.dumps(v)}' for k, v in mesh.items()))}. Rows are data-parallel replicas (dp rank), "
            f"columns pipeline ranks (pp rank), the boxes within a cell tensor-parallel ranks; {_e(layout)}.</p>", _mesh_svg(dp, pp, tp, stages)]
    world = run.info.get("world_size")
    if dp > MAX_REPLICAS:
        text.append(f"<p>Replicas {MAX_REPLICAS} to {dp - 1} (ranks {MAX_REPLICAS * pp * tp} to {dp * pp * tp - 1}) "
                    "repeat the layout and are not drawn.</p>")
    if isinstance(world, int) and world != dp * pp * tp:
        text.append(f"<p>Note: dp × pp × tp = {dp * pp * tp}, but the world size is {world}.</p>")
    if tensor := run.info.get("tensor"):
        text.append(f"<p>Tensor parallel: {_e(tensor.get('split'))} of {_e(tensor.get('modules'))} modules split.</p>")
    if stages:
        text.append(_table([(s.get("stage"), s.get("pp_rank"), ", ".join(map(str, s.get("layers") or [])),
                             f"{s['params']:,}" if isinstance(s.get("params"), int) else "", _num(s.get("ms"), 2))
                            for s in stages], ("stage", "pp rank", "layers", "params", "ms")))
    else:
        text.append("<p>No pipeline: every rank holds every layer.</p>")
    return "".join(text)


def _layers_label(stage: Record) -> str:
    layers = [str(layer) for layer in stage.get("layers") or []]
    short = ", ".join(layers) if len(layers) <= 2 else f"{layers[0]} .. {layers[-1]} ({len(layers)})"
    label = f"stage {stage.get('stage')}: {short}"
    return label if len(label) <= 42 else label[:41] + "…"


def _mesh_svg(dp: int, pp: int, tp: int, stages: list[Record]) -> str:
    """dp rows x pp columns of cells, each holding its tp ranks; each column headed by its stages."""
    by_pp = {p: [s for s in stages if s.get("pp_rank", s.get("stage", 0) % pp) == p] for p in range(pp)}
    lines = max((len(v) for v in by_pp.values()), default=0)
    box, pad, left = 52, 10, 92
    col = max(tp * box + 2 * pad, 290 if stages else 130)
    head, row, rows = 30 + 18 * lines, box + 2 * pad + 8, min(dp, MAX_REPLICAS)
    width, height = left + pp * col, head + rows * row
    hues = ["#DCE6F5", "#FBE3D3", "#DDEFDF", "#EDE1F3", "#F8F0CF", "#DDEFF0", "#F4DCE3", "#E8E8E8"]
    svg = [f'<svg class="mesh" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="mesh">']
    for p in range(pp):
        x = left + p * col + col / 2
        svg.append(f'<text x="{x}" y="18" class="axis">pp rank {p}</text>')
        for i, stage in enumerate(by_pp[p]):
            full = _e(", ".join(map(str, stage.get("layers") or [])))
            svg.append(f'<text x="{x}" y="{38 + 18 * i}" class="stage"><title>{full}</title>'
                       f'{_e(_layers_label(stage))}</text>')
    for d in range(rows):
        y = head + d * row
        svg.append(f'<text x="8" y="{y + (row - 8) / 2}" class="replica">dp rank {d}</text>')
        for p in range(pp):
            x = left + p * col + 4
            svg.append(f'<rect x="{x}" y="{y}" width="{col - 8}" height="{row - 8}" rx="6" fill="{hues[p % len(hues)]}"/>')
            for t in range(tp):
                bx = x + (col - 8 - tp * box) / 2 + t * box + 3
                rank = (d * pp + p) * tp + t
                cx, cy = bx + box / 2 - 3, y + pad + box / 2
                svg.append(f'<rect x="{bx}" y="{y + pad + 3}" width="{box - 6}" height="{box - 6}" rx="4" class="rank"/>'
                           f'<text x="{cx}" y="{cy - 5 * (tp > 1)}" class="num">{rank}</text>')
                if tp > 1:
                    svg.append(f'<text x="{cx}" y="{cy + 13}" class="tp">tp {t}</text>')
    return "".join(svg) + "</svg>"


def _predicted(run: Run) -> str:
    predicted = run.info.get("predicted")
    if not isinstance(predicted, dict) or not isinstance(predicted.get("step_s"), (int, float)):
        return _missing("A prediction", "run.json holds one when the planner chose the plan (`--plan auto`)")
    steady = _steady(run.steps)
    measured = _median(steady, "step_s")
    error = f"{(measured / predicted['step_s'] - 1) * 100:+.0f} %" if measured else "n/a"
    rows = [("step time (ms)", _num(predicted["step_s"] * 1e3, 2), _num(measured and measured * 1e3, 2), error)]
    if isinstance(predicted.get("samples_per_s"), (int, float)):
        rows.append(("samples/s", _num(predicted["samples_per_s"]), _num(_median(steady, "samples_per_s")), ""))
    batches = collections.Counter(s.get("rows") for s in steady if s.get("rows") is not None)
    batch = f"batch {predicted.get('batch')} predicted, {batches.most_common(1)[0][0]} measured" if batches else ""
    return (_table(rows, ("", "predicted", f"measured ({_span_text(steady)})", "error"))
            + (f"<p>{_e(batch)}.</p>" if batch else ""))


def _timeline(run: Run, charts: dict[str, str]) -> str:
    figures = ((run.trace or {}).get("meshwise") or {}).get("bubble") or {}
    text = []
    if figures:
        pct = lambda v: f"{v:.1%}" if isinstance(v, (int, float)) and v == v else "n/a"  # noqa: E731
        text.append(_table([("bubble measured", pct(figures.get("measured"))),
                            ("bubble theoretical, (p - 1) / (v m + p - 1)", pct(figures.get("theoretical"))),
                            ("pipeline ranks p", figures.get("pp")), ("stages per rank v", figures.get("stages_per_rank")),
                            ("micro-batches m", figures.get("microbatches")), ("steps measured", figures.get("steps"))]))
    if "trace" in charts:
        text.append(_img(charts, "trace", "pipeline timeline"))
    if run.trace is not None:
        text.append("<p>trace.json in the run directory opens in chrome://tracing or ui.perfetto.dev.</p>")
    return "".join(text) or _missing("The pipeline timeline", "run with `meshwise run --trace RUN_DIR ...` (or "
                                                               "`meshwise demo --model gpt --trace DIR`)")


CSS = """body{font:15px/1.45 system-ui,"DejaVu Sans",sans-serif;color:#222;max-width:960px;margin:24px auto;padding:0 16px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:30px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f4f4f4}img{max-width:100%;display:block;margin:8px 0}.missing{color:#777;font-style:italic}
code{background:#f4f4f4;padding:0 3px}svg.mesh{max-width:100%;height:auto;font-family:inherit}
svg .axis{font-weight:600;font-size:15px;text-anchor:middle}svg .stage{font-size:13px;text-anchor:middle;fill:#444}
svg .replica{font-size:14px;font-weight:600;dominant-baseline:middle}svg .rank{fill:#fff;stroke:#777}
svg .num{font-size:17px;font-weight:700;text-anchor:middle;dominant-baseline:middle}svg .tp{font-size:10px;text-anchor:middle;fill:#666}"""

SCRIPT = """window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", String(loaded));
  document.body.setAttribute("data-images-failed", String(images.length - loaded));
  document.body.setAttribute("data-ready", "1");
});"""


def _page(run: Run, charts: dict[str, str]) -> str:
    title = f"meshwise report: {run.info.get('plan') or os.path.basename(run.path)}"
    loss = (_img(charts, "loss", "loss") if "loss" in charts
            else _missing("Loss", "metrics.jsonl has no loss; rank 0 logs it on every step"))
    sections = [("Run", _header(run)), ("Loss", loss), ("Throughput", _throughput(run, charts)),
                ("Step time", _step_time(run, charts)), ("Memory per rank", _memory_section(run, charts)),
                ("Mesh", _mesh(run)), ("Predicted against measured", _predicted(run)),
                ("Pipeline timeline", _timeline(run, charts))]
    body = "".join(f'<section id="{_e(name.lower().replace(" ", "-"))}"><h2>{name}</h2>{content}</section>'
                   for name, content in sections)
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style><script>{SCRIPT}</script></head>\n"
            f"<body><h1>{_e(title)}</h1><p>{_e(run.path)}</p>{body}</body></html>\n")
