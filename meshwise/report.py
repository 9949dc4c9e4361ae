"""One run as one offline HTML page: ``meshwise report RUN_DIR [--out FILE]``.

Reads what a run left in its directory with ``meshwise.rundir`` (docs/report.md: ``run.json``,
``metrics.jsonl``, ``rank-R.jsonl``, ``trace.json`` and ``trace.png``) and writes

* ``OUT`` (default ``RUN_DIR/report.html``): a page that needs no network. Its CSS and
  one small script are inline, the charts are ``data:`` URIs, the mesh is an inline SVG,
  and a Content-Security-Policy forbids the page every fetch;
* the same charts beside it as files: ``STEM-loss.png``, ``STEM-throughput.png``,
  ``STEM-breakdown.png``, ``STEM-memory.png``, ``STEM-trace.png`` (``report-loss.png`` ...).

A section is drawn when its data was recorded; otherwise one line says what is missing
and how to record it. The first step is warm-up (lazy initialisation, first allocations):
it is drawn apart, and measured medians use the steps after the first ``WARMUP``, as the
engine's own predicted-against-measured check does.

Once loaded, the page sets ``data-ready``, ``data-images-loaded`` and
``data-images-failed`` on ``<body>``, so a headless browser can check every chart drew.
"""

from __future__ import annotations

import base64
import collections
import html
import json
import os
import shlex
import shutil
import statistics
from typing import Any

from meshwise import rundir
from meshwise.rundir import HOW, Record, Run, load  # report.load still works (re-exported)
from meshwise.rundir import WARMUP as WARMUP  # and so does report.WARMUP

MAX_REPLICAS = 8  # dp rows drawn in the mesh diagram; the others repeat the layout
COLOURS = {"compute": "#4C72B0", "communication": "#DD8452", "bubble": "#B0B0B0", "optimizer": "#55A868",
           "compute + communication + optimizer": "#8FAADC", "step (not broken down)": "#8FAADC"}


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


def _charts(run: Run, stem: str) -> dict[str, str]:
    """Draw each chart whose data exists to STEM-NAME.png; returns NAME -> path."""
    import matplotlib  # the trace, demo and test extras install it

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


def _figure(rows: int = 1, columns: int = 1, height: float = 3.2) -> tuple[Any, list[Any]]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, figsize=(9, height * rows), squeeze=False, sharex=columns == 1)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, list(axes.flat)


def _save(fig: Any, path: str) -> bool:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def _draw_loss(run: Run, path: str) -> bool:
    steps, losses = rundir.series(run.steps, "loss")
    if not steps:
        return False
    fig, (ax,) = _figure()
    ax.plot(steps, losses, marker="o" if len(steps) <= 60 else None, ms=3, color=COLOURS["compute"])
    ax.set(xlabel="step", ylabel="loss", title="training loss (the global mean, from rank 0)")
    return _save(fig, path)


def _draw_throughput(run: Run, path: str) -> bool:
    keys = [key for key in ("samples_per_s", "tokens_per_s") if rundir.series(run.steps, key)[0]]
    if not keys:
        return False
    fig, axes = _figure(len(keys), height=2.6)
    timed = all(isinstance(s.get("time_s"), (int, float)) for s in run.steps)
    for ax, key in zip(axes, keys):
        kept = [s for s in run.steps if isinstance(s.get(key), (int, float))]
        x, y = [s["time_s"] if timed else s.get("step") for s in kept], [s[key] for s in kept]
        ax.scatter(x[1:], y[1:], s=12, alpha=0.45, color=COLOURS["compute"], label="each step")
        smooth = [statistics.median(y[max(1, i - 2):i + 3]) for i in range(1, len(y))]  # centred, 5 steps
        ax.plot(x[1:], smooth, lw=2, color=COLOURS["compute"], label="median of 5 steps")
        ax.scatter(x[:1], y[:1], s=40, marker="x", color="#C44E52", label="first step (warm-up)")
        ax.set_ylabel(key.replace("_per_s", " / s"))
        ax.legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("seconds since the engine was made" if timed else "step")
    axes[0].set_title("throughput")
    return _save(fig, path)


