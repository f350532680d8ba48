"""GPU check: the masked (pruning) train step against the stock HF model, side by side on one GPU.

Self-contained on purpose: it needs only torch and transformers (no Composer, LLM-Foundry or streaming), so
it runs from a plain copy of this repository on a bare GPU machine with its own, newer stack (e.g. torch
2.11, transformers 5.x) and no package registry. It imports drpruning's masked forward (`prunable`, `masks`,
`shapes`: torch, numpy and transformers only), so what it measures is the code the recipes train.

Cases (random weights: step time and memory do not depend on them):
- `llama-1.3b`: the 1.3B Llama shape of `yamls/prune_1.3b.yaml`'s target (24 layers, d 2048, 16 heads,
  FFN 5504, vocab 32000; 1.35e9 parameters) at batch 2 × 4096, pruned toward 16 layers, d 1536, 12 heads,
  FFN 4096 with all four pruning modules;
- `smollm2-demo`: the demo's pruning step, SmolLM2-135M's shape (30 layers, d 576, 9 heads / 3 KV groups,
  FFN 1536, vocab 49152, tied embeddings) toward the demo's target, at the demo's batch 4 × 128.

One train step = forward, token cross-entropy (+ the Lagrangian for the masked model), backward, AdamW step
(the masked model also samples its gates and clamps log alpha, as the `pruning` callback does). Precision:
fp32 master weights under bf16 autocast (Composer's `amp_bf16`). Steps alternate between the two models so
clock and thermal drift hit both alike; the figure is the median step time. Peak memory is
`max_memory_allocated` while each model alone builds and warms up (params, grads, AdamW state, activations).
Before any step, the masked model with its masks cleared must give the stock model's logits (the check
that the hooks still fit the installed transformers); the difference is written above the table.

    python benchmarks/gpu_check.py                      # CUDA, bf16; writes benchmarks/gpu_check.md
    python benchmarks/gpu_check.py --quick              # CPU fp32, tiny shapes, a few steps (the test suite)

A 40 GB card holds one 1.3B model in training, not two: `--one-at-a-time auto` (the default) measures each
model alone when both would not fit the free memory, and says so above the table. When Composer and
LLM-Foundry are installed, a last section runs a short pruning run through Composer's FSDP1 with the paper
recipes' settings (PURE bf16, non-reentrant activation checkpointing); without them it says it was skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a bare copy of the repository (no install)
    sys.path.insert(0, str(REPO))

from drpruning.pruning.masks import L0Module  # noqa: E402
from drpruning.pruning.prunable import MaskState, make_prunable  # noqa: E402
from drpruning.pruning.shapes import ModelShape  # noqa: E402

KINDS = ("stock", "masked")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any]  # LlamaConfig keyword arguments
    target: dict[str, int]
    batch_size: int
    seq_len: int


LLAMA_1_3B = Case(
    "llama-1.3b",
    dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
         num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    {"n_layers": 16, "hidden_size": 1536, "n_heads": 12, "n_kv_heads": 12, "intermediate_size": 4096},
    batch_size=2, seq_len=4096,
)
SMOLLM2_DEMO = Case(
    "smollm2-demo",
    dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
         rms_norm_eps=1e-5),
    {"n_layers": 20, "hidden_size": 384, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024},
    batch_size=4, seq_len=128,
)
# --quick: the same two cases shrunk to CPU size (MHA untied and GQA tied, like the real ones).
QUICK_CASES = (
    Case("llama-tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=256, max_position_embeddings=64,
                            tie_word_embeddings=False),
         {"n_layers": 1, "hidden_size": 32, "n_heads": 2, "n_kv_heads": 2, "intermediate_size": 64}, 2, 32),
    Case("smollm2-tiny", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                              num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                              tie_word_embeddings=True),
         {"n_layers": 2, "hidden_size": 32, "n_heads": 3, "n_kv_heads": 1, "intermediate_size": 64}, 2, 32),
)
# Mid-warmup: the Lagrangian and every gate are live, as in most of a pruning run.
TRAIN_STEP, LAGRANGIAN_WARMUP = 50, 100


@dataclasses.dataclass
class Runner:
    """One model with its optimizer and a `step()` that runs one full train step."""

    model: LlamaForCausalLM
    optimizer: torch.optim.Optimizer
    l0: L0Module | None
    masks: MaskState | None
    autocast: Callable[[], contextlib.AbstractContextManager]

    def step(self, input_ids: torch.Tensor) -> float:
        with self.autocast():
            lagrangian = None
            if self.l0 is not None:
                self.l0.train_step = TRAIN_STEP
                sampled, lagrangian, _ = self.l0()
                self.masks.set(sampled)
            logits = self.model(input_ids=input_ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
            total = loss if lagrangian is None else loss + lagrangian
        total.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.l0 is not None:
            self.l0.clamp_log_alpha_()
        return float(loss.detach())


def resolve_attention(requested: str, device: str) -> str:
    """`auto`: flash attention 2 when its package is installed on a GPU, else PyTorch SDPA."""
    if requested != "auto":
        return requested
    if device == "cuda":
        with contextlib.suppress(Exception):
            from transformers.utils import is_flash_attn_2_available

            if is_flash_attn_2_available():
                return "flash_attention_2"
    return "sdpa"


def build(case: Case, kind: str, device: str, attention: str, bf16: bool,
          weights: dict[str, torch.Tensor] | None = None) -> Runner:
    """The stock HF model, or the same weights with drpruning's masked forward and an `L0Module`."""
    config = LlamaConfig(**case.config, attn_implementation=attention)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if weights is not None:
        model.load_state_dict(weights)
    model.train()
    groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "lr": 1e-4}]
    l0 = masks = None
    if kind == "masked":
        shape = ModelShape.from_hf_config(model.config)
        l0 = L0Module(shape, case.target, lagrangian_warmup=LAGRANGIAN_WARMUP).to(device)
        masks = make_prunable(model, shape)
        # As the recipes: masks and multipliers in their own groups; multipliers by gradient ascent.
        groups += [
            {"params": list(l0.gates.parameters()), "lr": 1.0, "weight_decay": 0.0},
            {"params": [*l0.lambda_1.parameters(), *l0.lambda_2.parameters()], "lr": 1.0, "weight_decay": 0.0,
             "maximize": True},
        ]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    return Runner(model, optimizer, l0, masks, autocast)


