"""`report.md` for a demo folder: per-domain perplexity of source, pruned and continued models, plus the
run plots of the pruning and continued-pretraining stages (written by `scripts/demo.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from drpruning.plots import plot_run

MODELS = ("source", "pruned", "continued")


def _params(model_dir: Path) -> int | None:
    from drpruning.pruning.shapes import ModelShape

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return None
    return ModelShape.from_hf_config(json.loads(config_file.read_text())).num_params()


def write_report(out: Path) -> Path:
    results = json.loads((out / "eval.json").read_text())
    domains = list(results["source"]["domains"])
    lines = [
        "# DRPruning demo: SmolLM2-135M → ~50M parameters on CPU",
        "",
        "Per-domain eval loss (perplexity) on the held-out split of each domain. `pruned` is the dense export of",
        "the pruning run (before continued pretraining); `continued` is after the short continued pretraining.",
        "",
        "| model | params | " + " | ".join(domains) + " | average loss | worst domain |",
        "|---|---:|" + "---:|" * len(domains) + "---:|---|",
    ]
    for name in MODELS:
        report = results[name]
        params = _params(Path(report["model"])) if report.get("model") else None
        cells = [f"{report['domains'][d]['loss']:.3f} ({report['domains'][d]['perplexity']:.1f})" for d in domains]
        worst = report["worst_domain"]
        size = f"{params / 1e6:.1f}M" if params else "–"
        lines.append(f"| {name} | {size} | " + " | ".join(cells)
                     + f" | {report['average_loss']:.3f} | {worst['name']} ({worst['loss']:.3f}) |")
    lines += ["", "## Runs", ""]
    for stage in ("prune", "cpt"):
        run = out / stage
        if run.is_dir():
            page = plot_run(run)
            lines.append(f"- [{stage} run plots]({page.relative_to(out)}) (schedule, sparsity, masks, data usage)")
    for png in sorted((out / "prune" / "plots").glob("*.png")):
        lines += ["", f"![{png.stem}]({png.relative_to(out)})"]
    report_file = out / "report.md"
    report_file.write_text("\n".join(lines) + "\n")
    return report_file
