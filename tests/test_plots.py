"""drpruning.plots on synthetic run folders: mask similarity by hand, the PNGs, and the markdown page."""

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from drpruning.plots import main, plot_run
from drpruning.pruning.shapes import PRUNING_MODULES
from drpruning.run_data import RunData, mask_convergence, mask_similarity, metric_curves

DOMAINS = ["wiki", "code"]
MODULES = list(PRUNING_MODULES)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FULL_RUN_FIGURES = ["data_schedule.png", "sparsity.png", "lambdas.png", "train_losses.png", "eval_loss.png",
                    "mask_convergence.png"]  # fmt: skip


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def schedule_record(step: int) -> dict:
    """One line in the format the data scheduler writes (see /tmp/tiny1/schedule.jsonl)."""
    shift = 0.01 * step
    return {
        "step": step,
        "effective_batch": step,
        "losses": {"wiki": 3.0 - shift, "code": 2.5 - shift},
        "reference_losses": {"wiki": 2.9 - shift / 2, "code": 2.4 - shift / 2},
        "reference_ratio": {"wiki": 0.6 - shift / 10, "code": 0.4 + shift / 10},
        "proportions": {"wiki": 0.5 + shift, "code": 0.5 - shift},
        "tokens": {"wiki": 1000.0 * step, "code": 800.0 * step},
        "expected_params": 1e6 - 1e3 * step,
    }


def keep(size: int, kept: list[int]) -> torch.Tensor:
    mask = torch.zeros(size)
    mask[kept] = 1.0
    return mask


def final_masks() -> dict[str, torch.Tensor]:
    return {
        "layer": keep(4, [0, 1, 2]),
        "head": torch.stack([keep(2, [0]) for _ in range(4)]),
        "intermediate": torch.stack([keep(8, [0, 1, 2, 3]) for _ in range(4)]),
        "hidden": keep(8, [0, 1, 2, 3]),
    }


def write_masks(run: Path) -> None:
    """ba20 equals the final masks (ba100); at ba10 hidden keeps 2 of the final 4 units and heads the other half."""
    masks_dir = run / "masks"
    masks_dir.mkdir()
    early = final_masks()
    early["hidden"] = keep(8, [2, 3, 4, 5])
    early["head"] = torch.stack([keep(2, [0]), keep(2, [0]), keep(2, [1]), keep(2, [1])])
    torch.save(early, masks_dir / "ba10.pt")
    torch.save(final_masks(), masks_dir / "ba20.pt")
    torch.save(final_masks(), masks_dir / "ba100.pt")


def write_metrics(run: Path) -> None:
    records = []
    for step in range(0, 101, 10):
        # As a run writes them: the pruning callback's line, then Composer's losses at the same step.
        stats = {"step": step}
        for module in MODULES:
            stats[f"metrics/pruning/expected_sparsity/{module}"] = min(step / 80, 1.0) * 0.5
            stats[f"metrics/pruning/target_sparsity/{module}"] = min(step / 50, 1.0) * 0.5
            stats[f"metrics/pruning/lambda_1/{module}"] = -0.01 * step
            stats[f"metrics/pruning/lambda_2/{module}"] = 0.02 * step
        records.append(stats)
        records.append({"step": step, "loss/train/lm_loss": 4.0 - step / 100, "loss/train/lagrangian_loss": 0.1 * step})
        records += [{"step": step, f"metrics/eval/{domain}/LanguageCrossEntropy": 3.0 - step / 200}
                    for domain in DOMAINS]  # fmt: skip
    write_jsonl(run / "metrics.jsonl", records)


def write_data_usage(run: Path) -> None:
    usage = {"step": 100, "total_tokens": 180000.0, "domains": {
        "wiki": {"tokens": 100000.0, "fraction": 100000 / 180000},
        "code": {"tokens": 80000.0, "fraction": 80000 / 180000},
    }}
    (run / "data_usage.json").write_text(json.dumps(usage), encoding="utf-8")


@pytest.fixture
def full_run(tmp_path) -> Path:
    run = tmp_path / "prune-run"
    run.mkdir()
    write_jsonl(run / "schedule.jsonl", [schedule_record(step) for step in (10, 20, 30, 40)])
    write_masks(run)
    write_metrics(run)
    write_data_usage(run)
    return run


