"""Train with LLM-Foundry's trainer: `composer -n N scripts/train.py <yaml> [key=value ...]`.

drpruning's model, callbacks, dataloader and config transform are registered through entry points
(pyproject.toml), so this is LLM-Foundry's own `train`, with three differences from `train_from_yaml`:
- A mapping keyed by domain given on the command line (`train_loader.proportions={a: 0.5, b: 0.5}`, also
  `initial_proportions` and `reference_losses`) replaces the yaml's instead of being merged into it, so
  a shipped recipe takes your own domains (see README, "Bring your own data").
- A configuration error that drpruning detects (`drpruning.errors.ConfigError`) is printed as one
  `error: ...` line (once, by rank 0) and the exit code is 2; anything else keeps its traceback.
- Before training, global rank 0 locks the run folder (a second live run on it is refused) and the
  checkpoint a resume would read is checked: a crafted one is refused, a truncated newest one skipped with
  autoresume (`drpruning/launch.py`).
- On CPU, each rank gets its share of the cores (unless OMP_NUM_THREADS is set): N ranks with all-core
  thread pools each would oversubscribe.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence

import torch
from llmfoundry.command_utils import train
from omegaconf import DictConfig, OmegaConf as om

from drpruning.errors import ConfigError, report_config_error
from drpruning.launch import acquire_run_lock, choose_resume_checkpoint

DOMAIN_KEYED = ("proportions", "initial_proportions", "reference_losses")
"""Config keys whose mapping names domains: a command-line mapping replaces the yaml's."""


def _domain_keyed_paths(cfg: DictConfig, prefix: str = "") -> Iterator[str]:
    for key, value in cfg.items_ex(resolve=False):
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            if key in DOMAIN_KEYED:
                yield path
            else:
                yield from _domain_keyed_paths(value, path + ".")


def load_config(yaml_path: str, overrides: Sequence[str]) -> DictConfig:
    """The yaml with `key=value` overrides applied as `train_from_yaml` does, except that a domain-keyed
    mapping on the command line replaces the yaml's mapping rather than being merged into it."""
    om.clear_resolver("oc.env")  # as llmfoundry's train_from_yaml
    with open(yaml_path) as f:
        cfg = om.load(f)
    if overrides:
        cli = om.from_cli(list(overrides))
        for path in _domain_keyed_paths(cli):
            om.update(cfg, path, None, merge=False)
        cfg = om.merge(cfg, cli)
    assert isinstance(cfg, DictConfig)
    return cfg


def main(argv: Sequence[str]) -> int:
    if not argv:
        print("usage: composer -n N scripts/train.py <yaml> [key=value ...]", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    lock = None
    try:
        cfg = load_config(argv[0], argv[1:])
        lock = acquire_run_lock(cfg.get("save_folder"), cfg.get("run_name"))  # held until the process exits
        choose_resume_checkpoint(cfg)
        train(cfg)
    except ConfigError as error:
        if lock is not None:
            lock.abandon()  # a refused start leaves the folder as it found it
        return report_config_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