@torch.no_grad()
def eval_logits(runner: Runner, input_ids: torch.Tensor) -> torch.Tensor:
    runner.model.eval()
    with runner.autocast():
        out = runner.model(input_ids=input_ids, use_cache=False).logits.float()
    runner.model.train()
    return out


@torch.no_grad()
def check_masked_forward(case: Case, reference: torch.Tensor, masked: Runner, input_ids: torch.Tensor) -> float:
    """Max |logits difference| between the stock model's `reference` logits and the masked one with its masks
    cleared (0 when the masked RMSNorm matches the installed transformers' maths); raises if the target masks
    change nothing, i.e. the hooks no longer reach the modules the installed transformers calls."""
    reference = reference.to(input_ids.device)
    masked.masks.clear()
    masks_off = float((eval_logits(masked, input_ids) - reference).abs().max())
    masked.masks.set(masked.l0.target_masks())
    masks_on = float((eval_logits(masked, input_ids) - reference).abs().max())
    masked.masks.clear()
    if not masks_on > 0:
        raise RuntimeError(f"{case.name}: target masks leave the logits unchanged: drpruning's hooks do not reach "
                           f"the modules of transformers {transformers.__version__}")
    return masks_off


def train_bytes(case: Case) -> int:
    """Rough device memory of one model in training: fp32 weights, grads and two AdamW moments (16 bytes per
    parameter) plus bf16 activations of about 34 · d bytes per token per layer (no checkpointing)."""
    c = case.config
    per_layer = 4 * c["hidden_size"] ** 2 + 3 * c["hidden_size"] * c["intermediate_size"]
    params = c["num_hidden_layers"] * per_layer + c["vocab_size"] * c["hidden_size"] * (1 if c["tie_word_embeddings"] else 2)
    tokens = case.batch_size * case.seq_len
    return 16 * params + 34 * c["hidden_size"] * tokens * c["num_hidden_layers"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(case: Case, device: str, attention: str, bf16: bool, steps: int, warmup: int,
            one_at_a_time: bool = False) -> dict[str, Any]:
    """Build both models (each one's peak memory measured while it builds and warms up), check the masked
    forward with masks off against stock, then time `steps` train steps per model: alternating between the
    two (both resident), or with `one_at_a_time` each model alone, freed before the next is built (half the
    memory; clock drift between the two phases is then not cancelled)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, case.config["vocab_size"], (case.batch_size, case.seq_len), generator=generator)
    input_ids = input_ids.to(device)
    runners: dict[str, Runner] = {}
    peak: dict[str, float | None] = {}
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    effective: dict[str, str] = {}
    masks_off_diff, reference, weights, params = None, None, None, 0
    for kind in KINDS:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        runner = build(case, kind, device, attention, bf16, weights)
        effective[kind] = getattr(runner.model.config, "_attn_implementation", attention)
        if kind == "stock":
            params = sum(p.numel() for p in runner.model.parameters())
            reference = eval_logits(runner, input_ids).cpu()
            weights = {k: v.detach().to("cpu" if one_at_a_time else v.device, copy=True)
                       for k, v in runner.model.state_dict().items()}  # fmt: skip
        else:
            masks_off_diff = check_masked_forward(case, reference, runner, input_ids)
        losses = [runner.step(input_ids) for _ in range(warmup)]
        if not all(math.isfinite(loss) for loss in losses):
            raise RuntimeError(f"{case.name}: {kind} model's warmup losses are not finite: {losses}")
        sync(device)
        peak[kind] = (torch.cuda.max_memory_allocated() - before) / 2**30 if device == "cuda" else None
        if one_at_a_time:
            times[kind] = [timed_step(runner, input_ids, device) for _ in range(steps)]
            del runner
        else:
            runners[kind] = runner
    for index in range(steps if runners else 0):
        for kind in KINDS if index % 2 == 0 else KINDS[::-1]:
            times[kind].append(timed_step(runners[kind], input_ids, device))
    if len(set(effective.values())) != 1:
        raise RuntimeError(f"{case.name}: the two models use different attention kernels: {effective}")
    del runners
    gc.collect()
    step = {kind: statistics.median(times[kind]) for kind in KINDS}
    tokens = case.batch_size * case.seq_len
    return {
        "case": case.name, "params": params, "batch": f"{case.batch_size} × {case.seq_len}",
        "attention": effective["stock"], "masks_off_diff": masks_off_diff,
        **{f"{kind}_ms": 1e3 * step[kind] for kind in KINDS},
        **{f"{kind}_tokens_per_s": tokens / step[kind] for kind in KINDS},
        **{f"{kind}_peak_gib": peak[kind] for kind in KINDS},
    }


def timed_step(runner: Runner, input_ids: torch.Tensor, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    runner.step(input_ids)
    sync(device)
    return time.perf_counter() - start


def markdown(rows: list[dict[str, Any]], header: list[str]) -> str:
    """One markdown table, one row per case, stock and masked side by side."""
    def gib(value: float | None) -> str:
        return "n/a (CPU)" if value is None else f"{value:.2f}"

    def ratio(masked: float | None, stock: float | None) -> str:
        return "n/a" if masked is None or stock is None else f"{masked / stock:.3f}×"

    lines = [*header, "",
             "| case | params | batch | attention | step ms stock | step ms masked | step time masked/stock "
             "| tokens/s stock | tokens/s masked | peak GiB stock | peak GiB masked | peak memory masked/stock "
             "| max abs logit diff, masks off |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['params'] / 1e6:,.1f}M | {r['batch']} | {r['attention']} | {r['stock_ms']:.1f} "
            f"| {r['masked_ms']:.1f} | {ratio(r['masked_ms'], r['stock_ms'])} | {r['stock_tokens_per_s']:,.0f} "
            f"| {r['masked_tokens_per_s']:,.0f} | {gib(r['stock_peak_gib'])} | {gib(r['masked_peak_gib'])} "
            f"| {ratio(r['masked_peak_gib'], r['stock_peak_gib'])} | {r['masks_off_diff']:.3g} |"
        )
    return "\n".join(lines) + "\n"


FSDP1_STEPS = 8


def composer_fsdp1_section(steps: int = FSDP1_STEPS) -> list[str]:
    """The recipes' real GPU path, when this machine has it: `steps` batches of the tiny pruning recipe through
    Composer on one GPU with FSDP1 (FULL_SHARD), `mixed_precision: PURE` under `amp_bf16` and non-reentrant
    activation checkpointing, as the paper recipes set them. Returns report lines, or one line saying why the
    section was skipped (no Composer/LLM-Foundry: the bare GPU stack; no CUDA: FSDP1 cannot run)."""
    import importlib.util
    import json
    import os
    import subprocess
    import tempfile

    missing = [name for name in ("composer", "llmfoundry", "streaming") if importlib.util.find_spec(name) is None]
    if missing:
        return [f"Composer/FSDP1 section: skipped ({', '.join(missing)} not installed here)."]
    if not torch.cuda.is_available():
        return ["Composer/FSDP1 section: skipped (FSDP1 needs CUDA)."]
    from drpruning.demo.tiny import make_tiny_assets

    with tempfile.TemporaryDirectory() as tmp:
        assets, run = make_tiny_assets(Path(tmp) / "assets"), Path(tmp) / "run"
        interval = steps // 2
        command = [
            str(Path(sys.executable).with_name("composer")), "-n", "1", "scripts/train.py",
            "yamls/tiny/prune_llama_gqa.yaml", f"variables.assets={assets}", f"save_folder={run}",
            f"max_duration={steps}ba", f"variables.update_interval={interval}", f"save_interval={steps}ba",
            f"model.l0_module.lagrangian_warmup={interval}ba", "scheduler.t_warmup=2ba",
            "callbacks.data_scheduler.min_points=3", "precision=amp_bf16", "model.init_device=cpu",
            "fsdp_config.sharding_strategy=FULL_SHARD", "fsdp_config.mixed_precision=PURE",
            "fsdp_config.activation_checkpointing=true", "fsdp_config.activation_checkpointing_reentrant=false",
            "fsdp_config.use_orig_params=true", "fsdp_config.state_dict_type=full",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "FSDP_VERSION"}  # Composer's default: FSDP1
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
            return [f"Composer/FSDP1 section: FAILED (exit {result.returncode}):", "", "```", *tail, "```"]
        last: dict[str, float] = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            last.update({k: v for k, v in record.items() if k.startswith(("metrics/pruning/", "loss/train/total"))})
        gaps = {k.rsplit("/", 1)[1]: v - last[k.replace("expected_sparsity", "target_sparsity")]
                for k, v in last.items() if "/expected_sparsity/" in k}  # fmt: skip
        masks = sorted((run / "masks").glob("ba*.pt"))
    return [f"Composer/FSDP1 section: {steps} steps of `yamls/tiny/prune_llama_gqa.yaml` on 1 GPU, FSDP1 FULL_SHARD, "
            "mixed_precision PURE under amp_bf16, non-reentrant activation checkpointing: finished; last train "
            f"loss {last.get('loss/train/total', float('nan')):.3f}; expected - target sparsity at the last step: "
            + ", ".join(f"{m} {gap:+.3f}" for m, gap in sorted(gaps.items()))
            + f"; mask dumps written: {len(masks)}."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, fp32, tiny shapes, 2 timed steps (for tests)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: benchmarks/gpu_check.md; "
                                                "with --quick: runs/gpu_check_quick.md)")
    parser.add_argument("--steps", type=int, help="timed steps per model (default 20; --quick: 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    parser.add_argument("--attn", default="auto", choices=["auto", "sdpa", "flash_attention_2", "eager"],
                        help="attention kernel (auto: flash_attention_2 if installed on a GPU, else sdpa)")
    parser.add_argument("--cases", nargs="+", choices=[LLAMA_1_3B.name, SMOLLM2_DEMO.name],
                        help="subset of the GPU cases (default: both)")
    parser.add_argument("--fsdp1", action="store_true",
                        help="with --quick, also try the Composer/FSDP1 section (it always runs on a GPU)")
    parser.add_argument("--one-at-a-time", choices=["auto", "yes", "no"], default="auto",
                        help="measure each model alone, freeing it before the next (a 40 GB card fits the 1.3B "
                             "case only so); auto: when both would not fit in the free device memory")
    args = parser.parse_args(argv)

    if args.quick:
        device, bf16, cases = "cpu", False, list(QUICK_CASES)
        steps, out = args.steps or 2, args.out or REPO / "runs" / "gpu_check_quick.md"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: error: no CUDA device; run with --quick for the CPU smoke mode", file=sys.stderr)
            return 2
        device, bf16 = "cuda", True
        cases = [c for c in (LLAMA_1_3B, SMOLLM2_DEMO) if args.cases is None or c.name in args.cases]
        steps, out = args.steps or 20, args.out or REPO / "benchmarks" / "gpu_check.md"
    if steps < 1 or args.warmup < 1:
        print("gpu_check: error: --steps and --warmup must be at least 1", file=sys.stderr)
        return 2
    attention = resolve_attention(args.attn, device)

    started = time.perf_counter()
    rows = []
    alone = []
    for case in cases:
        one_at_a_time = args.one_at_a_time == "yes" or (
            args.one_at_a_time == "auto" and device == "cuda" and 2 * train_bytes(case) > torch.cuda.mem_get_info()[0])
        if one_at_a_time:
            alone.append(case.name)
        rows.append(measure(case, device, attention, bf16, steps, args.warmup, one_at_a_time))
        print(f"{case.name}: done after {time.perf_counter() - started:.0f} s", flush=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()})"
    header = [
        f"Device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{'fp32 weights under bf16 autocast' if bf16 else 'fp32'}; median of {steps} alternating train steps "
        f"per model after {args.warmup} warmup steps; wall time {time.perf_counter() - started:.0f} s."
        + (f" Measured one model at a time (not alternating), to fit the card: {', '.join(alone)}." if alone else ""),
        f"Command: `python benchmarks/gpu_check.py{' --quick' if args.quick else ''}`"
        + (" (smoke mode: tiny shapes, figures meaningless)" if args.quick else ""),
    ]
    table = markdown(rows, header)
    if not args.quick or args.fsdp1:
        fsdp1 = composer_fsdp1_section()
        print(fsdp1[0], flush=True)
        table += "\n" + "\n".join(fsdp1) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table, encoding="utf-8")
    print(table, end="")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
