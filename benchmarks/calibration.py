"""Cost of the importance calibration pass (drpruning/pruning/importance.py) relative to one pruning train step.

One train step = the masked model's (`drpruning_causal_lm` with all four pruning modules) forward, loss +
Lagrangian, backward and AdamW step at the run's batch. The calibration pass = `compute_importance` over
`--num-sequences` sequences (forward only, the measurement hooks on), as `l0_module.init: importance`
runs it once before training. Time: median of alternating repeats in one process (wall and CPU time, the
machine may be shared); peak memory: a fresh subprocess per side that loads the model, then resets the
peak (CPU: /proc/self/clear_refs, VmHWM; CUDA: reset_peak_memory_stats) and runs that side alone, so the
peak is not the loading's. The report gives each side's peak and what it adds over the loaded model.

    .venv/bin/python benchmarks/calibration.py --model runs/demo/source           # the demo's settings
    .venv/bin/python benchmarks/calibration.py                                    # random ~125M Llama
    .venv/bin/python benchmarks/calibration.py --model DIR --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2048)
RANDOM_TARGET = {"n_layers": 9, "hidden_size": 512, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024}
DEMO_TARGET = {"n_layers": 20, "hidden_size": 384, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024}


def prepare(root: Path) -> Path:
    """A random ~125M Llama with a tiny tokenizer in `root/model` (when no --model is given)."""
    from drpruning.demo.tiny import make_tiny_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(root / "model")
    make_tiny_tokenizer(root / "model")
    return root / "model"


def build(model_dir: Path, target: dict, device: str):
    from transformers import AutoTokenizer

    from drpruning.pruning.model import DRPruningCausalLM

    model = DRPruningCausalLM(tokenizer=AutoTokenizer.from_pretrained(model_dir),
                              pretrained_model_name_or_path=str(model_dir), pretrained=True, use_train_metrics=False,
                              l0_module={"target": target, "lagrangian_warmup": 100})  # fmt: skip
    model.l0_module.train_step = 10
    model = model.to(device).train()
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if "l0_module." not in n], "lr": 1e-4},
              {"params": [p for n, p in named.items() if "l0_module.gates." in n], "lr": 1.0},
              {"params": [p for n, p in named.items() if "l0_module.lambda_" in n], "lr": -1.0}]  # fmt: skip
    return model, torch.optim.AdamW(groups, weight_decay=0.0)


def train_step(model, optimizer, batch: dict, device: str) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model.loss(model(batch), batch)["total"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()


def calibration_pass(model, sequences: torch.Tensor, batch_size: int, device: str) -> None:
    from drpruning.pruning.importance import compute_importance

    compute_importance(model.model, sequences, batch_size=batch_size, device=device)


def tokens(rows: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(seed))


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def peak_memory_mib(run, device: str) -> tuple[float, float]:
    """(peak while `run` runs, resident before it) in MiB: CUDA allocated memory, else process RSS."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() / 2**20, before / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    before = _status_kib("VmRSS")
    run()
    return _status_kib("VmHWM") / 1024, before / 1024


def timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model dir with tokenizer (default: a random ~125M Llama)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=4, help="train batch (sequences per step)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-sequences", type=int, default=32, help="calibration sequences")
    parser.add_argument("--calibration-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--target", nargs="+", metavar="KEY=VALUE",
                        help="pruning target of the train step (default: the demo's with --model, else 9/512/6/2/1024)")
    parser.add_argument("--memory-only", choices=["train", "calibrate"])
    args = parser.parse_args()
    from drpruning.export.one_shot import parse_target

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or prepare(Path(tmp))
        target = parse_target(args.target) if args.target else DEMO_TARGET if args.model else RANDOM_TARGET
        model, optimizer = build(model_dir, target, args.device)
        vocab = model.model.config.vocab_size
        batch_ids = tokens(args.batch_size, args.seq_len, vocab, 0).to(args.device)
        batch = {"input_ids": batch_ids, "labels": batch_ids.clone(),
                 "domain": torch.zeros(args.batch_size, dtype=torch.long, device=args.device)}  # fmt: skip
        sequences = tokens(args.num_sequences, args.seq_len, vocab, 1)
        sides = {
            "train": lambda: train_step(model, optimizer, batch, args.device),
            "calibrate": lambda: calibration_pass(model, sequences, args.calibration_batch_size, args.device),
        }
        if args.memory_only:
            repeat = 2 if args.memory_only == "train" else 1  # the second step holds the Adam state
            peak, before = peak_memory_mib(lambda: [sides[args.memory_only]() for _ in range(repeat)], args.device)
            print(json.dumps({"peak": peak, "loaded": before}))
            return
        sides["train"]()  # warm-up: allocators, kernels, Adam state
        times: dict[str, list[tuple[float, float]]] = {"train": [], "calibrate": []}
        for index in range(args.repeats):
            for side in (("train", "calibrate") if index % 2 == 0 else ("calibrate", "train")):
                times[side].append(timed(sides[side]))
        params = sum(p.numel() for p in model.model.parameters())
        base = [sys.executable, __file__, "--device", args.device, "--batch-size", str(args.batch_size),
                "--seq-len", str(args.seq_len), "--num-sequences", str(args.num_sequences),
                "--calibration-batch-size", str(args.calibration_batch_size)]  # fmt: skip
        if args.model:
            base += ["--model", str(args.model)]
        if args.target:
            base += ["--target", *args.target]
        memory = {side: json.loads(subprocess.run([*base, "--memory-only", side], check=True, capture_output=True,
                                                  text=True).stdout.strip().splitlines()[-1])
                  for side in ("train", "calibrate")}  # fmt: skip

    median = {side: [statistics.median(t[i] for t in values) for i in (0, 1)] for side, values in times.items()}
    report = {
        "model": str(args.model or "random Llama"), "params": params,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "train_batch": f"{args.batch_size}x{args.seq_len}",
        "calibration": f"{args.num_sequences}x{args.seq_len} in batches of {args.calibration_batch_size}",
        "train_step_s": {"wall": round(median["train"][0], 2), "cpu": round(median["train"][1], 2)},
        "calibration_s": {"wall": round(median["calibrate"][0], 2), "cpu": round(median["calibrate"][1], 2)},
        "time_ratio_wall": round(median["calibrate"][0] / median["train"][0], 2),
        "time_ratio_cpu": round(median["calibrate"][1] / median["train"][1], 2),
        "peak_memory_mib": {side: round(value["peak"]) for side, value in memory.items()},
        "added_over_loaded_model_mib": {side: round(value["peak"] - value["loaded"]) for side, value in memory.items()},
        "peak_memory_ratio": round(memory["calibrate"]["peak"] / memory["train"]["peak"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
