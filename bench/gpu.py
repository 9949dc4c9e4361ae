"""One GPU: meshwise against a plain PyTorch loop, and what bf16 and recomputation buy.

    python bench/gpu.py                      # a 124M-parameter GPT, 16 x 1024 tokens a step
    python bench/gpu.py --layers 2 --hidden 64 --context 64 --vocab 256 --batch 4   # a quick look

Needs CUDA (it says so and stops without it; ``--device cpu`` runs the same code on the
CPU, to check the script, with memory figures left at 0). The model is meshwise's GPT (tied
embeddings, ``scaled_dot_product_attention``) with AdamW. Each side trains ``--steps``
timed steps after 3 warm-up steps, in alternating rounds, in this one process:

* **plain**: ``loss_fn(model(x), y).backward(); opt.step(); loss.item()`` (with
  ``torch.autocast`` for bf16), what a user writes without meshwise;
* **meshwise**: ``parallelize(model, "dp=1[,precision=bf16][,checkpointing=true]")`` and
  ``engine.step`` (DDP over NCCL with one rank, the loss returned as a float).

Printed: median step time, tokens/s and peak GPU memory (``max_memory_allocated``) per
configuration; the ratio meshwise / plain (overhead, fp32 and bf16); bf16's speed-up
and memory against fp32; what recomputation (``checkpointing=true``) saves in peak
memory and costs in time; and the saved-activation bytes of one block with and without
it (saved-tensor hooks). fp32 matmuls stay full fp32 (PyTorch's default: no TF32).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import meshwise as mw
from meshwise import memory
from meshwise.gpt import GPT, GPTConfig, lm_loss


def build(cfg: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg)


def batches(cfg: GPTConfig, batch: int, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        t = torch.randint(0, cfg.vocab, (batch, cfg.context + 1), generator=g)
        out.append((t[:, :-1].to(device), t[:, 1:].to(device)))
    return out


def plain_side(cfg: GPTConfig, device: torch.device, bf16: bool):
    model = build(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def meshwise_side(cfg: GPTConfig, device: torch.device, plan: str):
    engine = mw.parallelize(build(cfg), plan, loss_fn=lm_loss, device=device.type,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        return engine.step((x, y))

    return step


def measure(make, data: list, steps: int, rounds: int, gpu: bool) -> tuple[float, int]:
    """Median step seconds over ``rounds`` blocks of ``steps`` steps, and the peak memory."""
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = make()
    for x, y in data[:3]:
        step(x, y)
    times = []
    for _ in range(rounds):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(steps):
            x, y = data[i % len(data)]
            step(x, y)
        if gpu:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps)
    peak = torch.cuda.max_memory_allocated() if gpu else 0
    del step
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return statistics.median(times), peak


def block_activation_bytes(cfg: GPTConfig, batch: int, device: torch.device, checkpointing: bool) -> int:
    model = build(cfg).to(device)
    if checkpointing:
        memory.checkpoint_blocks(model)
    x = torch.randint(0, cfg.vocab, (batch, cfg.context), device=device)
    h = model.wte(x) + model.wpe(torch.arange(cfg.context, device=device))
    return memory.saved_activation_bytes(model.blocks[0], (h,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py needs CUDA, and there is none here: nothing measured (--device cpu checks the script)")
        return
    gpu = args.device == "cuda"
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    cfg = GPTConfig(vocab=args.vocab, context=args.context, layers=args.layers, hidden=args.hidden, heads=args.heads)
    params = sum(p.numel() for p in build(cfg).parameters())
    tokens = args.batch * args.context
    print(f"{torch.cuda.get_device_name(device) if gpu else 'CPU'}, torch {torch.__version__}; GPT {params / 1e6:.1f}M parameters, "
          f"{args.batch} x {args.context} tokens a step, AdamW; {args.rounds} rounds of {args.steps} steps")
    data = batches(cfg, args.batch, 4, device)
    configs = {
        "plain fp32": lambda: plain_side(cfg, device, bf16=False),
        "meshwise fp32": lambda: meshwise_side(cfg, device, "dp=1"),
        "plain bf16": lambda: plain_side(cfg, device, bf16=True),
        "meshwise bf16": lambda: meshwise_side(cfg, device, "dp=1,precision=bf16"),
        "meshwise fp32 + recompute": lambda: meshwise_side(cfg, device, "dp=1,checkpointing=true"),
        "meshwise bf16 + recompute": lambda: meshwise_side(cfg, device, "dp=1,precision=bf16,checkpointing=true"),
    }
    results = {name: measure(make, data, args.steps, args.rounds, gpu) for name, make in configs.items()}
    print(f"\n{'configuration':<28}{'step ms':>10}{'tokens/s':>12}{'peak GiB':>10}")
    for name, (seconds, peak) in results.items():
        print(f"{name:<28}{seconds * 1e3:>10.1f}{tokens / seconds:>12,.0f}{peak / 2**30:>10.2f}")

    def ratio(a: str, b: str, which: int = 0) -> float:
        return results[a][which] / results[b][which]

    print(f"\nmeshwise / plain step time: fp32 {ratio('meshwise fp32', 'plain fp32'):.3f}, "
          f"bf16 {ratio('meshwise bf16', 'plain bf16'):.3f}")
    if gpu:
        print(f"bf16 / fp32 (meshwise): step time {ratio('meshwise bf16', 'meshwise fp32'):.3f}, "
              f"peak memory {ratio('meshwise bf16', 'meshwise fp32', 1):.3f}")
        print(f"recompute / not (meshwise): fp32 step time {ratio('meshwise fp32 + recompute', 'meshwise fp32'):.3f}, "
              f"peak memory {ratio('meshwise fp32 + recompute', 'meshwise fp32', 1):.3f}; "
              f"bf16 step time {ratio('meshwise bf16 + recompute', 'meshwise bf16'):.3f}, "
              f"peak memory {ratio('meshwise bf16 + recompute', 'meshwise bf16', 1):.3f}")
    full = block_activation_bytes(cfg, args.batch, device, checkpointing=False)
    kept = block_activation_bytes(cfg, args.batch, device, checkpointing=True)
    print(f"saved-activation bytes of one block: {full / 2**20:.1f} MiB, with recomputation {kept / 2**20:.1f} MiB "
          f"({kept / full:.3f})")


if __name__ == "__main__":
    main()