def _draw_breakdown(run: Run, path: str) -> bool:
    bars = rundir.breakdown(run)
    if not bars:
        return False
    fig, (ax,) = _figure(height=0.9 * len(bars) + 1.4)
    longest = max(sum(parts.values()) for parts in bars.values())
    for y, parts in enumerate(bars.values()):
        left = 0.0
        for part, ms in parts.items():
            ax.barh(y, ms, left=left, color=COLOURS[part], label=part, edgecolor="white")
            if ms > 0.06 * longest:
                ax.text(left + ms / 2, y, f"{ms:.3g}", ha="center", va="center", fontsize=8, color="white")
            left += ms
        ax.text(left + 0.01 * longest, y, f"{left:.3g} ms", va="center", fontsize=9)
    legend = dict(zip(*reversed(ax.get_legend_handles_labels())))
    ax.legend(legend.values(), legend.keys(), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5,
              frameon=False)  # above the bars, where the title would be (the section's heading says it)
    ax.set_yticks(range(len(bars)), list(bars))
    ax.set_xlim(0, longest * 1.12 or 1)
    ax.invert_yaxis()
    ax.set(xlabel="milliseconds per step")
    return _save(fig, path)


def _draw_memory(run: Run, path: str) -> bool:
    peaks = rundir.memory_per_rank(run)
    if not peaks:
        return False
    fig, axes = _figure(columns=2, height=3.0)
    titles = ("peak memory (MB)", "peak state: params + grads + optimizer (MB)")
    for index, (ax, title, colour) in enumerate(zip(axes, titles, (COLOURS["compute"], COLOURS["communication"]))):
        ax.bar([str(r) for r in peaks], [peaks[r][index] for r in peaks], color=colour)
        ax.set(xlabel="rank", title=title)
    return _save(fig, path)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _missing(what: str, how: str) -> str:
    return f'<p class="missing">{what} not recorded: {how}.</p>'


def _img(charts: dict[str, str], name: str, alt: str) -> str:
    with open(charts[name], "rb") as f:
        return f'<img src="data:image/png;base64,{base64.b64encode(f.read()).decode("ascii")}" alt="{_e(alt)}">'


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] = ()) -> str:
    top = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{top}{body}</table>"


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _span_text(records: list[Record]) -> str:
    first, last = (records[0].get("step"), records[-1].get("step")) if records else (None, None)
    return "no steps" if not records else f"step {first}" if first == last else f"steps {first} to {last}"


def _header(run: Run) -> str:
    info, host = run.info, run.info.get("host") or {}
    gpus, command = host.get("gpus"), info.get("command")
    facts = [("plan", info.get("plan")), ("world size", info.get("world_size")), ("host", host.get("hostname")),
             ("device", host.get("device")),
             ("GPUs", ", ".join(f"{n} × {g}" for g, n in collections.Counter(gpus).items()) if gpus
              else "none" if gpus == [] else None),
             ("CPUs", host.get("cpus")), ("threads per process", host.get("threads_per_process")),
             ("versions", " ".join(f"{k} {host[k]}" for k in ("python", "torch", "meshwise") if host.get(k))),
             ("platform", host.get("platform")),
             ("command", shlex.join(map(str, command)) if isinstance(command, list) else command),
             ("started", info.get("started")), ("steps recorded", f"{len(run.steps)} ({_span_text(run.steps)})")]
    body = _table([(k, v) for k, v in facts if v not in (None, "")])
    if not info:
        body += _missing("run.json", "the plan, host and command are unknown; `meshwise run` and `meshwise demo` "
                                     "write it when the engine is made")
    if not run.steps:
        return body + _missing("metrics.jsonl", f"no training step was logged; to get one, {HOW}")
    steady, losses = rundir.steady(run.steps), rundir.series(run.steps, "loss")[1] or [None]
    rows = [("first loss", _num(losses[0], 4)), ("last loss", _num(losses[-1], 4)),
            (f"median samples/s ({_span_text(steady)})", _num(rundir.median(steady, "samples_per_s")))]
    if rundir.series(steady, "tokens_per_s")[0]:
        rows.append((f"median tokens/s ({_span_text(steady)})", _num(rundir.median(steady, "tokens_per_s"), 0)))
    return body + _table(rows)


