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
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from drpruning.errors import ConfigError, report_error
from drpruning.pruning.shapes import PRUNING_MODULES
from drpruning.runs import (
    DATA_USAGE_FILE,
    EVAL_LOSS_PREFIX,
    EVAL_LOSS_SUFFIX,
    EVAL_MASKS_KEPT_PREFIX,
    MASKS_DIR,
    MASKS_META_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    PRUNING_METRICS_PREFIX,
    SCHEDULE_FILE,
    TRAIN_LOSS_PREFIX,
    eval_loss_domain,
)

GRANULARITIES = PRUNING_MODULES
EXPECTED_SPARSITY = PRUNING_METRICS_PREFIX + "expected_sparsity/"
TARGET_SPARSITY = PRUNING_METRICS_PREFIX + "target_sparsity/"
LAMBDA_1 = PRUNING_METRICS_PREFIX + "lambda_1/"
LAMBDA_2 = PRUNING_METRICS_PREFIX + "lambda_2/"
LM_LOSS = TRAIN_LOSS_PREFIX + "lm_loss"
LAGRANGIAN_LOSS = TRAIN_LOSS_PREFIX + "lagrangian_loss"
SOURCE_SIZE_KEYS = {"layer": "n_layers", "head": "n_kv_heads", "intermediate": "intermediate_size",
                    "hidden": "hidden_size"}
MASK_FILE = re.compile(r"^ba(\d+)\.pt$")

Curve = tuple[np.ndarray, np.ndarray]  # (steps, values)


# ------------------------------------------------------------------------------------------ reading
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, or [] when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def metric_curves(records: Sequence[dict[str, Any]]) -> dict[str, Curve]:
    """Each metric of `metrics.jsonl` as (steps, values) sorted by step; a later value at the same step wins."""
    by_name: dict[str, dict[int, float]] = {}
    for record in records:
        step = int(record["step"])
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float):
                by_name.setdefault(name, {})[step] = float(value)
    return {name: _curve(points) for name, points in by_name.items()}


def schedule_curves(records: Sequence[dict[str, Any]], key: str) -> dict[str, Curve]:
    """Per-domain curves of one `schedule.jsonl` field (`proportions`, `reference_ratio`, `losses`, ...)."""
    by_domain: dict[str, dict[int, float]] = {}
    for record in records:
        for domain, value in (record.get(key) or {}).items():
            if value is not None:
                by_domain.setdefault(domain, {})[int(record["step"])] = float(value)
    return {domain: _curve(points) for domain, points in by_domain.items()}


def _curve(points: dict[int, float]) -> Curve:
    steps = sorted(points)
    return np.array(steps, dtype=np.int64), np.array([points[step] for step in steps], dtype=np.float64)


def mask_similarity(mask: torch.Tensor, final: torch.Tensor) -> float:
    """|M ∩ M_final| / |M_final| over kept (non-zero) units: the share of the final decisions already made."""
    if mask.shape != final.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from the final mask's {tuple(final.shape)}")
    kept_final = final != 0
    total = int(kept_final.sum())
    if total == 0:
        return float("nan")
    return int(((mask != 0) & kept_final).sum()) / total


def mask_convergence(masks_dir: Path) -> dict[str, Curve]:
    """For each granularity in `masks/ba<step>.pt`, the similarity of every step's masks to the last step's."""
    files = sorted(
        ((int(match.group(1)), path) for path in masks_dir.glob("ba*.pt") if (match := MASK_FILE.match(path.name))),
        key=lambda item: item[0],
    )
    if not files:
        return {}
    masks = {step: torch.load(path, map_location="cpu", weights_only=True) for step, path in files}
    final = masks[files[-1][0]]
    names = [name for name in GRANULARITIES if name in final] + sorted(set(final) - set(GRANULARITIES))
    curves = {}
    for name in names:
        points = {step: mask_similarity(step_masks[name], final[name]) for step, step_masks in masks.items()
                  if name in step_masks}  # fmt: skip
        curves[name] = _curve(points)
    return curves


@dataclass
class RunData:
    """Everything the page shows, read from one run folder."""

    run_dir: Path
    schedule: list[dict[str, Any]]
    metrics: dict[str, Curve]
    has_metrics_file: bool
    mask_curves: dict[str, Curve]
    data_usage: dict[str, Any] | None
    meta: dict[str, Any] | None
    domains: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path) -> RunData:
        metrics_path = run_dir / METRICS_FILE
        usage_path = run_dir / DATA_USAGE_FILE
        meta_path = run_dir / MASKS_DIR / MASKS_META_FILE
        run = cls(
            run_dir=run_dir,
            schedule=read_jsonl(run_dir / SCHEDULE_FILE),
            metrics=metric_curves(read_jsonl(metrics_path)),
            has_metrics_file=metrics_path.exists(),
            mask_curves=mask_convergence(run_dir / MASKS_DIR),
            data_usage=json.loads(usage_path.read_text(encoding="utf-8")) if usage_path.exists() else None,
            meta=json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else None,
        )
        run.domains = run._domains_in_order()
        return run

    def _domains_in_order(self) -> list[str]:
        """Domains in the scheduler's order, then any others the usage or eval metrics name."""
        ordered: list[str] = []
        for record in self.schedule[:1]:
            ordered += list(record.get("proportions") or {})
        ordered += list((self.data_usage or {}).get("domains", {}))
        ordered += list(self.eval_losses())
        return list(dict.fromkeys(ordered))

    def eval_losses(self) -> dict[str, Curve]:
        """Per-domain eval cross-entropy from `metrics.jsonl` (an unlabelled evaluator is called `eval`)."""
        curves = {}
        for name, curve in self.metrics.items():
            domain = eval_loss_domain(name)
            if domain is not None:
                curves[domain or "eval"] = curve
        return curves

    def modules(self, prefix: str) -> list[str]:
        """The pruning modules that have a metric named `<prefix><module>`, in granularity order."""
        found = {name[len(prefix):] for name in self.metrics if name.startswith(prefix)}
        return [m for m in GRANULARITIES if m in found] + sorted(found - set(GRANULARITIES))


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
