"""The data scheduler drives the real mixer on 2 ranks: identical proportions everywhere, taking effect at
the declared batch, and domain counts that follow them."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO, run_training

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
    before = by_batch[0]  # the initial proportions, in force until the first update takes effect
    for update in updates[:-1]:
        effective = update["effective_batch"]
        assert effective == update["step"] + 2, "lag = num_workers * prefetch_factor"
        assert by_batch[effective - 1] == before, f"update of step {update['step']} took effect early"
        assert by_batch[effective] == list(update["proportions"].values())
        before = by_batch[effective]
    assert by_batch[updates[0]["effective_batch"]] != by_batch[0], "the first DRO update must move the mixture"

    def prose_fraction(batches):
        domains = [d for r in (0, 1) for rec in ranks[r] if rec["batch"] in batches for d in rec["domains"]]
        return domains.count(0) / len(domains)

    before, after = prose_fraction(range(0, 6)), prose_fraction(range(6, 16))
    assert updates[0]["proportions"]["prose"] > 0.6
    assert before < 0.25 and after > before + 0.3, (before, after)


def test_drpruning_reference_losses_leave_the_source_values_after_the_first_fit(tiny_assets, tmp_path):
    """`reference_losses: source` in a real pruning run: the first scaling-law fit (from 20 % of training,
    once a domain has min_points points) *replaces* the source loss, which a pruned model never reaches;
    the first periodic eval scores the current model, close to the source."""
    run = tmp_path / "run"
    run_training(
        "yamls/tiny/prune_llama_gqa.yaml",
        [f"variables.assets={tiny_assets}", f"save_folder={run}", "max_duration=12ba", "variables.update_interval=2",
         "save_interval=12ba", "model.l0_module.lagrangian_warmup=4ba", "scheduler.t_warmup=2ba",
         "callbacks.data_scheduler.policy=drpruning", "callbacks.data_scheduler.reference_losses=source",
         "callbacks.data_scheduler.min_points=5"],
    )
    updates = [json.loads(line) for line in (run / "schedule.jsonl").read_text().splitlines()]
    assert [u["step"] for u in updates] == [2, 4, 6, 8, 10, 12]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def eval_losses(step: int) -> dict[str, float]:
        return {k.split("/")[2]: v for m in metrics if m["step"] == step for k, v in m.items()
                if k.startswith("metrics/eval/") and k.endswith("/LanguageCrossEntropy")}

    source = eval_losses(0)
    assert updates[0]["reference_losses"] == pytest.approx(source, rel=1e-6)
    # Fits need 5 points: the fifth update (step 10, progress 0.83 ≥ 0.2) is the first one that fits.
    for update in updates[:4]:
        assert update["reference_losses"] == updates[0]["reference_losses"]
    fitted = updates[4]["reference_losses"]
    assert all(fitted[d] != source[d] for d in source), fitted
    for d in source:  # after the first fit a reference never rises
        assert updates[5]["reference_losses"][d] <= fitted[d]
    first_eval = eval_losses(2)
    assert max(abs(first_eval[d] - source[d]) for d in source) < 0.5
    kept = {k: v for m in metrics if m["step"] == 2 for k, v in m.items() if k.startswith("metrics/eval_masks/")}
    assert {"metrics/eval_masks/kept/layer", "metrics/eval_masks/params"} <= set(kept)