def _throughput(run: Run, charts: dict[str, str]) -> str:
    if "throughput" not in charts:
        return _missing("Throughput", "metrics.jsonl has no samples_per_s; rank 0 logs it on every step")
    tokens = "" if rundir.series(run.steps, "tokens_per_s")[0] else " Tokens/s were not recorded for this run."
    return (f"<p>The first step is warm-up (lazy initialisation, first allocations): it is marked apart and left out "
            f"of the smoothed line and of the medians.{tokens}</p>" + _img(charts, "throughput", "throughput"))


def _step_time(run: Run, charts: dict[str, str]) -> str:
    if "breakdown" not in charts:
        return _missing("Step time", "no step_s in metrics.jsonl and no prediction in run.json")
    notes = [] if "predicted" in rundir.breakdown(run) else [
        _missing("The predicted breakdown", "run.json holds one when the planner chose the plan (`--plan auto`)")]
    bubble = ("; its bubble is the trace's measured bubble fraction times the pipeline's span of a step"
              if rundir.bubble_ms(run) is not None else "")
    if not bubble:
        notes.append(_missing("The measured bubble", "record the pipeline timeline with `--trace DIR` (copied into the run directory); of a "
                                                     "measured step, only the bubble is told apart"))
    return (f"<p>Measured: the median step over {_span_text(rundir.steady(run.steps))}{bubble}.</p>"
            + _img(charts, "breakdown", "step time") + "".join(notes))


def _memory_section(run: Run, charts: dict[str, str]) -> str:
    if "memory" not in charts:
        return _missing("Memory", "no rank-R.jsonl and no memory_mb in metrics.jsonl; every rank writes its "
                                  "rank-R.jsonl on each step")
    return ("<p>Peaks over the run. Memory: resident memory (CPU) or peak allocated CUDA memory (GPU); state: the "
            "parameters, gradients and optimizer state the rank holds.</p>"
            + ("" if run.ranks else "<p>No rank-R.jsonl files: rank 0's metrics only.</p>")
            + _img(charts, "memory", "memory"))


def _mesh(run: Run) -> str:
    mesh, stages, world = run.info.get("mesh"), run.info.get("stages") or [], run.info.get("world_size")
    if not isinstance(mesh, dict):
        return _missing("The mesh", "run.json has no \"mesh\"; `meshwise run` and `meshwise demo` write it")
    dp, pp, tp = (int(mesh.get(axis) or 1) for axis in ("dp", "pp", "tp"))
    fields = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in mesh.items())
    layout = run.info.get("layout") or "rank = (dp_rank * pp + pp_rank) * tp + tp_rank"
    text = [f"<p>{_e(fields)}. Rows are data-parallel replicas (dp rank), columns pipeline ranks (pp rank), the boxes "
            f"in a cell tensor-parallel ranks; {_e(layout)}.</p>",
            f'<div class="scroll">{_mesh_svg(dp, pp, tp, stages)}</div>']
    if dp > MAX_REPLICAS:
        text.append(f"<p>Replicas {MAX_REPLICAS} to {dp - 1} (ranks {MAX_REPLICAS * pp * tp} to {dp * pp * tp - 1}) "
                    "repeat the layout and are not drawn.</p>")
    if isinstance(world, int) and world != dp * pp * tp:
        text.append(f"<p>Note: dp × pp × tp = {dp * pp * tp}, but the world size is {world}.</p>")
    if isinstance(tensor := run.info.get("tensor"), dict):
        text.append(f"<p>Tensor parallel: {_e(tensor.get('split'))} of {_e(tensor.get('modules'))} modules split.</p>")
    if not stages:
        return "".join(text) + "<p>No pipeline: every rank holds every layer.</p>"
    rows = [(s.get("stage"), s.get("pp_rank"), ", ".join(map(str, s.get("layers") or [])),
             f"{s['params']:,}" if isinstance(s.get("params"), int) else "", _num(s.get("ms"), 2)) for s in stages]
    return "".join(text) + _table(rows, ("stage", "pp rank", "layers", "params", "ms"))


