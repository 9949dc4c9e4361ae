"""The ``meshwise`` command: ``run`` a script on many workers, ``demo`` one that teaches,
``verify`` that a plan trains like one process, ``report`` on a run, ``plan`` and ``export``.

A bad argument or plan is one line on stderr and exit code 2, before any worker starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from meshwise.dist import DEVICE_CHOICES
from meshwise.launch import Job, run_command
from meshwise.plan import Plan


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_launch_options(parser: argparse.ArgumentParser, *, nproc_default: int | None) -> None:
    parser.add_argument("--nproc", type=int, default=nproc_default,
                        help="workers on this host (default: the plan's world size, else 1)")
    parser.add_argument("--plan", help="how to split the work, e.g. dp=2,microbatches=4, or auto: profiled and "
                                       "searched (default: dp = nproc)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=None,
                        help="cpu forces the CPU; auto (default) uses one GPU per worker where the host has enough")


def _add_output_options(parser: argparse.ArgumentParser, *, run_dir: bool = True) -> None:
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("--quiet", action="store_true", help="no progress bars or meshwise notes; other ranks' "
                      "output only when it is a warning or an error (stderr)")
    talk.add_argument("--verbose", action="store_true", help="every rank's output, marked with its rank, and the "
                      "launcher's own log")
    if run_dir:
        parser.add_argument("--run-dir", metavar="DIR", help="where the run is recorded: plan, host, metrics.jsonl "
                            "(default runs/NAME-TIMESTAMP-XXXX); see meshwise report")
        parser.add_argument("--tensorboard", action="store_true", help="also write the metrics as TensorBoard event "
                            "files in RUN_DIR/tensorboard (needs the tensorboard package)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshwise", description="Split PyTorch training and inference across processes and devices.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a training script on many workers", allow_abbrev=False,
                         description="Run SCRIPT on --nproc workers per host (torch elastic launch).")
    _add_launch_options(run, nproc_default=None)
    run.add_argument("--nnodes", type=int, default=1, help="hosts in the job (default 1)")
    run.add_argument("--node-rank", type=int, default=0, help="this host's index; host 0 serves the rendezvous")
    run.add_argument("--rdzv-endpoint", help="HOST:PORT of host 0, reachable by every host (multi-host only)")
    run.add_argument("--max-restarts", type=int, default=0, help="restart all workers up to K times after a failure")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="how long a collective may wait for the other ranks before the job fails (default 600)")
    run.add_argument("--resume", action="store_true", help="parallelize(checkpoint=DIR) loads the latest complete "
                     "checkpoint in DIR (as it does on a restart after a failure)")
    run.add_argument("--trace", metavar="DIR", help="record the pipeline timeline: DIR/trace.json (Chrome trace), "
                     "DIR/trace.png (Gantt chart), and the bubble fraction; also copied to the run directory")
    _add_output_options(run)
    run.add_argument("--no-run-dir", action="store_true", help="record nothing (no run directory)")
    run.add_argument("script", metavar="SCRIPT", help="a Python script, or -m MODULE (a module run as python -m)")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script")

    demo = sub.add_parser("demo", help="train a digits classifier, or a character GPT in a pipeline",
                          description="Train a small classifier on scikit-learn's bundled digits data (--model "
                                      "digits), or a character-level GPT on Python's own help text (--model gpt).")
    _add_launch_options(demo, nproc_default=None)
    demo.add_argument("--model", choices=("digits", "gpt"), default="digits", help="which demo (default digits)")
    demo.add_argument("--epochs", type=int, default=None, help="digits: passes over the training set (default 20)")
    demo.add_argument("--steps", type=int, default=None, help="gpt: training steps (default 500)")
    demo.add_argument("--trace", metavar="DIR", help="gpt: write the pipeline timeline (trace.json, trace.png) to DIR")
    demo.add_argument("--batch-size", type=int, default=None, help="global batch (default 64)")
    demo.add_argument("--out", help="run directory (default runs/demo-TIMESTAMP-XXXX)")
    _add_output_options(demo, run_dir=False)
    demo.add_argument("--tensorboard", action="store_true", help="also write the metrics as TensorBoard event files "
                      "in OUT/tensorboard (needs the tensorboard package)")
    verify = sub.add_parser("verify", help="check that a plan trains a script exactly like one process",
                            allow_abbrev=False,
                            description="Run SCRIPT twice with the same seeds, in one process and under --plan, for "
                                        "--steps steps; compare the losses step by step and the final parameters "
                                        "by name. Exit code 0: PASS, 1: FAIL (with the likely cause), 2: bad input.")
    verify.add_argument("--plan", required=True, action="append", help="a plan to check, e.g. dp=2,pp=2,zero=1; "
                        "give --plan more than once to check several against one reference run")
    verify.add_argument("--nproc", type=int, default=None, help="workers (default: each plan's world size)")
    verify.add_argument("--steps", type=int, default=10, help="training steps to compare (default 10)")
    verify.add_argument("--tolerance", type=float, default=None,
                        help="largest relative difference allowed (default by precision: fp32 1e-4, bf16 5e-2)")
    verify.add_argument("--device", choices=DEVICE_CHOICES, default=None, help="as for meshwise run")
    verify.add_argument("--keep", metavar="DIR", help="keep both runs' records (losses, states, logs) in DIR")
    verify.add_argument("script", metavar="SCRIPT", help="a training script that calls meshwise.parallelize; its own "
                        "arguments follow --: meshwise verify train.py --plan dp=2 -- --lr 0.1")
    report = sub.add_parser("report", help="write an HTML report of a run directory",
                            description="Write RUN_DIR/report.html (self-contained, with PNG charts beside it): loss, "
                                        "throughput, step time, memory per rank, the plan's mesh, predicted against "
                                        "measured, and the pipeline timeline.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by meshwise run or meshwise demo")
    report.add_argument("--out", help="the HTML file (default RUN_DIR/report.html)")
    export = sub.add_parser("export", help="write a checkpoint's model as one safetensors file",
                            description="Write the model of a meshwise checkpoint (a step directory, or a checkpoint "
                                        "directory: its latest complete one) as one safetensors file, loadable "
                                        "without meshwise: safetensors.torch.load_file(OUT).")
    export.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory")
    export.add_argument("out", metavar="OUT", help="the .safetensors file to write")
    plan = sub.add_parser("plan", help="rank plans by predicted step time and memory",
                          description="Search data, pipeline and tensor degrees, ZeRO, schedule, micro-batches and "
                                      "recomputation: for SCRIPT's model, profiled here (one process, stopped "
                                      "before training), or for a transformer described by numbers (--transformer) "
                                      "on simulated hardware.")
    plan.add_argument("script", nargs="?", metavar="SCRIPT", help="a training script that calls meshwise.parallelize")
    plan.add_argument("--transformer", metavar="SPEC", help="layers=..,hidden=..,heads=..,seq=..,vocab=..[,ffn=..]")
    plan.add_argument("--batch", type=int, help="global batch (--transformer: in sequences; SCRIPT: default the "
                                                "sample's rows)")
    plan.add_argument("--devices", type=int, required=True, help="devices in the cluster")
    plan.add_argument("--hardware", help="a100-40gb, a100-80gb, h100, h200 or cpu (--transformer: default h100; "
                                         "SCRIPT: the links assumed, default cpu on this CPU)")
    plan.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                      help="bf16: mixed-precision Adam (--transformer's default); fp32: fp32 Adam (SCRIPT's default: "
                           "the profile runs in fp32)")
    plan.add_argument("--optimizer", choices=("adam", "sgd"), default=None,
                      help="--transformer: the optimizer whose state is counted (default adam; sgd: with momentum)")
    plan.add_argument("--memory", help="memory budget per device, e.g. 40GB (default: the hardware's)")
    plan.add_argument("--evaluate", metavar="SPEC", help="fix these plan fields (dp=..,tp=..,pp=..) and search the rest")
    plan.add_argument("--top", type=int, default=10, help="plans to show (default 10)")
    plan.add_argument("--json", action="store_true", help="print JSON (docs/planner.md) instead of a table")
    plan.add_argument("--chart", metavar="PNG", help="also draw predicted step time against memory to this file")
    return parser


def _plan_command(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    from meshwise.cost import GB, HARDWARE, Workload
    from meshwise.search import dumps, search, table

    if (ns.script is None) == (ns.transformer is None):
        parser.error("plan needs SCRIPT (a training script to profile) or --transformer SPEC" +
                     (", not both" if ns.script is not None else ""))
    if ns.script is not None:
        return _plan_script(parser, ns)
    if ns.batch is None:
        parser.error("plan --transformer needs --batch (the global batch, in sequences)")
    ns.hardware = ns.hardware or "h100"
    ns.precision = ns.precision or "bf16"
    try:
        fields = _spec(ns.transformer, "--transformer", ("layers", "hidden", "heads", "seq", "vocab", "ffn"))
        missing = [k for k in ("layers", "hidden", "heads", "seq", "vocab") if k not in fields]
        if missing:
            raise ValueError(f"--transformer needs {', '.join(missing)} (e.g. layers=32,hidden=4096,heads=32,"
                             f"seq=4096,vocab=32000)")
        work = dataclasses.replace(Workload.transformer(**fields), optimizer=ns.optimizer or "adam")
        if ns.hardware not in HARDWARE:
            raise ValueError(f"--hardware {ns.hardware!r} is unknown: use one of {', '.join(HARDWARE)}")
        hw = HARDWARE[ns.hardware]
        budget = _bytes(ns.memory) if ns.memory else hw.memory
        fixed = Plan.parse(ns.evaluate).to_dict() if ns.evaluate else None
        if fixed is not None:  # only the fields the spec names are fixed
            named = {part.split("=", 1)[0].strip() for part in ns.evaluate.split(",") if part.strip()}
            fixed = {k: v for k, v in fixed.items() if k in named}
        if ns.top < 1:
            raise ValueError(f"--top={ns.top} is invalid: it must be >= 1")
        results = search(work, hw, ns.devices, ns.batch, precision=ns.precision, budget=budget, fixed=fixed)
    except ValueError as error:
        parser.error(str(error))
    if ns.chart:
        from meshwise.search import chart

        chart(results, ns.chart, f"{work.name}: {ns.devices} x {hw.name}, batch {ns.batch}")
    if ns.json:
        print(dumps(results, ns.top))
    else:
        print(f"{work.name}, {work.params / 1e9:.2f}B parameters; {ns.devices} x {hw.name}, "
              f"budget {budget / GB:.1f} GB per device; global batch {ns.batch}; {ns.precision}, {work.optimizer}")
        print(table(results, ns.top, budget))
    return 0


def _plan_script(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    """Run SCRIPT in one process with the search request in its environment: its
    ``parallelize`` profiles the model, prints the ranking and stops the script."""
    import json
    import subprocess

    from meshwise.cost import HARDWARE
    from meshwise.profile import SEARCH_ENV

    if not os.path.isfile(ns.script):
        parser.error(f"script {ns.script!r} not found")
    if ns.hardware is not None and ns.hardware not in HARDWARE:
        parser.error(f"--hardware {ns.hardware!r} is unknown: use one of {', '.join(HARDWARE)}")
    if ns.devices < 1 or ns.top < 1 or (ns.batch is not None and ns.batch < 1):
        parser.error("--devices, --top and --batch must be >= 1")
    if ns.optimizer is not None:
        parser.error("--optimizer applies to --transformer; plan SCRIPT measures the script's own optimizer")
    if ns.precision == "bf16":
        parser.error("plan SCRIPT profiles in fp32 and plans fp32; bf16 planning of a script is not available yet")
    if ns.evaluate:
        try:
            if Plan.parse(ns.evaluate).precision == "bf16":
                parser.error(f"--evaluate {ns.evaluate}: plan SCRIPT profiles in fp32 and plans fp32; bf16 planning "
                             f"of a script is not available yet")
        except ValueError as error:
            parser.error(str(error))
    try:
        budget = _bytes(ns.memory) if ns.memory else None
    except ValueError as error:
        parser.error(str(error))
    request = {"script": ns.script, "devices": ns.devices, "batch": ns.batch, "top": ns.top, "json": ns.json, "hardware": ns.hardware,
               "memory": budget, "evaluate": ns.evaluate, "precision": ns.precision, "chart": ns.chart}
    env = {**os.environ, SEARCH_ENV: json.dumps(request)}
    env.pop("RANK", None)  # one plain process, whatever launched this command
    return subprocess.run([sys.executable, ns.script], env=env).returncode


def _spec(text: str, option: str, names: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise ValueError(f"{option} {text!r}: {part!r} is not one of {', '.join(n + '=N' for n in names)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"{option} {text!r}: {key}={value!r} is not an integer") from None
        if out[key] < 1:
            raise ValueError(f"{option} {text!r}: {key}={value} must be >= 1")
    return out


def _bytes(text: str) -> float:
    units = {"GB": 1e9, "GIB": 2**30, "MB": 1e6, "MIB": 2**20, "TB": 1e12}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            try:
                return float(upper[: -len(unit)]) * factor
            except ValueError:
                break
    raise ValueError(f"--memory {text!r} is not a size such as 16GB, 40GiB or 512MB")


def _job(parser: argparse.ArgumentParser, ns: argparse.Namespace, default_nproc: int, **extra: object) -> tuple[Job, str | None]:
    """The job and plan string, with --nproc and --plan made consistent (or a one-line error)."""
    try:
        if ns.plan is not None and ns.plan.strip() == "auto":  # chosen by the workers (meshwise.profile)
            nproc = ns.nproc if ns.nproc is not None else default_nproc
            return Job(nproc=nproc, **extra), "auto"  # type: ignore[arg-type]
        plan = Plan.parse(ns.plan) if ns.plan is not None else None
        nnodes = extra.get("nnodes", 1)
        nproc = ns.nproc
        if nproc is None:
            nproc = plan.world_size // nnodes if plan else default_nproc
        job = Job(nproc=nproc, **extra)  # type: ignore[arg-type]
        if plan is not None and plan.world_size != job.world_size:
            raise ValueError(
                f"plan {plan} needs {plan.world_size} processes but the job has {job.world_size} "
                f"(nproc={job.nproc} x nnodes={job.nnodes}); make them equal"
            )
        if ns.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    except ValueError as error:
        parser.error(str(error))
    return job, str(plan) if plan is not None else None


_RUN_VALUE_OPTIONS = {"--nproc", "--plan", "--device", "--nnodes", "--node-rank", "--rdzv-endpoint", "--max-restarts",
                      "--timeout", "--trace", "--model", "--run-dir"}


def _module_as_script(argv: list[str]) -> list[str]:
    """``run [OPTIONS] -m MODULE ARGS`` as ``run [OPTIONS] -- -m MODULE ARGS``: argparse
    would read ``-m`` as an option of ``run``; after ``--`` it is the SCRIPT position."""
    if argv[:1] != ["run"]:
        return argv
    i = 1
    while i < len(argv):
        token = argv[i]
        if token == "--":  # already explicit
            break
        if token == "-m":
            return [*argv[:i], "--", *argv[i:]]
        if token in _RUN_VALUE_OPTIONS:
            i += 2
        elif token.startswith("-"):
            i += 1
        else:  # the script: what follows is its own
            break
    return argv


def _talk(ns: argparse.Namespace) -> None:
    """--quiet, --verbose and --tensorboard, for the workers (meshwise.observe reads them)."""
    from meshwise.observe import QUIET_ENV, TENSORBOARD_ENV, VERBOSE_ENV

    for flag, name in ((ns.quiet, QUIET_ENV), (ns.verbose, VERBOSE_ENV), (ns.tensorboard, TENSORBOARD_ENV)):
        if flag:
            os.environ[name] = "1"
    if ns.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            sys.exit("meshwise: --tensorboard needs the tensorboard package: pip install 'meshwise[tensorboard]'")


def _finish_run_dir(ns: argparse.Namespace) -> None:
    """Copy the merged pipeline timeline into the run directory; say where the run is."""
    import shutil

    if ns.trace:
        for name in ("trace.json", "trace.png"):
            source = os.path.join(ns.trace, name)
            if os.path.exists(source) and os.path.abspath(ns.trace) != ns.run_dir:
                shutil.copy(source, os.path.join(ns.run_dir, name))
    if not ns.quiet and os.path.exists(os.path.join(ns.run_dir, "metrics.jsonl")):
        where = os.path.relpath(ns.run_dir)
        where = ns.run_dir if where.startswith("..") else where
        print(f"meshwise: run recorded in {where}; meshwise report {where} writes its HTML report", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The command line. What it sets for the workers (``MESHWISE_*``) is unset again after,
    so a program that calls ``main`` keeps its own environment."""
    saved = dict(os.environ)
    try:
        return _main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if argv[:1] == ["verify"] and "--" in argv:  # verify's options may follow SCRIPT; the script's follow --
        argv, script_args = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    ns = parser.parse_args(_module_as_script(argv))
    if ns.command == "verify":
        ns.args = script_args
    if ns.command == "run":
        job, plan = _job(parser, ns, 1, nnodes=ns.nnodes, node_rank=ns.node_rank,
                         rdzv_endpoint=ns.rdzv_endpoint, max_restarts=ns.max_restarts)
        if ns.script == "-m":
            if not ns.args:
                parser.error("run -m needs a module name")
            command = ["-m", *ns.args]
        else:
            if not os.path.isfile(ns.script):
                parser.error(f"script {ns.script!r} not found")
            command = [ns.script, *ns.args]
        if ns.resume:
            from meshwise.build import RESUME_ENV

            os.environ[RESUME_ENV] = "1"
        if ns.timeout is not None:
            from meshwise.dist import TIMEOUT_ENV, collective_timeout

            try:
                collective_timeout(ns.timeout)
            except ValueError as error:
                parser.error(f"--timeout {ns.timeout:g}: {error}")
            os.environ[TIMEOUT_ENV] = str(ns.timeout)
        _talk(ns)
        if not ns.no_run_dir:
            from meshwise.observe import AGREE, PROGRESS_ENV, RUN_DIR_ENV, RUNS_ENV, default_run_dir

            if ns.run_dir is None and ns.nnodes > 1:  # rank 0 names it, for every host (meshwise.observe)
                os.environ[RUN_DIR_ENV] = AGREE + os.path.abspath(os.environ.get(RUNS_ENV) or "runs")
            else:
                ns.run_dir = os.path.abspath(ns.run_dir or default_run_dir("run"))
                os.environ[RUN_DIR_ENV] = ns.run_dir
            os.environ[PROGRESS_ENV] = "1"
        elif ns.run_dir or ns.tensorboard:
            parser.error("--no-run-dir records nothing: leave out --run-dir and --tensorboard")
        code = run_command(command, job, plan=plan, device=ns.device, trace=ns.trace)
        if ns.run_dir and os.path.isdir(ns.run_dir):
            _finish_run_dir(ns)
        return code
    if ns.command == "verify":
        from meshwise.verify import command

        return command(parser, ns)
    if ns.command == "report":
        from meshwise import report

        try:
            path = report.write(ns.run_dir, ns.out)
        except (ValueError, OSError) as error:
            parser.error(str(error))
        print(f"wrote {path}")
        return 0
    if ns.command == "demo":
        job, plan = _job(parser, ns, 2)
        for name in ("epochs", "batch_size", "steps"):
            value = getattr(ns, name)
            if value is not None and value < 1:
                parser.error(f"--{name.replace('_', '-')}={value} is invalid: it must be >= 1")
        wrong = [f"--{n}" for n, v in (("epochs", ns.epochs), ) if v is not None and ns.model == "gpt"]
        wrong += [f"--{n}" for n, v in (("steps", ns.steps), ("trace", ns.trace)) if v is not None and ns.model == "digits"]
        if wrong:
            parser.error(f"{', '.join(wrong)} does not apply to --model {ns.model}")
        command = ["-m", "meshwise.demo" if ns.model == "digits" else "meshwise.demo_gpt"]
        if ns.epochs is not None:
            command += ["--epochs", str(ns.epochs)]
        if ns.steps is not None:
            command += ["--steps", str(ns.steps)]
        if ns.trace is not None:
            command += ["--trace", ns.trace]
        if ns.batch_size is not None:
            command += ["--batch-size", str(ns.batch_size)]
        from meshwise.observe import default_run_dir

        command += ["--out", ns.out or default_run_dir("demo" if ns.model == "digits" else "gpt")]  # one for all ranks
        _talk(ns)
        return run_command(command, job, plan=plan, device=ns.device)
    if ns.command == "plan":
        return _plan_command(parser, ns)
    if ns.command == "export":
        from meshwise.checkpoint import export

        try:
            count = export(ns.checkpoint, ns.out)
        except (ValueError, OSError) as error:
            parser.error(str(error))
        print(f"wrote {count} tensors to {ns.out}")
        return 0
    parser.error(f"unknown command {ns.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
