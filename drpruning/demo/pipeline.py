"""The steps shared by the demo, the ablation and the tests, run from a checkout: resumable stages, logged
commands, a `composer` launch of `scripts/train.py`, and the newest `hf_checkpointer` folder of a run.

A stage writes a marker holding its wall time when it finishes, so a second `make demo` (or an interrupted
ablation) skips what is done. A command's whole output goes to its log file; a failure ends the program
with the log's tail.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root: commands run there, so recipe paths such as `yamls/demo/...` resolve."""
PROGRESS = re.compile(r"\[(batch|eval_batch)=\d+/\d+\]|Eval metrics/eval/\S+/LanguageCrossEntropy")
"""Lines of a training log worth echoing while it runs."""


def logger(prefix: str) -> Callable[[str], None]:
    """A `print` that stamps each message with `prefix` and the time."""

    def log(message: str) -> None:
        print(f"[{prefix} {time.strftime('%H:%M:%S')}] {message}", flush=True)

    return log


def stage(marker: Path, name: str, run: Callable[[], None], log: Callable[[str], None]) -> None:
    """Run `run` unless `marker` exists; write the marker (the stage's wall time in seconds) once it finishes."""
    if marker.exists():
        log(f"{name}: done before, reusing ({marker})")
        return
    log(f"{name}: starting")
    start = time.perf_counter()
    run()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{time.perf_counter() - start:.1f}\n")
    log(f"{name}: finished in {time.perf_counter() - start:.0f} s")


def run_logged(command: Sequence[str], log_file: Path, echo: Callable[[str], None] | None = None) -> None:
    """Run `command` from the repository root with its output in `log_file`; `echo` gets the progress lines.
    A non-zero exit ends the program with the command and the log's last 40 lines."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as handle:
        process = subprocess.Popen(list(command), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)  # fmt: skip
        for line in process.stdout:
            handle.write(line)
            if echo is not None and PROGRESS.search(line):
                echo("    " + line.strip()[:160])
        code = process.wait()
    if code != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"command failed with exit code {code}: {' '.join(command)}\n{tail}")


def train_command(yaml: str, overrides: Sequence[str], ranks: int = 2) -> list[str]:
    """`composer -n ranks scripts/train.py yaml overrides...`, with the `composer` beside this Python."""
    return [str(Path(sys.executable).with_name("composer")), "-n", str(ranks), "scripts/train.py", yaml, *overrides]


def latest_hf_checkpoint(run: Path) -> Path:
    """The newest `hf_checkpointer` export of a continued-pretraining run (`run/huggingface/ba<N>`)."""
    folders = sorted((run / "huggingface").glob("ba*"), key=lambda p: int(p.name[2:]))
    if not folders:
        raise SystemExit(f"{run} holds no hf_checkpointer export")
    return folders[-1]
