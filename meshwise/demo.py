"""The digits demo: a small classifier trained with data parallelism, start to finish.

    meshwise demo                        # 2 workers, dp=2, on the CPU
    meshwise demo --nproc 4 --epochs 5
    python -m meshwise.demo              # the same script in one process

scikit-learn ships the 8x8 UCI digits (1,797 images), so nothing is downloaded. The
script uses only the public API: a user's training script looks like this one.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import meshwise as mw
from meshwise.observe import Progress, RunDir, default_run_dir


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as (x_train, y_train, x_test, y_test): 80/20 split, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the demo needs scikit-learn for its bundled digits data: pip install 'meshwise[demo]'") from None
    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32) / 16.0  # (N, 64)
    y = torch.tensor(raw.target, dtype=torch.long)  # (N,)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split across replicas")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=None, help="run directory (default runs/demo-TIMESTAMP-XXXX)")
    args = parser.parse_args(argv)
    wall_start = time.perf_counter()
    out = args.out or default_run_dir("demo")

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    engine = mw.parallelize(
        model(),
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr),
        sample=(x_train[:2], y_train[:2]),
        run_dir=out,  # metrics.jsonl: loss, throughput, step time and memory of every step
    )
    run = RunDir(out, enabled=engine.is_main)
    if engine.is_main:
        print(f"meshwise demo: plan {engine.plan} on {engine.world_size} process(es), {engine.device}; "
              f"{len(x_train)} training and {len(x_test)} held-out digits")

    steps_per_epoch = -(-len(x_train) // args.batch_size)
    bar = Progress(args.epochs * steps_per_epoch, enabled=engine.is_main, desc="training")
    start = time.perf_counter()
    seen = 0
    for epoch in range(args.epochs):
        batches = engine.loader((x_train, y_train), args.batch_size, shuffle=True, seed=0, epoch=epoch)
        for i, batch in enumerate(batches):
            loss = engine.step(batch)
            seen += min(args.batch_size, len(x_train) - i * args.batch_size)
            bar.update(loss=f"{loss:.4f}")
        bar.write(f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss:.4f}")
    train_s = time.perf_counter() - start
    bar.close()

    logits = engine.predict(x_test)
    accuracy = (logits.argmax(dim=1) == y_test).float().mean().item()
    summary = {
        "plan": engine.plan.to_dict(),
        "world_size": engine.world_size,
        "device": str(engine.device),
        "epochs": args.epochs,
        "steps": engine.steps,
        "accuracy": accuracy,
        "samples_per_s": seen / train_s,
        "train_s": train_s,
        "wall_s": time.perf_counter() - wall_start,
        "final_loss": loss,
    }
    run.summary(**summary)
    if engine.is_main:
        print(f"held-out accuracy {accuracy:.4f}   {seen / train_s:,.0f} samples/s   training {train_s:.1f} s")
        print(f"run directory: {run.path} (metrics.jsonl, summary.json); meshwise report {run.path} writes its report")
    return summary


if __name__ == "__main__":
    main()
