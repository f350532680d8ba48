"""The paper's data-scheduling ablation at small scale: prune SmolLM2-135M to the demo target on the demo
corpus with each policy (constant, sheared, dro, drpruning) and several seeds, same token budget, then
compare per-domain eval loss of the pruned models (the masked model in deterministic mode IS the pruned
model), worst-domain loss, data usage per domain and runtime. Writes OUT/results.json and OUT/results.md.

    python scripts/ablation.py --out runs/ablation --steps 100 --seeds 17 18
It reuses `make demo`'s source model and data (runs/demo/source, runs/demo/data), building them if absent,
and skips runs that already finished (their final mask dump exists).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("constant", "sheared", "dro", "drpruning")


def final_eval_losses(run: Path) -> dict[str, float]:
    """Per-domain eval loss at the last eval of a run, from its metrics.jsonl."""
    prefix, suffix = "metrics/eval/", "/LanguageCrossEntropy"
    last: dict[str, tuple[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key.startswith(prefix) and key.endswith(suffix):
                domain = key[len(prefix):-len(suffix)]
                if domain not in last or record["step"] >= last[domain][0]:
                    last[domain] = (record["step"], value)
    return {domain: value for domain, (_, value) in last.items()}


def run_one(policy: str, seed: int, args: argparse.Namespace, source: Path, data: Path) -> dict:
    run = args.out / f"{policy}-seed{seed}"
    if not (run / "masks" / f"ba{args.steps}.pt").exists():
        overrides = [
            f"variables.source={source}", f"variables.data={data}", f"save_folder={run}",
            f"variables.steps={args.steps}", f"variables.update_interval={args.update_interval}",
            f"model.l0_module.lagrangian_warmup={max(1, int(0.4 * args.steps))}ba",
            f"seed={seed}", f"train_loader.seed={seed}", f"callbacks.data_scheduler.policy={policy}",
            f"run_name=ablation-{policy}-seed{seed}", "save_overwrite=true", "autoresume=false",
        ]
        if policy == "constant":
            overrides.append("callbacks.data_scheduler.reference_losses=null")
        composer = str(Path(sys.executable).with_name("composer"))
        command = [composer, "-n", str(args.ranks), "scripts/train.py", "yamls/demo/prune_smollm2.yaml", *overrides]
        print(f"[ablation] {policy} seed {seed}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        log = args.out / "logs" / f"{policy}-seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle:
            subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, check=True)
        (run / "runtime_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    losses = final_eval_losses(run)
    usage = json.loads((run / "data_usage.json").read_text())
    return {
        "policy": policy, "seed": seed, "losses": losses,
        "average_loss": statistics.fmean(losses.values()), "worst_loss": max(losses.values()),
        "worst_domain": max(losses, key=losses.get),
        "data_usage": {d: v["fraction"] for d, v in usage["domains"].items()},
        "runtime_s": float((run / "runtime_s.txt").read_text()),
    }


def write_markdown(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    domains = list(results[0]["losses"])
    lines = [
        f"Pruning SmolLM2-135M → 20 layers, d 384, 6/2 heads, FFN 1024 for {args.steps} steps "
        f"(global batch 4 × 128 tokens), update interval {args.update_interval}, seeds {args.seeds}.",
        "",
        "Command: `python scripts/ablation.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| policy | avg loss | avg ppl | worst-domain loss | " + " | ".join(domains) + " | runtime (s) |",
        "|---|---:|---:|---:|" + "---:|" * len(domains) + "---:|",
    ]
    for policy in POLICIES:
        rows = [r for r in results if r["policy"] == policy]
        if not rows:
            continue
        mean = statistics.fmean
        cells = [f"{mean(r['losses'][d] for r in rows):.3f}" for d in domains]
        avg = mean(r["average_loss"] for r in rows)
        lines.append(
            f"| {policy} | {avg:.3f} | {math.exp(avg):.1f} | {mean(r['worst_loss'] for r in rows):.3f} | "
            + " | ".join(cells) + f" | {mean(r['runtime_s'] for r in rows):.0f} |"
        )
    lines += ["", "Data usage per domain (fraction of training tokens, mean over seeds; paper Table 3):", "",
              "| policy | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for policy in POLICIES:
        rows = [r for r in results if r["policy"] == policy]
        if rows:
            lines.append(f"| {policy} | " + " | ".join(
                f"{statistics.fmean(r['data_usage'][d] for r in rows):.3f}" for d in domains) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="where make demo keeps source/data")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--update-interval", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[17, 18])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="tabulate the runs that have finished")
    args = parser.parse_args()
    args.out = args.out.resolve()
    source, data = (args.demo / "source").resolve(), (args.demo / "data").resolve()
    if not (source / ".complete").exists() or not (data / "manifest.json").exists():
        raise SystemExit(f"run `make demo` first (needs {source} and {data})")
    runs = [(policy, seed) for seed in args.seeds for policy in args.policies]
    if args.report_only:
        runs = [(p, s) for p, s in runs if (args.out / f"{p}-seed{s}" / "runtime_s.txt").exists()]
        if not runs:
            raise SystemExit(f"no finished runs in {args.out}")
    results = [run_one(policy, seed, args, source, data) for policy, seed in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args, args.out / "results.md")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
