"""The DataScheduler callback against light fakes of Composer's State/Logger, the mixer and the model
(the contracts of docs/architecture.md)."""

import dataclasses
import inspect
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from composer.core import Time

import drpruning.runs
import drpruning.scheduling.measurement
import drpruning.scheduling.scheduler
from drpruning.errors import ConfigError
from drpruning.scheduling.dro import dro_proportions
from drpruning.scheduling.policies import PolicySettings
from drpruning.scheduling.scheduler import DataScheduler

DOMAINS = ["cc", "github", "wiki"]
P0 = [0.6, 0.3, 0.1]
REFERENCE = {"cc": 2.3, "github": 1.2, "wiki": 1.9}
MAX_BATCHES = 200
TOKENS_PER_BATCH = 4096.0
LAG = 2


class FakeMixer:
    """The DomainMixtureDataset contract: domains, initial proportions, a schedule of proportions."""

    def __init__(self) -> None:
        self.domains = list(DOMAINS)
        self.initial_proportions = np.array(P0)
        self.consumed = 0
        self.calls: list[tuple[list[float], int | None]] = []
        self.schedule: list[tuple[int, np.ndarray]] = [(0, self.initial_proportions.copy())]

    def proportions_at(self, batch: int) -> np.ndarray:
        return [p for start, p in self.schedule if start <= batch][-1]

    def set_proportions(self, proportions: np.ndarray, at_batch: int | None = None) -> int:
        effective = self.consumed + LAG if at_batch is None else at_batch
        self.calls.append((np.asarray(proportions).tolist(), at_batch))
        self.schedule.append((effective, np.asarray(proportions, dtype=np.float64).copy()))
        return effective


class FakeDomainStats:
    """take() returns this rank's per-domain (loss sum, token count) of the current batch."""

    def __init__(self, mixer: FakeMixer, world_size: int = 1) -> None:
        self.mixer = mixer
        self.world_size = world_size
        self.batch = 0
        self.loss_override: dict[int, float] = {}
        self.unsampled_until = 0  # domains other than cc get no tokens up to this batch

    def take(self, num_domains: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert num_domains == len(DOMAINS)
        tokens = torch.tensor(self.mixer.proportions_at(self.batch) * TOKENS_PER_BATCH, dtype=torch.float64)
        losses = torch.tensor([train_loss(self.batch, d) for d in range(num_domains)], dtype=torch.float64)
        for domain, value in self.loss_override.items():
            losses[domain] = value
        if self.batch <= self.unsampled_until:
            tokens[1:] = 0.0
        return losses * tokens / self.world_size, tokens / self.world_size


class FakeModel:
    def __init__(self, stats: FakeDomainStats, pruning: bool) -> None:
        self.domain_stats = stats
        self.pruning = pruning
        self.batch = 0

    def pruning_stats(self) -> dict[str, float] | None:
        if not self.pruning:
            return None
        return {"expected_params": 6.7e9 - 5e9 * min(self.batch / 100, 1.0), "target_params": 1.3e9}


class FakeMetric:
    def __init__(self, value: float) -> None:
        self.value = value

    def compute(self) -> torch.Tensor:
        return torch.tensor(self.value)


class FakeLogger:
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.metrics.append(dict(metrics))


def train_loss(batch: int, domain: int) -> float:
    return 2.5 + 0.3 * domain + 1.0 / math.sqrt(batch + 1)


def eval_loss(batch: int, domain: int) -> float:
    """Decreasing per-domain eval curves; github stays furthest above its reference."""
    base = [2.1, 1.3, 1.75][domain]
    return base + 0.4 * (max(batch, 1) / MAX_BATCHES) ** -0.3 - 0.4


class Run:
    """One process's view of a training run: fake state, mixer, model and logger."""

    def __init__(self, folder: Path, pruning: bool = True, world_size: int = 1) -> None:
        self.folder = folder
        self.mixer = FakeMixer()
        self.stats = FakeDomainStats(self.mixer, world_size)
        self.model = FakeModel(self.stats, pruning)
        self.logger = FakeLogger()
        self.state = SimpleNamespace(
            timestamp=SimpleNamespace(batch=0), max_duration=Time.from_timestring(f"{MAX_BATCHES}ba"),
            eval_metrics={}, train_dataloader=SimpleNamespace(dataset=self.mixer), model=self.model, callbacks=[],
            run_name="fake-run")
        self.eval_override: dict[int, float] = {}

    def set_eval(self, batch: int) -> None:
        self.state.eval_metrics = {f"eval/{name}": {"LanguageCrossEntropy": FakeMetric(
            self.eval_override.get(d, eval_loss(batch, d)))} for d, name in enumerate(DOMAINS)}

    def at_batch(self, batch: int) -> None:
        self.state.timestamp.batch = batch
        self.stats.batch = batch
        self.model.batch = batch
        self.mixer.consumed = batch

    def schedule_lines(self) -> list[dict[str, Any]]:
        path = self.folder / "runs" / "fake-run" / "schedule.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train(callback: DataScheduler, run: Run, start: int, end: int, eval_interval: int,
          eval_first: bool = False) -> None:
    """Drive the events in Composer's order: (standalone eval), FIT_START, then per batch
    BATCH_END and, every `eval_interval`, EVAL_AFTER_ALL."""
    cwd = os.getcwd()
    os.chdir(run.folder)
    try:
        run.at_batch(start)
        if eval_first:
            callback.eval_standalone_start(run.state, run.logger)
            run.set_eval(start)
            callback.eval_standalone_end(run.state, run.logger)
        callback.fit_start(run.state, run.logger)
        for batch in range(start + 1, end + 1):
            run.at_batch(batch)
            callback.batch_end(run.state, run.logger)
            if batch % eval_interval == 0:
                run.set_eval(batch)
                callback.eval_after_all(run.state, run.logger)
    finally:
        os.chdir(cwd)