def assert_readable_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 10_000  # axes, lines and text, not an empty canvas
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= 600 and height >= 300


def test_mask_similarity_counts_final_kept_units_already_kept():
    final = keep(8, [0, 1, 2, 3])
    assert mask_similarity(final.clone(), final) == 1.0
    assert mask_similarity(keep(8, [2, 3, 4, 5]), final) == 0.5
    assert mask_similarity(keep(8, [4, 5, 6, 7]), final) == 0.0
    assert mask_similarity(keep(8, [0, 1, 2, 3, 4, 5]), final) == 1.0  # extra kept units do not count against
    assert mask_similarity(final * 0.7, final) == 1.0  # soft kept values are kept units
    with pytest.raises(ValueError, match="shape"):
        mask_similarity(keep(4, [0]), final)


def test_mask_convergence_compares_every_step_with_the_numerically_last(full_run):
    curves = mask_convergence(full_run / "masks")
    assert list(curves) == MODULES
    for module in MODULES:
        assert curves[module][0].tolist() == [10, 20, 100]
    assert curves["hidden"][1].tolist() == [0.5, 1.0, 1.0]
    assert curves["head"][1].tolist() == [0.5, 1.0, 1.0]
    assert curves["layer"][1].tolist() == [1.0, 1.0, 1.0]


def test_metric_curves_sort_by_step_and_keep_the_last_value_of_a_step():
    curves = metric_curves([{"step": 5, "a": 1.0}, {"step": 2, "a": 2.0, "b": 7.0}, {"step": 5, "a": 3.0}])
    assert curves["a"][0].tolist() == [2, 5] and curves["a"][1].tolist() == [2.0, 3.0]
    assert curves["b"][0].tolist() == [2]


def test_a_full_run_gets_every_figure_and_a_page_that_links_them(full_run):
    readme = plot_run(full_run)
    assert readme == full_run / "plots" / "README.md"
    page = readme.read_text(encoding="utf-8")
    for name in FULL_RUN_FIGURES:
        assert_readable_png(full_run / "plots" / name)
        assert f"]({name})" in page
    assert "| wiki | 100,000 | 55.6% |" in page and "| code | 80,000 | 44.4% |" in page
    assert "| hidden | 20 |" in page and "| layer | 10 |" in page  # first step equal to the final masks
    assert "No " not in page  # nothing reported missing


def test_a_folder_with_only_a_schedule_says_what_is_missing(tmp_path):
    write_jsonl(tmp_path / "schedule.jsonl", [schedule_record(step) for step in (10, 20)])
    out = tmp_path / "report"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    assert sorted(path.name for path in out.glob("*.png")) == ["data_schedule.png", "eval_loss.png"]
    for name in ("data_schedule.png", "eval_loss.png"):
        assert_readable_png(out / name)
    page = (out / "README.md").read_text(encoding="utf-8")
    assert page.count("No metrics.jsonl") == 3  # sparsity, multipliers, train losses
    assert "No masks/ba*.pt" in page and "No data_usage.json" in page
    assert "losses recorded in schedule.jsonl" in page  # eval-loss panel falls back to the schedule


def test_continued_pretraining_without_schedule_or_masks(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [
        {"step": step, "metrics/eval/wiki/LanguageCrossEntropy": 3.0 - step / 100, "loss/train/total": 3.1}
        for step in (0, 10, 20)
    ])
    page = plot_run(tmp_path).read_text(encoding="utf-8")
    assert "No schedule.jsonl" in page
    assert "no sparsity metrics" in page and "continued pretraining" in page
    assert "metrics.jsonl has no lm_loss" in page
    assert "](eval_loss.png)" in page and "](mask_convergence.png)" not in page
    assert_readable_png(tmp_path / "plots" / "eval_loss.png")
    assert not (tmp_path / "plots" / "sparsity.png").exists()


def test_a_missing_run_folder_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("plot_run: error:") and "no run folder" in err[0]


def test_eval_curve_values_come_from_the_metrics_file(full_run):
    run = RunData.load(full_run)
    assert run.domains == DOMAINS
    steps, values = run.eval_losses()["code"]
    assert steps.tolist() == list(range(0, 101, 10))
    np.testing.assert_allclose(values, 3.0 - steps / 200)
