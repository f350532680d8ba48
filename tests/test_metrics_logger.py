"""JSONLMetricsLogger inside a real (tiny, CPU) Composer Trainer: what it writes, who writes, and resumption."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

import drpruning.metrics_logger
from drpruning.errors import ConfigError
from drpruning.metrics_logger import JSONLMetricsLogger

MAX_BATCHES = 6
EVAL_AND_SAVE_INTERVAL = 2


def make_loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(MAX_BATCHES * 4, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    return DataLoader(TensorDataset(inputs, targets), batch_size=4, shuffle=False)


def make_trainer(save_folder: Path, logger: JSONLMetricsLogger, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    options = dict(
        model=model,
        train_dataloader=make_loader(0),
        eval_dataloader=make_loader(1),
        eval_interval=f"{EVAL_AND_SAVE_INTERVAL}ba",
        max_duration=f"{MAX_BATCHES}ba",
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        loggers=[logger],
        save_folder=str(save_folder),
        save_interval=f"{EVAL_AND_SAVE_INTERVAL}ba",
        run_name="tiny",
        device="cpu",
        seed=0,
        progress_bar=False,
        log_to_console=False,
    )
    options.update(overrides)
    return Trainer(**options)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The metrics.jsonl of one uninterrupted run (shared by the tests that compare against it)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    make_trainer(folder, JSONLMetricsLogger()).fit()
    return folder / "metrics.jsonl"


def test_every_log_call_becomes_one_line_in_the_run_folder(uninterrupted):
    records = read_records(uninterrupted)
    assert all(isinstance(record["step"], int) for record in records)
    assert all(isinstance(value, float) for record in records for name, value in record.items() if name != "step")
    train_loss_steps = [record["step"] for record in records if "loss/train/total" in record]
    assert train_loss_steps == list(range(MAX_BATCHES))
    eval_steps = [record["step"] for record in records if "metrics/eval/MulticlassAccuracy" in record]
    assert eval_steps == list(range(EVAL_AND_SAVE_INTERVAL, MAX_BATCHES + 1, EVAL_AND_SAVE_INTERVAL))


def test_values_are_converted_to_floats_and_non_numbers_dropped(tmp_path):
    logger = JSONLMetricsLogger(folder=str(tmp_path / "{run_name}"))
    trainer = make_trainer(tmp_path / "ckpt", logger, max_duration="1ba")
    trainer.logger.log_metrics({
        "tensor": torch.tensor(2.5),
        "numpy": np.float32(0.25),
        "int": 3,
        "text": "skip me",
        "vector": torch.ones(3),
        "none": None,
    }, step=7)
    trainer.logger.log_metrics({"text": "only non-numbers"}, step=8)
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists(), "held back until the run starts"
    trainer.fit()
    records = read_records(tmp_path / "tiny" / "metrics.jsonl")
    assert [r for r in records if r["step"] in (7, 8)] == [{"step": 7, "tensor": 2.5, "numpy": 0.25, "int": 3.0}]


def test_only_global_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(drpruning.metrics_logger, "dist", SimpleNamespace(get_global_rank=lambda: 1))
    make_trainer(tmp_path, JSONLMetricsLogger(), max_duration="2ba").fit()
    assert not (tmp_path / "metrics.jsonl").exists()
    checkpoint = torch.load(tmp_path / "ep0-ba2-rank0.pt", weights_only=False)  # the run itself did happen
    assert checkpoint["state"]["callbacks"]["JSONLMetricsLogger"] == {}  # no line count that could shadow rank 0's


def test_a_resumed_run_leaves_the_same_file_as_an_uninterrupted_one(tmp_path, uninterrupted):
    make_trainer(tmp_path, JSONLMetricsLogger()).fit()  # runs past the ba4 checkpoint, as a crash would
    make_trainer(tmp_path, JSONLMetricsLogger(), load_path=str(tmp_path / "ep0-ba4-rank0.pt"),
                 save_overwrite=True).fit()
    resumed = read_records(tmp_path / "metrics.jsonl")
    assert resumed == read_records(uninterrupted)


def test_a_checkpoint_without_logger_state_is_cut_back_by_step(tmp_path, uninterrupted):
    """The file is cut when the resumed run starts (not when the trainer is built), then appended to."""
    make_trainer(tmp_path, JSONLMetricsLogger()).fit()
    checkpoint_path = tmp_path / "ep0-ba4-rank0.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    del checkpoint["state"]["callbacks"]["JSONLMetricsLogger"]
    torch.save(checkpoint, checkpoint_path)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    trainer = make_trainer(tmp_path, JSONLMetricsLogger(), load_path=str(checkpoint_path), save_overwrite=True)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before, "a run that has not started changes nothing"
    trainer.fit()
    kept = [record for record in read_records(uninterrupted) if record["step"] <= 4]
    after = read_records(tmp_path / "metrics.jsonl")
    assert after[: len(kept)] == kept and all(record["step"] >= 4 for record in after[len(kept):])


def test_a_fresh_run_moves_an_earlier_runs_file_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 99, "old": 1.0}\n', encoding="utf-8")
    make_trainer(tmp_path, JSONLMetricsLogger(), max_duration="1ba").fit()
    records = read_records(tmp_path / "metrics.jsonl")
    assert records and all("old" not in record for record in records)
    (kept,) = tmp_path.glob(".replaced-*/metrics.jsonl")
    assert read_records(kept) == [{"step": 99, "old": 1.0}]


def test_a_fresh_run_in_a_folder_with_an_earlier_runs_checkpoints_is_refused_without_changes(tmp_path):
    make_trainer(tmp_path, JSONLMetricsLogger(), max_duration="2ba").fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="holds an earlier run .*autoresume=true.*save_overwrite=true"):
        make_trainer(tmp_path, JSONLMetricsLogger(), max_duration="2ba")  # refused before Composer's own check
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    make_trainer(tmp_path, JSONLMetricsLogger(), max_duration="2ba", save_overwrite=True).fit()
    (replaced,) = tmp_path.glob(".replaced-*")
    assert {p.name: p.read_bytes() for p in replaced.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(before)