def _layers_label(stage: Record) -> str:
    """``stage 2: blocks.4 .. 7 (4)``: the first and last layer, their common dotted prefix said once."""
    layers = [str(layer) for layer in stage.get("layers") or []]
    short = ", ".join(layers)
    if len(layers) > 2:
        common = os.path.commonprefix([layers[0], layers[-1]])
        prefix = common[:common.rfind(".") + 1]  # whole dotted parts: layers.10 .. 12, not .. 2
        short = f"{layers[0]} .. {layers[-1][len(prefix):]} ({len(layers)})"
    label = f"stage {stage.get('stage')}: {short}"
    return label if len(label) <= 40 else label[:39] + "…"


def _mesh_svg(dp: int, pp: int, tp: int, stages: list[Record]) -> str:
    """dp rows x pp columns of cells, each holding its tp ranks; each column headed by its stages."""
    by_pp = {p: [s for s in stages if s.get("pp_rank", s.get("stage", 0) % pp) == p] for p in range(pp)}
    box, pad, left = 52, 10, 92
    col = max(tp * box + 2 * pad, 130, *(7.2 * len(_layers_label(s)) + 20 for s in stages))  # 13 px text
    head, row, rows = 30 + 18 * max(map(len, by_pp.values())), box + 2 * pad + 8, min(dp, MAX_REPLICAS)
    width, height = left + pp * col, head + rows * row
    hues = ["#DCE6F5", "#FBE3D3", "#DDEFDF", "#EDE1F3", "#F8F0CF", "#DDEFF0", "#F4DCE3", "#E8E8E8"]
    svg = [f'<svg class="mesh" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="mesh" style="min-width:{int(0.7 * width)}px">']  # shrinks to fit, down to 70 %, then scrolls
    for p in range(pp):
        x = left + p * col + col / 2
        svg.append(f'<text x="{x}" y="18" class="axis">pp rank {p}</text>')
        for i, stage in enumerate(by_pp[p]):
            layers = ", ".join(map(str, stage.get("layers") or []))
            svg.append(f'<text x="{x}" y="{38 + 18 * i}" class="stage"><title>{_e(layers)}</title>'
                       f'{_e(_layers_label(stage))}</text>')
    for d in range(rows):
        y = head + d * row
        svg.append(f'<text x="8" y="{y + (row - 8) / 2}" class="replica">dp rank {d}</text>')
        for p in range(pp):
            x = left + p * col + 4
            svg.append(f'<rect x="{x}" y="{y}" width="{col - 8}" height="{row - 8}" rx="6" '
                       f'fill="{hues[p % len(hues)]}"/>')
            for t in range(tp):
                bx = x + (col - 8 - tp * box) / 2 + t * box + 3
                cx, cy = bx + box / 2 - 3, y + pad + box / 2
                rank = (d * pp + p) * tp + t
                svg.append(f'<rect x="{bx}" y="{y + pad + 3}" width="{box - 6}" height="{box - 6}" rx="4" '
                           f'class="rank"/><text x="{cx}" y="{cy - 5 * (tp > 1)}" class="num">{rank}</text>')
                if tp > 1:
                    svg.append(f'<text x="{cx}" y="{cy + 13}" class="tp">tp {t}</text>')
    return "".join(svg) + "</svg>"


