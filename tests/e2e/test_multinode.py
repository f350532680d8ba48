"""Multi-node launch on loopback: two `composer` launchers as two nodes of two ranks each train exactly what
one launcher with four ranks trains (same batches on every rank, proportions, schedule, masks, losses).

Both "nodes" run on this machine and talk over 127.0.0.1 only (gloo on the loopback interface). What
separate machines do not share, each node gets its own: a working directory (LLM-Foundry writes a per-node
signal file there, named alike on every node) and a private /dev/shm (streaming's shared memory, named alike
on every node), the latter through a mount namespace (`unshare`); the test skips where none can be made.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.slow

WORLD_SIZE, STEPS, INTERVAL = 4, 4, 2
# Eval losses are float32 sums of per-rank partial sums, and streaming assigns eval samples to ranks by node
# layout, so they agree to rounding (1 ulp seen), not bit for bit; training sees no such difference.
EVAL_RTOL = 1e-6
TIMEOUT_S = 1800  # generous: a loaded 2-core machine starves 8 ranks for minutes
LAUNCHER = Path(sys.executable).with_name("composer")


# Run a command with a fresh tmpfs on /dev/shm: as root, or as root of a new user namespace.
_UNSHARE = (["unshare", "--mount", "--propagation", "private"], ["unshare", "--user", "--map-root-user", "--mount"])
_PRIVATE_SHM = ["sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh"]


@functools.cache
def _private_shm_prefix() -> list[str] | None:
    """The first `unshare` invocation this machine allows that gives a command its own /dev/shm."""
    if shutil.which("unshare") is None:
        return None
    for unshare in _UNSHARE:
        probe = subprocess.run([*unshare, *_PRIVATE_SHM, "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [*unshare, *_PRIVATE_SHM]
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _overrides(assets: Path, run: Path) -> list[str]:
    return [
        f"variables.assets={assets}", f"save_folder={run}", f"max_duration={STEPS}ba",
        f"variables.update_interval={INTERVAL}", f"save_interval={STEPS}ba",
        f"model.l0_module.lagrangian_warmup={INTERVAL}ba", "scheduler.t_warmup=2ba",
        "callbacks.data_scheduler.min_points=5", "global_train_batch_size=8", "device_train_microbatch_size=2",
        f"code_paths=[{REPO / 'tests' / 'probe_callback.py'}]", "callbacks.batch_probe={}",
    ]


def _launch(nodes: int, assets: Path, run: Path, probe: Path) -> None:
    """Start one launcher per node (all ranks when nodes == 1) and wait for all of them."""
    probe.mkdir(parents=True)
    private_shm = _private_shm_prefix()
    if private_shm is None:
        pytest.skip("needs `unshare` to give each simulated node its own /dev/shm (mount namespace)")
    port = _free_port()
    env = {**os.environ, "DRPRUNING_PROBE_DIR": str(probe), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    nproc = WORLD_SIZE // nodes
    processes = []
    for node in range(nodes):
        # Each node starts in its own working directory, as on separate machines: LLM-Foundry writes a
        # per-node signal file there whose name is the same on every node.
        workdir = probe.parent / f"{probe.name}-node{node}"
        workdir.mkdir()
        command = [str(LAUNCHER), "--world_size", str(WORLD_SIZE), "--nproc", str(nproc), "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / "scripts" / "train.py"),
                   str(REPO / "yamls" / "tiny" / "prune_llama_gqa.yaml"), *_overrides(assets, run)]
        log = (workdir / "launcher.log").open("w")
        processes.append((command, log, subprocess.Popen([*private_shm, *command], cwd=workdir, env=env, stdout=log,
                                                         stderr=subprocess.STDOUT, start_new_session=True)))
    failures = []
    for command, log, process in processes:
        try:
            code = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and its ranks
            process.wait()
            code = f"nothing after {TIMEOUT_S} s"
        log.close()
        if code != 0:
            failures.append(f"{' '.join(command)} exited {code}:\n{Path(log.name).read_text()[-5000:]}")
    if failures:
        pytest.fail("\n".join(failures))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_nodes_of_two_ranks_train_what_one_node_of_four_trains(tiny_assets, tmp_path):
    runs = {nodes: tmp_path / f"nodes{nodes}" for nodes in (2, 1)}
    for nodes, run in runs.items():
        _launch(nodes, tiny_assets, run, tmp_path / f"probe{nodes}")

    for rank in range(WORLD_SIZE):
        two, one = (_jsonl(tmp_path / f"probe{nodes}" / f"rank{rank}.jsonl") for nodes in (2, 1))
        assert [r["batch"] for r in two] == list(range(STEPS))
        assert two == one, f"rank {rank} trained on different batches"
    schedules = {nodes: _jsonl(run / "schedule.jsonl") for nodes, run in runs.items()}
    assert [line["step"] for line in schedules[2]] == [INTERVAL, 2 * INTERVAL]
    for two, one in zip(*schedules.values(), strict=True):
        for key in ("losses", "reference_losses"):  # from the evals
            assert two[key] == pytest.approx(one[key], rel=EVAL_RTOL, abs=0), key
            del two[key], one[key]
        assert two == one, f"scheduler updates differ at step {two['step']}"
    mask_files = {nodes: sorted(p.name for p in (run / "masks").glob("ba*.pt")) for nodes, run in runs.items()}
    assert mask_files[2] == mask_files[1] == [f"ba{INTERVAL}.pt", f"ba{STEPS}.pt"]
    for name in mask_files[2]:
        two, one = (torch.load(runs[nodes] / "masks" / name) for nodes in (2, 1))
        assert two.keys() == one.keys() and all(torch.equal(two[k], one[k]) for k in two), name
    losses = {nodes: [line["loss/train/total"] for line in _jsonl(run / "metrics.jsonl") if "loss/train/total" in line]
              for nodes, run in runs.items()}
    assert len(losses[2]) == STEPS and losses[2] == losses[1]
    weights = {nodes: torch.load(run / f"ep0-ba{STEPS}-rank0.pt", weights_only=False)["state"]["model"]
               for nodes, run in runs.items()}
    assert weights[2].keys() == weights[1].keys()
    assert all(torch.equal(weights[2][k], weights[1][k]) for k in weights[2]), "trained weights differ"
