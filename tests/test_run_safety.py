"""Files the project loads never run code; one writer per run folder; autoresume past a broken checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from drpruning.demo.pipeline import train_command
from drpruning.errors import CalibrationError, ConfigError, UnsafeFileError
from drpruning.launch import LOCK_FILE, acquire_run_lock, choose_resume_checkpoint
from drpruning.pruning.importance import Importance
from drpruning.safe_load import load_sharded_keys, load_torch_file
from tests.helpers import REPO, run_training


class _RunsCommand:
    """Unpickling this calls os.system: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path, wrap=lambda payload: {"state": {"model": payload}}) -> Path:
    torch.save(wrap(_RunsCommand(marker)), path)
    return path


@pytest.mark.slow  # starts a process
def test_crafted_checkpoint_runs_no_code_on_export(tmp_path):
    marker = tmp_path / "pwned"
    evil = _crafted(tmp_path / "evil.pt", marker)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "prune_to_dense.py"), str(evil), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert not marker.exists(), "the crafted checkpoint ran its command"
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "error:" in errors[0] and str(evil) in errors[0] and "system" in errors[0], result.stderr


def test_crafted_files_are_refused_everywhere_they_are_read(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafeFileError, match="importance.pt"):
        Importance.load(_crafted(tmp_path / "importance.pt", marker, wrap=lambda p: {"format_version": 1, "x": p}))
    with pytest.raises(UnsafeFileError, match="evil.pt"):
        load_torch_file(_crafted(tmp_path / "evil.pt", marker), "a Composer checkpoint", mmap=True)
    sharded = tmp_path / "ep0-ba1"
    sharded.mkdir()
    import pickle

    (sharded / ".metadata").write_bytes(pickle.dumps(_RunsCommand(marker)))
    with pytest.raises(UnsafeFileError, match="system"):
        load_sharded_keys(sharded, {"state.model"})
    cfg = OmegaConf.create({"load_path": str(tmp_path / "evil.pt"), "save_folder": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="evil.pt"):
        choose_resume_checkpoint(cfg)
    assert not marker.exists()


def test_unreadable_importance_file_is_a_calibration_error(tmp_path):
    broken = tmp_path / "importance.pt"
    broken.write_bytes(b"not a torch file")
    with pytest.raises(CalibrationError, match="importance.pt"):
        Importance.load(broken)


def _checkpoint(path: Path, step: int) -> None:
    torch.save({"state": {"model": {"w": torch.ones(2)}, "timestamp": {"batch": step}}}, path)


def test_autoresume_skips_a_truncated_newest_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for step in (2, 4, 6):
        _checkpoint(run / f"ep0-ba{step}-rank0.pt", step)
    newest = run / "ep0-ba6-rank0.pt"
    newest.write_bytes(newest.read_bytes()[:300])
    (run / "latest-rank0.pt").symlink_to(newest.name)
    cfg = OmegaConf.create({"autoresume": True, "save_folder": str(run), "save_overwrite": False})
    choose_resume_checkpoint(cfg)
    assert cfg.load_path == str(run / "ep0-ba4-rank0.pt") and not cfg.autoresume and cfg.save_overwrite
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "ep0-ba6-rank0.pt" in out[0] and "ep0-ba4-rank0.pt" in out[0]

    intact = OmegaConf.create({"autoresume": True, "save_folder": str(run)})
    (run / "latest-rank0.pt").unlink()
    (run / "latest-rank0.pt").symlink_to("ep0-ba4-rank0.pt")
    choose_resume_checkpoint(intact)  # an intact newest checkpoint: nothing changes
    assert "load_path" not in intact and intact.autoresume

    for step in (2, 4):
        (run / f"ep0-ba{step}-rank0.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        choose_resume_checkpoint(OmegaConf.create({"autoresume": True, "save_folder": str(run)}))


_HOLD_LOCK = """
import sys, time
from drpruning.launch import acquire_run_lock
acquire_run_lock(sys.argv[1], "first-run")
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # starts a process
def test_run_lock_refuses_a_second_writer_and_dies_with_its_process(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": "0"})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"{folder} is in use by a live run .*first-run.*pid.*{holder.pid}"):
            acquire_run_lock(str(folder), "second-run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert acquire_run_lock(str(folder), "after-kill").path == folder / LOCK_FILE  # kill -9 leaves no stuck lock
    assert acquire_run_lock("s3://bucket/run", "remote") is None  # remote folders are Composer's to manage


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_real_runs_on_one_folder(tiny_assets, tmp_path):
    """A second run on a live run's folder is refused at once; after kill -9 of the first, a resume works."""
    run = tmp_path / "run"
    common = [f"variables.assets={tiny_assets}", f"save_folder={run}", "eval_interval=1000ba",
              "callbacks.data_scheduler.update_interval=1000"]  # fmt: skip
    yaml = "yamls/tiny/prune_qwen2.yaml"
    first = subprocess.Popen(train_command(yaml, [*common, "max_duration=5000ba", "save_interval=10ba"]), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not list(run.glob("ep0-ba*-rank0.pt")):
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not get going"
            time.sleep(1)
        second = subprocess.run(train_command(yaml, [*common, "max_duration=20ba"]), cwd=REPO, capture_output=True,
                                text=True, timeout=600)
        assert first.poll() is None, "the first run must still be running"
        assert second.returncode == 2
        errors = [line for line in (second.stdout + second.stderr).splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{run} is in use by a live run" in errors[0], second.stdout[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    steps = _steps(run)
    assert steps == sorted(steps), "the first run's log must stay in step order"
    done = max(int(p.name.split("-ba")[1].split("-")[0]) for p in run.glob("ep0-ba*-rank0.pt"))
    run_training("yamls/tiny/prune_qwen2.yaml", [*common, f"max_duration={done + 4}ba", "save_interval=2ba",
                                                 "autoresume=true"])  # fmt: skip
    steps = _steps(run)
    assert steps == sorted(steps) and steps[-1] == done + 4
