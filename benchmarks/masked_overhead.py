"""Train-step time and peak memory of the masked (pruning) model against the stock model, side by side.

Both sides are LLM-Foundry Composer models over the same HF weights: foundry's `hf_causal_lm` (stock) and
drpruning's `drpruning_causal_lm` with all four pruning modules (masked). One train step = forward, loss
(+ Lagrangian), backward, AdamW step. Steps alternate between the two models in one process so machine
noise hits both alike; the figure of merit is the ratio of medians.

    .venv/bin/python benchmarks/masked_overhead.py                 # CPU fp32, ~100M-parameter Llama shape
    .venv/bin/python benchmarks/masked_overhead.py --device cuda   # bf16 autocast on a GPU
    .venv/bin/python benchmarks/masked_overhead.py --pair masked distill   # the cost of a distillation teacher

`distill` is the masked model with `distillation: {teacher: source, weight: 0.5, temperature: 2.0}`: one
more forward (no graph) of the source model per step, and the teacher's weights held beside the student's.
Peak memory: on CUDA, max_memory_allocated per model (each measured alone); on CPU, peak RSS of a fresh
subprocess per model (`--memory-only stock|masked`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drpruning.demo.tiny import make_tiny_tokenizer

KINDS = ("stock", "masked", "distill")
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2048)
TARGET = {"n_layers": 9, "hidden_size": 512, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024}


def build(kind: str, model_dir: Path, tokenizer_dir: Path, device: str):
    from llmfoundry.models.hf.hf_causal_lm import ComposerHFCausalLM
    from transformers import AutoTokenizer

    from drpruning.pruning.model import DRPruningCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(tokenizer=tokenizer, pretrained_model_name_or_path=str(model_dir), pretrained=True,
                  use_train_metrics=False, attn_implementation="sdpa")
    if kind == "stock":
        model = ComposerHFCausalLM(**common)
    else:
        distillation = {"teacher": "source", "weight": 0.5, "temperature": 2.0} if kind == "distill" else None
        model = DRPruningCausalLM(**common, l0_module={"target": TARGET, "lagrangian_warmup": 100},
                                  distillation=distillation)  # fmt: skip
        model.l0_module.train_step = 10
    model = model.to(device).train()
    groups = [{"params": [p for n, p in model.named_parameters() if "l0_module" not in n and p.requires_grad],
               "lr": 1e-4}]  # fmt: skip
    if kind != "stock":
        groups += [{"params": list(model.l0_module.gates.parameters()), "lr": 1.0},
                   {"params": list(model.l0_module.lambda_1.parameters()) + list(model.l0_module.lambda_2.parameters()),
                    "lr": -1.0}]
    return model, torch.optim.AdamW(groups, weight_decay=0.0)


def step(model, optimizer, batch, device: str) -> None:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    with autocast:
        outputs = model(batch)
        loss = model.loss(outputs, batch)
    total = loss["total"] if isinstance(loss, dict) else loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()


def make_batch(batch_size: int, seq_len: int, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, SHAPE["vocab_size"], (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device),
            "domain": torch.zeros(batch_size, dtype=torch.long, device=device)}


def prepare(root: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(root / "model")
    make_tiny_tokenizer(root / "tokenizer")
    return root / "model", root / "tokenizer"


def peak_rss_mib(kind: str, args: argparse.Namespace, root: Path) -> float:
    command = [sys.executable, __file__, "--memory-only", kind, "--root", str(root), "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--device", args.device]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--memory-only", choices=KINDS)
    parser.add_argument("--pair", nargs=2, choices=KINDS, default=["stock", "masked"], metavar=("BASE", "OTHER"),
                        help="the two models compared; ratios are OTHER / BASE")
    parser.add_argument("--root", type=Path)
    args = parser.parse_args()

    if args.memory_only:
        # ru_maxrss survives fork + exec, so a child of a parent that held both models would report the
        # parent's peak: reset the high-water mark and read VmHWM instead.
        Path("/proc/self/clear_refs").write_text("5")
        model, optimizer = build(args.memory_only, args.root / "model", args.root / "tokenizer", args.device)
        batch = make_batch(args.batch_size, args.seq_len, args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step(model, optimizer, batch, args.device)
        if args.device == "cuda":
            print(torch.cuda.max_memory_allocated() / 2**20)
        else:
            status = Path("/proc/self/status").read_text().splitlines()
            print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, tokenizer_dir = prepare(root)
        base, other = args.pair
        models = {kind: build(kind, model_dir, tokenizer_dir, args.device) for kind in (base, other)}
        params = sum(p.numel() for n, p in models[base][0].model.named_parameters())
        batch = make_batch(args.batch_size, args.seq_len, args.device)
        times: dict[str, list[float]] = {base: [], other: []}
        for index in range(args.steps + 1):
            for kind in ((base, other) if index % 2 == 0 else (other, base)):
                start = time.perf_counter()
                step(*models[kind], batch, args.device)
                if index > 0:  # the first round warms up allocators and kernels
                    times[kind].append(time.perf_counter() - start)
        del models
        memory = {kind: peak_rss_mib(kind, args, root) for kind in (base, other)}
    stock, masked = statistics.median(times[base]), statistics.median(times[other])
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "precision": "bf16 autocast" if args.device == "cuda" else "fp32",
        "params": params, "batch": f"{args.batch_size}x{args.seq_len}", "steps": args.steps,
        "ratios": f"{other} / {base}",
        "step_time_ratio": round(masked / stock, 3),
        "peak_memory_ratio": round(memory[other] / memory[base], 3),
        "tokens_per_s_ratio": round(stock / masked, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
