"""The data scheduler drives the real mixer on 2 ranks: identical proportions everywhere, taking effect at
the declared batch, and domain counts that follow them."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_training

pytestmark = pytest.mark.slow


def test_scheduler_updates_reach_every_rank_and_move_domain_counts(tiny_assets, tmp_path):
    run, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    run_training(
        "yamls/tiny/prune_llama_gqa.yaml",
        [f"variables.assets={tiny_assets}", f"save_folder={run}", "max_duration=16ba", "variables.update_interval=4",
         "save_interval=16ba", "model.l0_module.lagrangian_warmup=4ba", "scheduler.t_warmup=2ba",
         "eval_first=false", "train_loader.num_workers=2", "train_loader.prefetch_factor=1",
         f"code_paths=[{REPO / 'tests' / 'probe_callback.py'}]", "callbacks.batch_probe={}",
         # a strong, predictable shift: prose starts rare and is the only domain above its reference loss
         "train_loader.proportions={prose: 0.1, code: 0.3, math: 0.3, facts: 0.3}",
         "callbacks.data_scheduler.policy=dro", "callbacks.data_scheduler.rho=10.0",
         "callbacks.data_scheduler.reference_losses={prose: 0.0, code: 50.0, math: 50.0, facts: 50.0}"],
        env={"DRPRUNING_PROBE_DIR": str(probe)},
    )
    ranks = [[json.loads(line) for line in (probe / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [r["batch"] for r in ranks[0]] == list(range(16))
    for a, b in zip(*ranks, strict=True):
        assert a["proportions"] == b["proportions"], f"ranks disagree at batch {a['batch']}"

    updates = [json.loads(line) for line in (run / "schedule.jsonl").read_text().splitlines()]
    assert [u["step"] for u in updates] == [4, 8, 12, 16]
    by_batch = {r["batch"]: [float.fromhex(p) for p in r["proportions"]] for r in ranks[0]}
    for update in updates[:-1]:
        effective = update["effective_batch"]
        assert effective == update["step"] + 2, "lag = num_workers * prefetch_factor"
        assert by_batch[effective] == list(update["proportions"].values())
        assert by_batch[effective - 1] != by_batch[effective] or update is not updates[0]

    def prose_fraction(batches):
        domains = [d for r in (0, 1) for rec in ranks[r] if rec["batch"] in batches for d in rec["domains"]]
        return domains.count(0) / len(domains)

    before, after = prose_fraction(range(0, 6)), prose_fraction(range(6, 16))
    assert updates[0]["proportions"]["prose"] > 0.6
    assert before < 0.25 and after > before + 0.3, (before, after)