def finish(callback: DataScheduler, run: Run) -> None:
    cwd = os.getcwd()
    os.chdir(run.folder)
    try:
        callback.fit_end(run.state, run.logger)
    finally:
        os.chdir(cwd)


def scheduler(**overrides: Any) -> DataScheduler:
    options: dict[str, Any] = dict(policy="drpruning", update_interval=20, reference_losses=dict(REFERENCE),
                                   min_points=5)
    options.update(overrides)
    return DataScheduler(**options)


def test_updates_at_the_right_batches_and_logs_them(tmp_path: Path) -> None:
    run = Run(tmp_path)
    callback = scheduler(policy="dro", update_interval=50)
    train(callback, run, 0, MAX_BATCHES, eval_interval=25)
    lines = run.schedule_lines()
    assert [line["step"] for line in lines] == [50, 100, 150, 200]
    assert [line["effective_batch"] for line in lines] == [52, 102, 152, 202]
    assert [at for _, at in run.mixer.calls] == [None] * 4
    for line in lines:
        assert list(line["proportions"]) == DOMAINS
        q = np.array([line["proportions"][d] for d in DOMAINS])
        losses = np.array([line["losses"][d] for d in DOMAINS])
        np.testing.assert_allclose(losses, [eval_loss(line["step"], d) for d in range(3)], rtol=1e-6)
        ratio = np.array([line["reference_ratio"][d] for d in DOMAINS])
        reference = np.array([line["reference_losses"][d] for d in DOMAINS])
        np.testing.assert_allclose(q, dro_proportions(losses, reference, ratio, 0.1), rtol=1e-12)  # auditable
        np.testing.assert_allclose(q, run.mixer.proportions_at(line["effective_batch"]), rtol=0)
        assert line["expected_params"] == pytest.approx(6.7e9 - 5e9 * min(line["step"] / 100, 1.0))
    # Tokens of each domain follow the proportions in force at each batch.
    expected_tokens = sum(run.mixer.proportions_at(b) * TOKENS_PER_BATCH for b in range(1, 201))
    np.testing.assert_allclose([lines[-1]["tokens"][d] for d in DOMAINS], expected_tokens, rtol=1e-12)
    logged = [m for m in run.logger.metrics if "metrics/data/github/proportion" in m]
    assert len(logged) == 4
    assert set(logged[0]) == {f"metrics/data/{d}/{k}" for d in DOMAINS
                              for k in ("loss", "reference_loss", "reference_ratio", "proportion")}
    assert logged[-1]["metrics/data/github/proportion"] == lines[-1]["proportions"]["github"]
    assert lines[-1]["proportions"]["github"] > P0[1]  # github lags furthest behind its reference


