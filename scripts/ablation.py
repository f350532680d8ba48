"""The paper's data-scheduling ablation at small scale (paper Tables 1-3 layout, on 2 CPU cores).

For each policy (constant, sheared, dro, drpruning) and seed: prune SmolLM2-135M to the demo target on the
demo corpus (`yamls/demo/prune_smollm2.yaml`), export the target-shaped model, evaluate it per domain,
and (for `--cpt-policies`, default all) continue pretraining it (`yamls/demo/cpt_smollm2.yaml`, same policy)
and evaluate again. The from-scratch
row (Sheared-LLaMA's baseline) trains a randomly initialised model of the target shape on the same number
of tokens as prune + continued pretraining (constant mixture, the continued-pretraining recipe) and is
evaluated the same way. Every evaluation is `drpruning.evaluation.evaluate_domains` on the held-out split.

    python scripts/ablation.py --out runs/ablation --steps 100 --update-interval 10 --seeds 17 18

`--init importance` starts every pruning run's gates from a calibration pass (`l0_module.init: importance`,
runs named `<policy>-importance-seed<S>`), and the `one-shot` row prunes by that importance alone
(`scripts/one_shot_prune.py`, no training; deterministic, so done once) before the same continued
pretraining (drpruning scheduling) per seed:

    python scripts/ablation.py --out runs/importance --init importance --policies drpruning one-shot

It reuses `make demo`'s source model and data (`--demo`, default runs/demo: source/ and data/), skips every
stage whose output exists (so an interrupted ablation resumes), and writes OUT/results.json and
OUT/results.md (`--report-only` tabulates what has finished).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout: the drpruning next to it

from drpruning.demo.pipeline import (  # noqa: E402
    latest_hf_checkpoint,
    logger,
    run_logged,
    stage as pipeline_stage,  # noqa: E402
    train_command,
)
from drpruning.pruning.shapes import PRUNING_MODULES  # noqa: E402
from drpruning.runs import (  # noqa: E402
    DATA_USAGE_FILE,
    EVAL_MASKS_PARAMS_KEY,
    METRICS_FILE,
    SCHEDULE_FILE,
    eval_loss_domain,
)
from drpruning.scheduling.policies import POLICY_NAMES  # noqa: E402

POLICIES = POLICY_NAMES
SCRATCH = "scratch"
ONE_SHOT = "one-shot"
ONE_SHOT_CPT_POLICY = "drpruning"  # the demo's continued-pretraining schedule
CALIBRATION = {"num_sequences": 32, "seed": 0}  # the defaults of drpruning.pruning.calibration.CalibrationConfig
PRUNE_YAML, CPT_YAML = "yamls/demo/prune_smollm2.yaml", "yamls/demo/cpt_smollm2.yaml"
TARGET = {"n_layers": 20, "hidden_size": 384, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024}
log = logger("ablation")
stage = functools.partial(pipeline_stage, log=log)


def composer_train(yaml: str, model_dir: Path, save_folder: Path, steps: int, policy: str, seed: int,
                   args: argparse.Namespace, data: Path, extra: list[str], log_file: Path) -> None:
    overrides = [
        f"variables.source={model_dir}", f"variables.data={data}", f"save_folder={save_folder}",
        f"variables.steps={steps}", f"variables.update_interval={args.update_interval}",
        f"seed={seed}", f"train_loader.seed={seed}", f"callbacks.data_scheduler.policy={policy}",
        f"run_name={save_folder.name}", "save_overwrite=true", "autoresume=false", *extra,
    ]
    if policy == "constant":
        overrides.append("callbacks.data_scheduler.reference_losses=null")
    run_logged(train_command(yaml, overrides, args.ranks), log_file)


def evaluate(model_dir: Path, data: Path, out: Path) -> None:
    from drpruning.evaluation import evaluate_domains

    out.write_text(json.dumps(evaluate_domains(str(model_dir), data, device="cpu"), indent=2) + "\n")


def scratch_model(source: Path, out: Path) -> None:
    """A config of the target shape (from the source's config) and the source tokenizer: random init."""
    from transformers import AutoConfig, AutoTokenizer

    from drpruning.atomic import staged_directory
    from drpruning.pruning.shapes import ModelShape, target_shape

    config = AutoConfig.from_pretrained(source)
    shape = target_shape(ModelShape.from_hf_config(config), TARGET,
                         PRUNING_MODULES)
    for key, value in shape.hf_config_updates().items():
        setattr(config, key, value)
    with staged_directory(out) as staging:
        config.save_pretrained(staging)
        AutoTokenizer.from_pretrained(source).save_pretrained(staging)


def run_label(policy: str, args: argparse.Namespace) -> str:
    """The row / folder name: the policy, marked when its gates start from importance, and with `--variant`."""
    if policy == SCRATCH:
        return policy
    if policy == ONE_SHOT:  # its pruned model is shared; a variant names its continued pretraining
        return f"{policy}-{args.variant}" if args.variant else policy
    name = f"{policy}-importance" if args.init == "importance" else policy
    return f"{name}-{args.variant}" if args.variant else name


def run_policy(policy: str, seed: int, args: argparse.Namespace, source: Path, data: Path) -> None:
    name = run_label(policy, args)
    base = args.out / f"{name}-seed{seed}"
    prune, pruned, cpt = base / "prune", base / "pruned", base / "cpt"
    done = base / "stages"
    init = ["model.l0_module.init=uniform", "model.l0_module.calibration=null"] if args.init == "uniform" else [
        "model.l0_module.init=importance", f"model.l0_module.calibration.data_dir={data}",
        *(f"model.l0_module.calibration.{key}={value}" for key, value in CALIBRATION.items())]
    stage(done / "prune", f"{name} seed {seed} prune", lambda: composer_train(
        PRUNE_YAML, source, prune, args.steps, policy, seed, args, data,
        [f"model.l0_module.lagrangian_warmup={max(1, int(0.4 * args.steps))}ba", *init, *args.prune_override],
        base / "logs" / "prune.log"))
    stage(done / "export", f"{name} seed {seed} export", lambda: run_logged(
        [sys.executable, "scripts/prune_to_dense.py", str(prune), str(pruned), "--overwrite"],
        base / "logs" / "export.log"))
    stage(done / "eval_pruned", f"{name} seed {seed} eval pruned", lambda: evaluate(
        pruned, data, base / "eval_pruned.json"))
    if policy not in args.cpt_policies:
        return
    stage(done / "cpt", f"{name} seed {seed} continued pretraining", lambda: composer_train(
        CPT_YAML, pruned, cpt, args.cpt_steps, policy, seed, args, data, args.cpt_override, base / "logs" / "cpt.log"))
    stage(done / "eval_cpt", f"{name} seed {seed} eval continued", lambda: evaluate(
        latest_hf_checkpoint(cpt), data, base / "eval_cpt.json"))


def run_one_shot(seed: int, args: argparse.Namespace, source: Path, data: Path) -> None:
    """Importance pruning without training (shared by the seeds), then the seed's continued pretraining."""
    shared, base = args.out / ONE_SHOT, args.out / f"{run_label(ONE_SHOT, args)}-seed{seed}"
    pruned, cpt = shared / "pruned", base / "cpt"
    target = [f"{key}={value}" for key, value in TARGET.items()]
    calibration = [f"--{key.replace('_', '-')}={value}" for key, value in CALIBRATION.items()]
    stage(shared / "stages" / "prune", "one-shot prune", lambda: run_logged(
        [sys.executable, "scripts/one_shot_prune.py", str(source), str(pruned), "--data", str(data), *calibration,
         "--overwrite", "--target", *target], shared / "logs" / "prune.log"))
    stage(shared / "stages" / "eval_pruned", "one-shot eval pruned", lambda: evaluate(
        pruned, data, shared / "eval_pruned.json"))
    stage(base / "stages" / "cpt", f"one-shot seed {seed} continued pretraining", lambda: composer_train(
        CPT_YAML, pruned, cpt, args.cpt_steps, ONE_SHOT_CPT_POLICY, seed, args, data, args.cpt_override,
        base / "logs" / "cpt.log"))
    stage(base / "stages" / "eval_cpt", f"one-shot seed {seed} eval continued", lambda: evaluate(
        latest_hf_checkpoint(cpt), data, base / "eval_cpt.json"))


def run_scratch(seed: int, args: argparse.Namespace, source: Path, data: Path) -> None:
    base = args.out / f"{SCRATCH}-seed{seed}"
    init, train = args.out / "scratch-init", base / "train"
    if not init.exists():
        scratch_model(source, init)
    steps = args.steps + args.cpt_steps  # the same tokens as prune + continued pretraining
    stage(base / "stages" / "train", f"scratch seed {seed} train", lambda: composer_train(
        CPT_YAML, init, train, steps, "constant", seed, args, data, ["model.pretrained=false"],
        base / "logs" / "train.log"))
    stage(base / "stages" / "eval_cpt", f"scratch seed {seed} eval", lambda: evaluate(
        latest_hf_checkpoint(train), data, base / "eval_cpt.json"))


# ---- reading results ----------------------------------------------------------------------------------


def read_schedule(run: Path) -> list[dict]:
    path = run / SCHEDULE_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def eval_losses(path: Path) -> dict[str, float] | None:
    if not path.exists():
        return None
    return {domain: value["loss"] for domain, value in json.loads(path.read_text())["domains"].items()}


def first_evals(run: Path) -> dict[str, float]:
    """Average per-domain eval loss of the first two evals of a pruning run (source at step 0, then the
    first periodic eval of the current model), and the parameter count that second eval scored."""
    by_step: dict[int, dict[str, float]] = {}
    params: dict[int, float] = {}
    for line in (run / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if (domain := eval_loss_domain(key)) is not None:
                by_step.setdefault(record["step"], {})[domain] = value
            if key == EVAL_MASKS_PARAMS_KEY:
                params[record["step"]] = value
    steps = sorted(by_step)[:2]
    result = {f"step{s}": statistics.fmean(by_step[s].values()) for s in steps}
    if len(steps) == 2 and steps[1] in params:
        result["params_scored"] = params[steps[1]]
    return result


def collect(policy: str, seed: int, args: argparse.Namespace) -> dict | None:
    label = run_label(policy, args)
    base = args.out / f"{label}-seed{seed}"
    shared = args.out / ONE_SHOT if policy == ONE_SHOT else base  # the one-shot model is pruned once
    final, pruned = eval_losses(base / "eval_cpt.json"), eval_losses(shared / "eval_pruned.json")
    if final is None and pruned is None:
        return None
    row: dict = {"policy": label, "seed": seed, "cpt": final, "pruned": pruned}
    times = {p.name: float(p.read_text()) for folder in {base, shared} for p in (folder / "stages").glob("*")}
    row["runtime_s"] = sum(times.values())
    run = base / {SCRATCH: "train", ONE_SHOT: "cpt"}.get(policy, "prune")
    if not (run / DATA_USAGE_FILE).exists():  # one-shot before its continued pretraining: no training data
        return row
    usage = json.loads((run / DATA_USAGE_FILE).read_text())
    row["data_usage"] = {d: v["fraction"] for d, v in usage["domains"].items()}
    schedule = read_schedule(run)
    references = [r["reference_losses"] for r in schedule if r.get("reference_losses")]
    if references:
        row["reference_change"] = {d: references[-1][d] - references[0][d] for d in references[0]}
        row["reference_first_change_step"] = next(
            (r["step"] for r in schedule if r.get("reference_losses")
             and any(abs(r["reference_losses"][d] - references[0][d]) > 0 for d in references[0])), None)
    if policy not in (SCRATCH, ONE_SHOT):
        row["first_evals"] = first_evals(run)
    return row


# ---- the report ---------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _row_cells(rows: list[dict], key: str, domains: list[str]) -> tuple[list[str], float, float]:
    per_seed_avg = [_mean([r[key][d] for d in domains]) for r in rows]
    per_seed_worst = [max(r[key][d] for d in domains) for r in rows]
    cells = [f"{_mean([r[key][d] for r in rows]):.3f}" for d in domains]
    return cells, _mean(per_seed_avg), _mean(per_seed_worst)


def write_markdown(results: list[dict], args: argparse.Namespace, path: Path, revision: str) -> None:
    domains = list(results[0]["cpt"] or results[0]["pruned"])
    names = list(dict.fromkeys(r["policy"] for r in results))
    lines = [
        f"SmolLM2-135M → 20 layers, d 384, 6/2 heads, FFN 1024 (50.3M). Pruning {args.steps} steps, then "
        f"{args.cpt_steps} steps of continued pretraining (global batch 4 × 128 tokens), data update every "
        f"{args.update_interval} steps; from scratch: {args.steps + args.cpt_steps} steps on the target shape. "
        f"Seeds {args.seeds}; code at revision {revision}.",
        "",
        "Command: `python scripts/ablation.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "Per-domain eval loss (held-out split), mean over seeds; avg and worst are the mean over seeds of each "
        "seed's average and worst domain; ± is the half-range of the two seeds' averages.",
        "",
        "| policy | stage | seeds | avg loss | ± | worst-domain | " + " | ".join(domains) + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(domains),
    ]
    for name in names:
        rows = [r for r in results if r["policy"] == name]
        for key, label in (("pruned", "pruned"), ("cpt", "+ continued" if name != SCRATCH else "trained")):
            one_model = key == "pruned" and name == ONE_SHOT  # deterministic: one model, whatever the seed
            have = [r for r in (rows[:1] if one_model else rows) if r.get(key)]
            if not have:
                continue
            cells, avg, worst = _row_cells(have, key, domains)
            spread = [_mean([r[key][d] for d in domains]) for r in have]
            half_range = (max(spread) - min(spread)) / 2 if len(spread) > 1 else float("nan")
            lines.append(f"| {name} | {label} | {len(have)} | {avg:.3f} | {half_range:.3f} | {worst:.3f} | "
                         + " | ".join(cells) + " |")
    lines += ["", "Data usage during pruning (fraction of training tokens, mean over seeds; paper Table 3):", "",
              "| policy | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for name in names:
        rows = [r for r in results if r["policy"] == name and "data_usage" in r]
        if rows:
            lines.append(f"| {name} | " + " | ".join(f"{_mean([r['data_usage'][d] for r in rows]):.3f}"
                                                     for d in domains) + " |")
    lines += ["", "Reference-loss change during pruning (last update − first, mean over seeds; the first is "
              "the source model's loss for every policy with references):", "",
              "| policy | first change at step | " + " | ".join(domains) + " |",
              "|---|---:|" + "---:|" * len(domains)]
    for name in names:
        rows = [r for r in results if r["policy"] == name and "reference_change" in r]
        if rows:
            steps = sorted({str(r.get("reference_first_change_step")) for r in rows})
            lines.append(f"| {name} | {', '.join(steps)} | " + " | ".join(
                f"{_mean([r['reference_change'][d] for r in rows]):+.3f}" for d in domains) + " |")
    lines += ["", "First evals of each pruning run (average over domains): the source model before step 1, "
              "and the first periodic eval, which scores the current model (`eval_masks: current`):", "",
              "| policy | seed | step 0 (source) | first periodic eval | params scored there |",
              "|---|---:|---:|---:|---:|"]
    for r in results:
        evals = r.get("first_evals")
        if evals and len(evals) >= 2:
            values = [v for k, v in evals.items() if k.startswith("step")]
            params = evals.get("params_scored")
            lines.append(f"| {r['policy']} | {r['seed']} | {values[0]:.3f} | {values[1]:.3f} | "
                         + (f"{params / 1e6:.1f}M" if params else "–") + " |")
    lines += ["", "| policy | seed | wall time (s) |", "|---|---:|---:|"]
    lines += [f"| {r['policy']} | {r['seed']} | {r['runtime_s']:.0f} |" for r in results]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="where make demo keeps source/data")
    parser.add_argument("--steps", type=int, default=100, help="pruning steps")
    parser.add_argument("--cpt-steps", type=int, default=40, help="continued-pretraining steps")
    parser.add_argument("--update-interval", type=int, default=10)
    parser.add_argument("--cpt-policies", nargs="*", default=list(POLICIES), choices=POLICIES,
                        help="the policies whose pruned models also get continued pretraining (default all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[17, 18])
    parser.add_argument("--policies", nargs="+", default=[*POLICIES, SCRATCH],
                        choices=[*POLICIES, SCRATCH, ONE_SHOT])
    parser.add_argument("--init", choices=("uniform", "importance"), default="uniform",
                        help="how the pruning runs' gates start (l0_module.init)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--prune-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a yaml override for the pruning runs (repeatable), e.g. model.l0_module.freeze_masks_at=80ba")
    parser.add_argument("--cpt-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a yaml override for the continued-pretraining runs (repeatable), e.g. "
                             "'model.distillation={teacher: SOURCE, weight: 0.5, temperature: 1.0}'")
    parser.add_argument("--variant", help="a name for the runs made with --prune-override / --cpt-override (row "
                                          "and folder)")
    parser.add_argument("--report-only", action="store_true", help="tabulate the runs that have finished")
    args = parser.parse_args()
    args.out = args.out.resolve()
    source, data = (args.demo / "source").resolve(), (args.demo / "data").resolve()
    if not (source / ".complete").exists() or not (data / "manifest.json").exists():
        raise SystemExit(f"run `make demo` first (needs {source} and {data})")
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    runs = [(policy, seed) for seed in args.seeds for policy in args.policies]
    if not args.report_only:
        for policy, seed in runs:  # seed by seed, so a partial ablation still compares every policy
            if policy == SCRATCH:
                run_scratch(seed, args, source, data)
            elif policy == ONE_SHOT:
                run_one_shot(seed, args, source, data)
            else:
                run_policy(policy, seed, args, source, data)
    results = [row for policy, seed in runs if (row := collect(policy, seed, args)) is not None]
    if not results:
        raise SystemExit(f"no finished runs in {args.out}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args, args.out / "results.md", revision)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