def _predicted(run: Run) -> str:
    predicted = run.info.get("predicted")
    if not isinstance(predicted, dict) or not isinstance(predicted.get("step_s"), (int, float)):
        return _missing("A prediction", "run.json holds one when the planner chose the plan (`--plan auto`)")
    steady = rundir.steady(run.steps)
    measured = rundir.median(steady, "step_s")
    error = f"{(measured / predicted['step_s'] - 1) * 100:+.0f} %" if measured else "n/a"
    rows = [("step time (ms)", _num(predicted["step_s"] * 1e3, 2), _num(measured and measured * 1e3, 2), error)]
    if isinstance(predicted.get("samples_per_s"), (int, float)):
        rows.append(("samples/s", _num(predicted["samples_per_s"]), _num(rundir.median(steady, "samples_per_s")), ""))
    batches = collections.Counter(s["rows"] for s in steady if s.get("rows") is not None).most_common(1)
    return (_table(rows, ("", "predicted", f"measured ({_span_text(steady)})", "error"))
            + (f"<p>Batch: {_e(predicted.get('batch'))} predicted, {_e(batches[0][0])} measured.</p>"
               if batches else ""))


def _timeline(run: Run, charts: dict[str, str]) -> str:
    figures, text = (run.trace.get("meshwise") or {}).get("bubble") or {}, []
    if figures:
        pct = {k: f"{v:.1%}" if isinstance(v, (int, float)) and v == v else "n/a" for k, v in figures.items()}
        text.append(_table([
            ("bubble measured", pct.get("measured")),
            ("bubble theoretical: (p - 1) / (v m + p - 1)", pct.get("theoretical")),
            ("pipeline ranks p", figures.get("pp")), ("stages per rank v", figures.get("stages_per_rank")),
            ("micro-batches m", figures.get("microbatches")), ("steps measured", figures.get("steps"))]))
    if "trace" in charts:
        text.append(_img(charts, "trace", "pipeline timeline"))
    if run.trace:
        text.append("<p>trace.json in the run directory opens in chrome://tracing or ui.perfetto.dev.</p>")
    return "".join(text) or _missing("The pipeline timeline", "run with `meshwise run --trace DIR ...`, copied into the run directory (or "
                                                               "`meshwise demo --model gpt --trace DIR`)")


CSS = """
body{font:15px/1.45 system-ui,"DejaVu Sans",sans-serif;color:#222;max-width:960px;margin:24px auto;padding:0 16px}
h1{font-size:24px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:30px}
table{border-collapse:collapse;margin:8px 0} th{background:#f4f4f4} .missing{color:#777;font-style:italic}
td,th{border:1px solid #ddd;padding:3px 10px;text-align:left;vertical-align:top} .scroll{overflow-x:auto}
img{max-width:100%;display:block;margin:8px 0} svg.mesh{font-family:inherit;max-width:100%;height:auto}
svg .axis{font-weight:600;font-size:15px;text-anchor:middle} svg .stage{font-size:13px;text-anchor:middle;fill:#444}
svg .replica{font-size:14px;font-weight:600;dominant-baseline:middle} svg .rank{fill:#fff;stroke:#777}
svg .num{font-size:17px;font-weight:700;text-anchor:middle;dominant-baseline:middle}
svg .tp{font-size:10px;text-anchor:middle;fill:#666}
"""

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
    body = "".join(f'<section id="{name.lower().replace(" ", "-")}"><h2>{name}</h2>{content}</section>'
                   for name, content in sections)
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style><script>{SCRIPT}</script></head>\n"
            f"<body><h1>{_e(title)}</h1><p>{_e(run.path)}</p>{body}</body></html>\n")