def test_resumed_run_writes_identical_lines(tmp_path: Path) -> None:
    uninterrupted = Run(tmp_path / "a")
    uninterrupted.folder.mkdir()
    reference_callback = scheduler()
    train(reference_callback, uninterrupted, 0, MAX_BATCHES, eval_interval=20)

    crashed = Run(tmp_path / "b")
    crashed.folder.mkdir()
    first = scheduler()
    train(first, crashed, 0, 100, eval_interval=20)
    checkpoint = json.loads(json.dumps(first.state_dict()))  # plain types only
    mixer_schedule = list(crashed.mixer.schedule)
    train(first, crashed, 100, 140, eval_interval=20)  # progress after the checkpoint, then a crash
    assert [line["step"] for line in crashed.schedule_lines()][-2:] == [120, 140]

    resumed = Run(tmp_path / "b")
    resumed.mixer.schedule = mixer_schedule  # the mixer restores its own state from the checkpoint
    second = scheduler()
    second.load_state_dict(checkpoint)
    train(second, resumed, 100, MAX_BATCHES, eval_interval=20)
    expected = uninterrupted.schedule_lines()
    assert [line["step"] for line in expected] == list(range(20, 201, 20))
    assert resumed.schedule_lines() == expected
    assert second.state_dict() == json.loads(json.dumps(reference_callback.state_dict()))
    # The dynamic parts were active after the resume point.
    last = expected[-1]
    assert last["reference_losses"] != REFERENCE
    assert last["reference_ratio"] != dict(zip(DOMAINS, P0, strict=True))


def test_source_reference_losses_from_the_first_eval(tmp_path: Path) -> None:
    run = Run(tmp_path)
    callback = scheduler(policy="dro", reference_losses="source", update_interval=50)
    train(callback, run, 0, 100, eval_interval=50, eval_first=True)
    lines = run.schedule_lines()
    assert [line["step"] for line in lines] == [50, 100]
    source = {d: eval_loss(0, i) for i, d in enumerate(DOMAINS)}
    for line in lines:
        assert line["reference_losses"] == pytest.approx(source, rel=1e-6)


