"""The GPT demo: a character-level GPT trained on text that ships with Python, in a pipeline.

    meshwise demo --model gpt --plan pp=2              # 2 pipeline stages
    meshwise demo --model gpt --plan dp=2,pp=2 --trace runs/gpt-trace
    python -m meshwise.demo_gpt                        # the same script in one process

The text is the help pages of Python's own ``pydoc_data`` (about 0.7 MB), so nothing
is downloaded. It prints the pipeline's stages, the falling loss, and a sample the
trained model writes.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import meshwise as mw
from meshwise.gpt import GPT, GPTConfig, generate, lm_loss
from meshwise.observe import Progress, RunDir, default_run_dir

VOCAB = [chr(c) for c in range(32, 127)] + ["\n"]  # printable ASCII and newline: 96 characters


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def encode(text: str) -> torch.Tensor:
    index = {ch: i for i, ch in enumerate(VOCAB)}
    unknown = index["?"]
    return torch.tensor([index.get(ch, unknown) for ch in text], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    return "".join(VOCAB[i] for i in ids.tolist())


def windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, next-character target) windows of ``context`` characters."""
    n = (len(ids) - 1) // context
    x = ids[: n * context].view(n, context)
    y = ids[1 : n * context + 1].view(n, context)
    return x, y


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch of windows")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--trace", default=None, help="write the pipeline timeline (trace.json, trace.png) here")
    parser.add_argument("--out", default=None, help="run directory (default runs/gpt-TIMESTAMP-XXXX)")
    args = parser.parse_args(argv)
    out = args.out or default_run_dir("gpt")

    torch.manual_seed(0)
    cfg = GPTConfig(vocab=len(VOCAB), context=64, layers=4, hidden=64, heads=4)
    x, y = windows(encode(corpus()), cfg.context)
    held = len(x) // 20
    x_train, y_train, x_test, y_test = x[held:], y[held:], x[:held], y[:held]
    engine = mw.parallelize(
        GPT(cfg),
        loss_fn=lm_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01),
        sample=(x_train[: args.batch_size], y_train[: args.batch_size]),
        trace=args.trace is not None,
        run_dir=out,  # metrics.jsonl: loss, throughput, step time and memory of every step
    )
    run = RunDir(out, enabled=engine.is_main)
    if engine.is_main:
        print(f"meshwise GPT demo: plan {engine.plan} on {engine.world_size} process(es), {engine.device}; "
              f"{sum(p.numel() for p in engine.model.parameters()):,} parameters; "
              f"{len(x_train):,} windows of {cfg.context} characters from pydoc_data")

    bar = Progress(args.steps, enabled=engine.is_main, desc="training")
    start = time.perf_counter()
    step, epoch, loss = 0, 0, float("nan")
    first = None
    while step < args.steps:
        for batch in engine.loader((x_train, y_train), args.batch_size, seed=0, epoch=epoch, drop_last=True):
            loss = engine.step(batch)
            first = loss if first is None else first
            step += 1
            bar.update(loss=f"{loss:.3f}")
            if step % 50 == 0 or step == 1:
                bar.write(f"step {step:4d}/{args.steps}  loss {loss:.3f}")
            if step == args.steps:
                break
        epoch += 1
    train_s = time.perf_counter() - start
    bar.close()

    logits = engine.predict(x_test[:64])
    held_loss = lm_loss(logits.cpu(), y_test[:64]).item()
    figures = engine.write_trace(args.trace) if args.trace is not None else None
    state = engine.full_state_dict()
    summary = {"plan": engine.plan.to_dict(), "world_size": engine.world_size, "steps": step, "first_loss": first,
               "final_loss": loss, "held_out_loss": held_loss, "train_s": train_s,
               "tokens_per_s": step * args.batch_size * cfg.context / train_s}
    if engine.is_main:
        model = GPT(cfg)
        model.load_state_dict(state)
        prompt = encode("The ")
        text = decode(generate(model, prompt, 200, generator=torch.Generator().manual_seed(0)))
        summary["sample"] = text
        print(f"loss {first:.3f} -> {loss:.3f} in {step} steps ({train_s:.1f} s, "
              f"{summary['tokens_per_s']:,.0f} tokens/s); held-out loss {held_loss:.3f}")
        if figures is not None:
            import shutil

            from meshwise.trace import summary_line

            summary["bubble"] = {k: figures[k] for k in ("measured", "theoretical")}
            print(summary_line(figures))
            for name in ("json", "png"):  # the report shows the timeline from the run directory
                if os.path.abspath(os.path.dirname(figures[name])) != os.path.abspath(run.path):
                    shutil.copy(figures[name], run.path)
        print("sample:\n" + text)
        print(f"run directory: {run.path} (metrics.jsonl, summary.json); meshwise report {run.path} writes its report")
    run.summary(**summary)
    return summary


if __name__ == "__main__":
    main()
