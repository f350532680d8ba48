"""Plots and a markdown page that show what a DRPruning run did, from its run folder alone.

Inputs (all optional; what is missing is said on the page):
- `schedule.jsonl` (data scheduler): sampling proportions q, reference ratio p_R, per-domain and reference
  losses over steps (paper Figure 5);
- `metrics.jsonl` (`JSONLMetricsLogger`): expected vs target sparsity and Lagrange multipliers (logged by
  the pruning callback), LM and Lagrangian losses, per-domain eval loss (metric keys: `drpruning.runs`);
- `masks/ba<step>.pt` (pruning callback): how fast each granularity's masks settle (paper Figure 7);
- `data_usage.json`: tokens used per domain (paper Table 3).

Figures are drawn with matplotlib's Agg canvas directly (no pyplot), so no display or global state is needed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from drpruning.errors import ConfigError, report_error
from drpruning.run_data import (
    EXPECTED_SPARSITY,
    LAGRANGIAN_LOSS,
    LAMBDA_1,
    LAMBDA_2,
    LM_LOSS,
    SOURCE_SIZE_KEYS,
    TARGET_SPARSITY,
    Curve,
    RunData,
    schedule_curves,
)
from drpruning.runs import (
    EVAL_LOSS_PREFIX,
    EVAL_LOSS_SUFFIX,
    EVAL_MASKS_KEPT_PREFIX,
    PLOTS_DIR,
)


# ------------------------------------------------------------------------------------------ drawing
def _figure(rows: int, cols: int, width_per_col: float = 5.5, height_per_row: float = 3.6) -> Figure:
    figure = Figure(figsize=(width_per_col * cols, height_per_row * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _axes(figure: Figure, count: int, cols: int) -> list[Axes]:
    rows = -(-count // cols)
    grid = figure.subplots(rows, cols, squeeze=False)
    flat = list(grid.flat)
    for unused in flat[count:]:
        unused.set_visible(False)
    return flat[:count]


def _label(axis: Axes, title: str, ylabel: str, legend: bool = True) -> None:
    axis.set_title(title)
    axis.set_xlabel("step (batch)")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if legend and axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")


def _note(axis: Axes, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, color="gray")


class _Colors:
    """One colour per domain (or module) across every figure of the page."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def __call__(self, name: str) -> str:
        if name not in self.names:
            self.names.append(name)
        return f"C{self.names.index(name) % 10}"


def plot_schedule(run: RunData, colors: _Colors, path: Path) -> None:
    """Paper Figure 5: q with the initial reference ratio dashed, p_R, losses vs reference, reference-loss drift."""
    proportions = schedule_curves(run.schedule, "proportions")
    ratios = schedule_curves(run.schedule, "reference_ratio")
    losses = schedule_curves(run.schedule, "losses")
    references = schedule_curves(run.schedule, "reference_losses")
    figure = _figure(2, 2)
    q_axis, ratio_axis, loss_axis, drift_axis = _axes(figure, 4, 2)
    for domain, (steps, values) in proportions.items():
        q_axis.plot(steps, values, color=colors(domain), label=domain, marker=".")
        if domain in ratios:
            q_axis.axhline(ratios[domain][1][0], color=colors(domain), linestyle="--", linewidth=0.8)
    _label(q_axis, "Sampling proportions q (dashed: initial reference ratio)", "proportion")
    for domain, (steps, values) in ratios.items():
        ratio_axis.plot(steps, values, color=colors(domain), label=domain, marker=".")
    _label(ratio_axis, "Reference ratio p_R", "proportion")
    for domain, (steps, values) in losses.items():
        loss_axis.plot(steps, values, color=colors(domain), label=domain, marker=".")
    for domain, (steps, values) in references.items():
        loss_axis.plot(steps, values, color=colors(domain), linestyle="--")
    _label(loss_axis, "Domain loss (solid) and reference loss (dashed)", "cross-entropy")
    for domain, (steps, values) in references.items():
        drift_axis.plot(steps, values - values[0], color=colors(domain), label=domain, marker=".")
    drift_axis.axhline(0.0, color="black", linestyle="--", linewidth=0.8)
    _label(drift_axis, "Reference loss minus its initial value", "Δ cross-entropy")
    if not references:
        _note(loss_axis, "no reference losses in schedule.jsonl")
        _note(drift_axis, "no reference losses in schedule.jsonl")
    figure.savefig(path)