def test_source_without_eval_first_uses_the_first_eval(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = Run(tmp_path)
    callback = scheduler(policy="dro", reference_losses="source", update_interval=50)
    train(callback, run, 0, 100, eval_interval=50)
    assert "not from the source model" in caplog.text
    first = run.schedule_lines()[0]
    assert first["reference_losses"] == pytest.approx(first["losses"], rel=1e-12)
    assert first["proportions"] == pytest.approx(dict(zip(DOMAINS, P0, strict=True)), rel=1e-12)  # v = 0 → p_R


def test_first_eval_update_for_sheared(tmp_path: Path) -> None:
    """`first_eval_update` adds the reference scripts' step-0 `sheared` update from the eval_first eval; its
    factor carries into every later update, and the policies whose reference had no step-0 eval ignore it."""
    runs = {}
    for switch in (False, True):
        run = Run(tmp_path / str(switch))
        run.folder.mkdir()
        train(scheduler(policy="sheared", update_interval=50, first_eval_update=switch), run, 0, 100,
              eval_interval=50, eval_first=True)
        runs[switch] = run.schedule_lines()
    assert [line["step"] for line in runs[False]] == [50, 100]
    assert [line["step"] for line in runs[True]] == [0, 50, 100]
    step0 = runs[True][0]
    losses = np.array([eval_loss(0, d) for d in range(3)])
    # Sheared's reference code: q = (1 - c) softmax(log p0 + (loss - reference)) + c / k, c = 1e-4.
    alpha = np.exp(np.log(P0) + losses - np.array([REFERENCE[d] for d in DOMAINS]))
    q0 = (1 - 1e-4) * alpha / alpha.sum() + 1e-4 / 3
    np.testing.assert_allclose([step0["proportions"][d] for d in DOMAINS], q0 / q0.sum(), rtol=1e-6)  # float32 evals
    assert runs[True][1]["proportions"] != runs[False][0]["proportions"]  # the step-0 factor carries on
    run = Run(tmp_path / "dro")
    run.folder.mkdir()
    train(scheduler(policy="dro", update_interval=50, first_eval_update=True), run, 0, 100, eval_interval=50,
          eval_first=True)
    assert [line["step"] for line in run.schedule_lines()] == [50, 100]
    with pytest.raises(ConfigError, match="first_eval_update"):
        scheduler(policy="sheared", first_eval_update="yes")


def test_train_ema_mode(tmp_path: Path) -> None:
    run = Run(tmp_path, pruning=False)
    callback = scheduler(policy="sheared", loss_source="train_ema", update_interval=10, ema=0.5)
    run.stats.unsampled_until = 10  # github and wiki get no tokens in the first interval
    train(callback, run, 0, 10, eval_interval=1000)
    assert run.schedule_lines() == []  # github and wiki have no loss yet: the update waits
    assert callback.state_dict()["loss_ema"][1:] == [None, None]
    train(callback, run, 10, 20, eval_interval=1000)
    ema = [None, None, None]
    for batch in range(1, 21):
        for d in range(3):
            if d == 0 or batch > 10:
                value = train_loss(batch, d)
                ema[d] = value if ema[d] is None else 0.5 * ema[d] + 0.5 * value
    line = run.schedule_lines()[0]
    assert line["step"] == 20
    assert [line["losses"][d] for d in DOMAINS] == pytest.approx(ema, rel=1e-12)
    assert line["expected_params"] is None
    assert line["tokens"]["github"] == pytest.approx(10 * TOKENS_PER_BATCH * P0[1])


def test_nan_loss_raises_naming_domain_and_step(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.eval_override = {1: float("nan")}
    with pytest.raises(FloatingPointError, match=r"\['github'\] at step 20"):
        train(scheduler(), run, 0, 20, eval_interval=20)
    assert run.mixer.calls == [] and run.schedule_lines() == []


def test_nan_train_loss_raises_in_ema_mode(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.stats.loss_override = {2: float("inf")}
    with pytest.raises(FloatingPointError, match=r"\['wiki'\] at step 1"):
        train(scheduler(loss_source="train_ema"), run, 0, 5, eval_interval=1000)


def test_nan_loss_skip_keeps_proportions(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.eval_override = {0: float("nan")}
    callback = scheduler(on_nan="skip")
    train(callback, run, 0, 40, eval_interval=20)
    assert run.mixer.calls == [] and run.schedule_lines() == []
    run.eval_override = {}
    train(callback, run, 40, 60, eval_interval=20)
    assert [line["step"] for line in run.schedule_lines()] == [60]


def test_data_usage_at_fit_end(tmp_path: Path) -> None:
    run = Run(tmp_path)
    callback = scheduler(policy="constant", reference_losses=None)
    train(callback, run, 0, 50, eval_interval=10)
    finish(callback, run)
    usage = json.loads((tmp_path / "runs" / "fake-run" / "data_usage.json").read_text())
    assert usage["total_tokens"] == pytest.approx(50 * TOKENS_PER_BATCH)
    for domain, share in zip(DOMAINS, P0, strict=True):
        assert usage["domains"][domain]["fraction"] == pytest.approx(share)
        assert run.logger.metrics[-1][f"metrics/data/{domain}/total_tokens"] == pytest.approx(50 * TOKENS_PER_BATCH * share)


def test_initial_proportions_override_the_mixer(tmp_path: Path) -> None:
    run = Run(tmp_path)
    callback = scheduler(policy="constant", reference_losses=None, initial_proportions={"cc": 0.5, "github": 0.25,
                                                                                        "wiki": 0.25})
    train(callback, run, 0, 20, eval_interval=20)
    assert run.mixer.calls[0] == ([0.5, 0.25, 0.25], 0)
    assert run.schedule_lines()[0]["proportions"] == {"cc": 0.5, "github": 0.25, "wiki": 0.25}


def test_two_ranks_hold_identical_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 decides and broadcasts; rank 1 adopts the decision and the policy state, writes nothing."""
    mailbox: list[Any] = []

    class FakeDist:
        rank = 0

        def get_global_rank(self) -> int:
            return self.rank

        def all_reduce(self, tensor: torch.Tensor, reduce_operation: str = "SUM") -> None:
            tensor.mul_(2)  # both ranks contribute the same half

        def broadcast_object_list(self, objects: list[Any], src: int = 0) -> None:
            if self.rank == 0:
                mailbox.append(objects[0])
            else:
                objects[0] = mailbox.pop(0)

    fake = FakeDist()
    monkeypatch.setattr(drpruning.scheduling.scheduler, "dist", fake)
    monkeypatch.setattr(drpruning.scheduling.measurement, "dist", fake)
    monkeypatch.setattr(drpruning.runs, "dist", fake)
    runs = {rank: Run(tmp_path / f"rank{rank}", world_size=2) for rank in (0, 1)}
    callbacks = {rank: scheduler() for rank in (0, 1)}
    for rank in (0, 1):
        runs[rank].folder.mkdir()
    for start in range(0, MAX_BATCHES, 20):  # lockstep, 20 batches at a time
        for rank in (0, 1):
            fake.rank = rank
            train(callbacks[rank], runs[rank], start, start + 20, eval_interval=20)
    assert callbacks[0].state_dict() == callbacks[1].state_dict()
    assert runs[0].mixer.calls == runs[1].mixer.calls and len(runs[0].mixer.calls) == 10
    assert runs[1].schedule_lines() == [] and len(runs[0].schedule_lines()) == 10
    single = Run(tmp_path / "single")
    single.folder.mkdir()
    fake.rank = 0
    single_dist = SimpleNamespace(get_global_rank=lambda: 0, all_reduce=lambda tensor, reduce_operation="SUM": None,
                                  broadcast_object_list=lambda objects, src=0: None)
    monkeypatch.setattr(drpruning.scheduling.scheduler, "dist", single_dist)
    monkeypatch.setattr(drpruning.scheduling.measurement, "dist", single_dist)
    train(scheduler(), single, 0, MAX_BATCHES, eval_interval=20)
    assert single.schedule_lines() == runs[0].schedule_lines()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"policy": "doremi"}, "unknown policy"),
    ({"update_interval": 0}, "update_interval"),
    ({"update_interval": 2.5}, "update_interval"),
    ({"loss_source": "train"}, "loss_source"),
    ({"on_nan": "ignore"}, "on_nan"),
    ({"reference_losses": None}, "needs reference_losses"),
    ({"reference_losses": "target"}, "'source'"),
    ({"rho": -1.0}, "rho"),
    ({"policy": "sheared", "dynamic_reference_ratio": True}, "apply to dro"),
    ({"rhoo": 0.1}, r"unknown data_scheduler option\(s\) \['rhoo'\]; valid options: .*\brho\b.*\bupdate_interval\b"),
])
def test_config_errors_at_construction(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scheduler(**overrides)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"reference_losses": {**REFERENCE, "arxiv": 1.4}}, r"unknown domain\(s\) \['arxiv'\]"),
    ({"reference_losses": {"cc": 2.3, "github": 1.2}}, r"misses domain\(s\) \['wiki'\]"),
    ({"initial_proportions": [0.5, 0.5]}, "2 entries but there are 3 domains"),
    ({"initial_proportions": [0.5, 0.3, 0.1]}, "sum to 1"),
    ({"initial_proportions": {"cc": 0.5, "github": 0.5}}, r"misses domain\(s\) \['wiki'\]"),
])
def test_config_errors_against_the_mixer(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train(scheduler(**overrides), Run(tmp_path), 0, 1, eval_interval=20)


def test_every_yaml_key_is_documented() -> None:
    """A yaml author reads the callback's docstring: each key it accepts has its own line there."""
    keys = [name for name in inspect.signature(DataScheduler).parameters if name != "policy_settings"]
    keys += [field.name for field in dataclasses.fields(PolicySettings)]
    assert DataScheduler.__doc__ is not None
    for key in keys:
        assert re.search(rf"^ +{key}:", DataScheduler.__doc__, re.MULTILINE), key


@pytest.mark.parametrize(("lacks", "message"), [
    ("set_proportions", "domain_mixture train loader"),
    ("domain_stats", "per-domain statistics"),
])
def test_a_dataset_or_model_without_the_contract_is_refused(tmp_path: Path, lacks: str, message: str) -> None:
    run = Run(tmp_path)
    if lacks == "set_proportions":
        run.state.train_dataloader = SimpleNamespace(dataset=SimpleNamespace(
            domains=DOMAINS, initial_proportions=P0, proportions_at=run.mixer.proportions_at))
    else:
        run.state.model = SimpleNamespace(pruning_stats=run.model.pruning_stats)
    with pytest.raises(TypeError, match=message):
        train(scheduler(), run, 0, 1, eval_interval=20)


def test_max_duration_must_be_in_batches(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.state.max_duration = Time.from_timestring("1ep")
    with pytest.raises(ValueError, match="batches"):
        train(scheduler(), run, 0, 1, eval_interval=20)


def test_run_folder_follows_the_checkpoint_saver(tmp_path: Path) -> None:
    from composer.callbacks import CheckpointSaver

    run = Run(tmp_path)
    assert drpruning.runs.run_folder(run.state) == Path("runs/fake-run")
    run.state.callbacks = [CheckpointSaver(folder=str(tmp_path / "{run_name}" / "checkpoints"))]
    assert drpruning.runs.run_folder(run.state) == tmp_path / "fake-run" / "checkpoints"


def test_nan_source_eval_stops_even_with_skip(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.eval_override = {2: float("nan")}
    callback = scheduler(policy="dro", reference_losses="source", update_interval=50, on_nan="skip")
    with pytest.raises(FloatingPointError, match=r"source eval loss for domain\(s\) \['wiki'\] at step 0"):
        train(callback, run, 0, 50, eval_interval=50, eval_first=True)
