"""Does the Lagrangian controller track its target? A simulation with the project's own `L0Module`.

The gates and multipliers train with the recipe's optimizer (DecoupledAdamW, the gates' and the multipliers'
learning rates, the cosine-with-warmup schedule scaling both) against a synthetic task loss that wants every
gate open: per unit, `pull * importance * (1 - z)`, with importance drawn once per unit (log-normal), so
units differ in how hard they resist as real ones do. What it measures is the min-max game alone: how far
the expected sparsity strays from the scheduled target once the ramp is over, and how far it overshoots.

    .venv/bin/python benchmarks/controller_sim.py --schedule demo            # SmolLM2-135M -> 50M, 100 steps
    .venv/bin/python benchmarks/controller_sim.py --schedule paper           # 7B -> 1.3B, 3,200 steps

Each schedule is run with the paper's start (multipliers from 0) and the stiff start
(`init_lambda_2`), for several task-loss strengths and seeds; the table gives, per controller, the worst
over modules, pulls and seeds of: |expected - scheduled| from 5 steps after the ramp, max(expected - final),
and the expected parameter count at the last step against the target.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drpruning.pruning.masks import L0Module  # noqa: E402
from drpruning.pruning.shapes import ModelShape  # noqa: E402

SMOLLM2 = ModelShape(n_layers=30, hidden_size=576, n_heads=9, n_kv_heads=3, head_dim=64, intermediate_size=1536,
                     vocab_size=49152, tie_embeddings=True)  # fmt: skip
LLAMA2_7B = ModelShape(n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=32, head_dim=128,
                       intermediate_size=11008, vocab_size=32000)  # fmt: skip
GATE_BETAS = (0.9, 0.95)
SCHEDULES = {
    # name: (source, target, steps, ramp, warmup, gate lr, lambda lr)
    "demo": (SMOLLM2, {"n_layers": 20, "hidden_size": 384, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024},
             100, 40, 10, 0.5, 5.0),
    "paper": (LLAMA2_7B, {"n_layers": 24, "hidden_size": 2048, "n_heads": 16, "n_kv_heads": 16,
                          "intermediate_size": 5504}, 3200, 640, 320, 1.0, 1.0),
}


def lr_factor(step: int, steps: int, warmup: int, alpha_f: float = 0.1) -> float:
    """Composer's cosine_with_warmup: linear warmup, then cosine down to alpha_f."""
    if step < warmup:
        return (step + 1) / warmup  # Composer's warmup never hands the optimizer an lr of exactly 0
    frac = (step - warmup) / max(1, steps - warmup)
    return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * frac))


def simulate(source: ModelShape, target: dict, steps: int, ramp: int, warmup: int, gate_lr: float,
             lambda_lr: float, init_lambda_2: float, pull: float, seed: int) -> dict[str, float]:
    from composer.optim import DecoupledAdamW

    torch.manual_seed(seed)
    l0 = L0Module(source, target, lagrangian_warmup=ramp, init_lambda_2=init_lambda_2)
    l0.noise_seed = seed
    importance = {m: torch.randn_like(g).mul(0.5).exp() for m, g in l0.gates.items()}
    groups = [
        {"params": list(l0.gates.parameters()), "lr": gate_lr, "betas": GATE_BETAS},
        {"params": list(l0.lambda_1.parameters()) + list(l0.lambda_2.parameters()), "lr": -lambda_lr},
    ]
    opt = DecoupledAdamW(groups, lr=gate_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    worst_track, worst_over = 0.0, -1.0
    for step in range(steps):
        for group, lr in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr * lr_factor(step, steps, warmup)
        l0.train_step = step
        masks, lagrangian, stats = l0()
        task = sum(pull * (importance[m] * (1 - z)).mean() for m, z in masks.items())
        opt.zero_grad()
        (task + lagrangian).backward()
        opt.step()
        l0.clamp_log_alpha_()
        final = l0.final_sparsity
        scheduled = l0.target_sparsity(step)
        for m in l0.pruning_modules:
            expected = float(stats[f"expected_sparsity/{m}"])
            worst_over = max(worst_over, expected - final[m])
            if step >= ramp + 5:
                worst_track = max(worst_track, abs(expected - scheduled[m]))
    params_gap = float(stats["expected_params"]) / l0.target.num_params() - 1.0
    return {"track": worst_track, "over": worst_over, "params": params_gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="demo")
    parser.add_argument("--init-lambda-2", type=float, nargs="+", default=[0.0, 1000.0])
    parser.add_argument("--pulls", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lambda-lr", type=float, help="override the schedule's multiplier lr")
    args = parser.parse_args()
    source, target, steps, ramp, warmup, gate_lr, lambda_lr = SCHEDULES[args.schedule]
    lambda_lr = args.lambda_lr if args.lambda_lr is not None else lambda_lr
    print(f"schedule {args.schedule}: {steps} steps, ramp {ramp}, warmup {warmup}, gate lr {gate_lr}, "
          f"lambda lr {lambda_lr}; pulls {args.pulls}, seeds {args.seeds}")
    print("| init_lambda_2 | pull | max abs(expected - scheduled) from ramp+5 | max(expected - final) "
          "| expected params / target - 1 (last step) |")
    print("|---:|---:|---:|---:|---:|")
    for lam2 in args.init_lambda_2:
        for pull in args.pulls:
            runs = [simulate(source, target, steps, ramp, warmup, gate_lr, lambda_lr, lam2, pull, seed)
                    for seed in args.seeds]
            print(f"| {lam2:g} | {pull:g} | {max(r['track'] for r in runs):.4f} | {max(r['over'] for r in runs):+.4f} "
                  f"| {max((r['params'] for r in runs), key=abs):+.4f} |", flush=True)


if __name__ == "__main__":
    main()