def plot_sparsity(run: RunData, path: Path) -> None:
    """Expected (solid) vs target (dashed) sparsity of each pruning module."""
    modules = run.modules(EXPECTED_SPARSITY)
    figure = _figure(-(-len(modules) // 2), min(len(modules), 2))
    for axis, module in zip(_axes(figure, len(modules), 2), modules, strict=True):
        axis.plot(*run.metrics[EXPECTED_SPARSITY + module], color="C0", label="expected")
        if TARGET_SPARSITY + module in run.metrics:
            axis.plot(*run.metrics[TARGET_SPARSITY + module], color="black", linestyle="--", label="target")
        size = ((run.meta or {}).get("l0", {}).get("source_shape") or {}).get(SOURCE_SIZE_KEYS.get(module, ""))
        if EVAL_MASKS_KEPT_PREFIX + module in run.metrics and size:
            steps, kept = run.metrics[EVAL_MASKS_KEPT_PREFIX + module]
            axis.plot(steps, 1.0 - kept / size, color="C2", marker="o", linestyle="none", markersize=3,
                      label="model scored by evals")
        _label(axis, f"{module}: expected vs target sparsity", "sparsity")
    figure.savefig(path)


def plot_lambdas(run: RunData, path: Path) -> None:
    """The Lagrange multipliers λ1, λ2 of each module (they grow while the expected size misses the target)."""
    modules = list(dict.fromkeys(run.modules(LAMBDA_1) + run.modules(LAMBDA_2)))
    figure = _figure(-(-len(modules) // 2), min(len(modules), 2))
    for axis, module in zip(_axes(figure, len(modules), 2), modules, strict=True):
        for prefix, label, color in ((LAMBDA_1, "λ1", "C0"), (LAMBDA_2, "λ2", "C3")):
            if prefix + module in run.metrics:
                axis.plot(*run.metrics[prefix + module], color=color, label=label)
        _label(axis, f"{module}: Lagrange multipliers", "value")
    figure.savefig(path)


def plot_train_losses(run: RunData, path: Path) -> None:
    names = [(LM_LOSS, "LM loss (train)", "cross-entropy"), (LAGRANGIAN_LOSS, "Lagrangian loss", "loss")]
    present = [item for item in names if item[0] in run.metrics]
    figure = _figure(1, len(present))
    for axis, (name, title, ylabel) in zip(_axes(figure, len(present), len(present)), present, strict=True):
        axis.plot(*run.metrics[name], color="C0")
        _label(axis, title, ylabel, legend=False)
    figure.savefig(path)


def plot_domain_losses(curves: dict[str, Curve], colors: _Colors, title: str, path: Path) -> None:
    figure = _figure(1, 1, width_per_col=8.0, height_per_row=4.5)
    axis = _axes(figure, 1, 1)[0]
    for domain, (steps, values) in curves.items():
        axis.plot(steps, values, color=colors(domain), label=domain, marker=".")
    _label(axis, title, "cross-entropy")
    figure.savefig(path)


def plot_mask_convergence(curves: dict[str, Curve], path: Path) -> None:
    """Paper Figure 7: similarity of each step's deterministic masks to the final ones, per granularity."""
    figure = _figure(1, 1, width_per_col=8.0, height_per_row=4.5)
    axis = _axes(figure, 1, 1)[0]
    for index, (name, (steps, values)) in enumerate(curves.items()):
        axis.plot(steps, values, color=f"C{index % 10}", label=name, marker=".")
    axis.set_ylim(-0.02, 1.05)
    _label(axis, "Mask similarity to the final masks |M_t ∩ M_final| / |M_final|", "similarity")
    figure.savefig(path)


# ------------------------------------------------------------------------------------------ the page
def _settled_from(curve: Curve) -> int:
    """The first step from which the similarity stays at 1.0 (the final step's masks are 1.0 by definition)."""
    steps, values = curve
    unsettled = np.flatnonzero(values < 1.0)
    return int(steps[unsettled[-1] + 1]) if len(unsettled) else int(steps[0])


def _shape_line(meta: dict[str, Any]) -> str | None:
    l0 = meta.get("l0") or {}
    source, target = l0.get("source_shape"), l0.get("target_shape")
    if not source or not target:
        return None
    keys = ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "intermediate_size")
    shape = ", ".join(f"{key} {source[key]} → {target[key]}" for key in keys if key in source and key in target)
    params = ""
    if "source_params" in l0 and "target_params" in l0:
        params = f"; parameters {l0['source_params']:,} → {l0['target_params']:,}"
    return f"Pruning `{meta.get('source', '?')}`: {shape}{params}."


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the PNGs and `README.md` for `run_dir` into `out_dir` (default `<run_dir>/plots`); returns the page."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    out = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    run = RunData.load(run_dir)
    colors = _Colors(run.domains)
    page = [f"# Run report: `{run_dir.name}`", "", f"Run folder: `{run_dir}`."]
    if run.meta and (line := _shape_line(run.meta)):
        page.append(line)

    def figure_section(title: str, filename: str, draw: Callable[[Path], None], missing: str | None,
                       caption: str = "") -> None:
        page.extend(["", f"## {title}", ""])
        if missing:
            page.append(f"_{missing}_")
            return
        draw(out / filename)
        page.append(f"![{title}]({filename})")
        if caption:
            page.extend(["", caption])

    figure_section(
        "Data schedule (paper Figure 5)", "data_schedule.png", lambda path: plot_schedule(run, colors, path),
        None if run.schedule else "No schedule.jsonl: the run had no data scheduler (constant data mix).",
        "Top left: sampling proportions q per domain, dashed the initial reference ratio. Top right: reference "
        "ratio p_R. Bottom left: the per-domain loss the scheduler saw and the reference loss. Bottom right: "
        "the reference loss minus its initial value.",
    )

    no_metrics = "No metrics.jsonl: add the `jsonl` logger (`loggers: {jsonl: {}}`) to record these curves."
    pruning_missing = no_metrics if not run.has_metrics_file else (
        "metrics.jsonl has no sparsity metrics: a run without pruning (continued pretraining)."
        if not run.modules(EXPECTED_SPARSITY) else None
    )
    figure_section("Expected vs target sparsity", "sparsity.png", lambda path: plot_sparsity(run, path),
                   pruning_missing, "Solid: expected sparsity of the hard-concrete masks; dashed: the target "
                   "the Lagrangian pulls it towards; dots: the sparsity of the model each eval scored "
                   "(`eval_masks: current`: round(Σ score) units per row).")  # fmt: skip
    lambda_missing = pruning_missing or (None if run.modules(LAMBDA_1) or run.modules(LAMBDA_2)
                                         else "metrics.jsonl has no Lagrange multipliers.")  # fmt: skip
    figure_section("Lagrange multipliers λ1, λ2", "lambdas.png", lambda path: plot_lambdas(run, path),
                   lambda_missing)  # fmt: skip
    losses_missing = no_metrics if not run.has_metrics_file else (
        None if LM_LOSS in run.metrics or LAGRANGIAN_LOSS in run.metrics
        else "metrics.jsonl has no lm_loss / lagrangian_loss."
    )
    figure_section("Training losses", "train_losses.png", lambda path: plot_train_losses(run, path), losses_missing)

    eval_curves = run.eval_losses()
    if eval_curves:
        eval_title = "Eval loss per domain"
        eval_caption = f"From `{EVAL_LOSS_PREFIX}<domain>{EVAL_LOSS_SUFFIX}`."
    else:
        eval_curves = schedule_curves(run.schedule, "losses")
        eval_title = "Per-domain loss seen by the data scheduler"
        eval_caption = ("No eval metrics in metrics.jsonl; these are the losses recorded in schedule.jsonl "
                        "(eval or smoothed train losses, depending on the scheduler's `loss_source`).")
    figure_section(
        "Eval loss per domain", "eval_loss.png",
        lambda path: plot_domain_losses(eval_curves, colors, eval_title, path),
        None if eval_curves else "No per-domain losses: neither metrics.jsonl eval metrics nor a schedule.jsonl.",
        eval_caption,
    )

    figure_section(
        "Mask convergence (paper Figure 7)", "mask_convergence.png",
        lambda path: plot_mask_convergence(run.mask_curves, path),
        None if run.mask_curves else "No masks/ba*.pt: a run without pruning (continued pretraining), or the "
        "pruning callback ran with save_masks: false.",
        "Share of the units kept by the final masks that each step's deterministic masks already keep.",
    )
    if run.mask_curves:
        page.extend(["", "| granularity | masks equal the final ones from step |", "|---|---:|"])
        for name, curve in run.mask_curves.items():
            page.append(f"| {name} | {_settled_from(curve)} |")

    page.extend(["", "## Data usage (paper Table 3)", ""])
    if run.data_usage:
        usage = run.data_usage
        page.extend(["| domain | tokens | share |", "|---|---:|---:|"])
        for domain, entry in usage.get("domains", {}).items():
            page.append(f"| {domain} | {entry['tokens']:,.0f} | {entry['fraction']:.1%} |")
        page.append(f"| **total** | {usage.get('total_tokens', 0):,.0f} | 100.0% |")
        page.extend(["", f"Tokens used by step {usage.get('step', '?')}."])
    else:
        page.append("_No data_usage.json: the run did not use the data scheduler's usage record._")

    readme = out / "README.md"
    readme.write_text("\n".join(page) + "\n", encoding="utf-8")
    return readme


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot a DRPruning run folder into PNGs and a markdown page.")
    parser.add_argument("run_dir", help="the run folder (schedule.jsonl, metrics.jsonl, masks/, data_usage.json)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        readme = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ConfigError) as error:
        return report_error(error, prog="plot_run")
    print(f"wrote {readme}")
    return 0
