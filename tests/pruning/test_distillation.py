"""Logit distillation from a frozen teacher: the loss by hand, the teacher out of checkpoints, bad teachers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from drpruning.demo.tiny import make_tiny_tokenizer, tiny_model
from drpruning.errors import ConfigError
from drpruning.pruning.distillation import DistillationConfig
from drpruning.pruning.model import DRPruningCausalLM
from drpruning.pruning.shapes import PRUNING_MODULES
from tests.helpers import run_training

TARGET = {"n_layers": 3, "hidden_size": 48, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 96}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("distill") / "source"
    tokenizer = make_tiny_tokenizer(folder, vocab_size=300)
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(folder)
    return folder, tokenizer


def _model(source, distillation=None, l0=True) -> DRPruningCausalLM:
    folder, tokenizer = source
    return DRPruningCausalLM(
        tokenizer=tokenizer, pretrained_model_name_or_path=str(folder), use_train_metrics=False,
        l0_module={"pruning_modules": list(PRUNING_MODULES), "target": TARGET} if l0 else None,
        distillation=distillation,
    )  # fmt: skip


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels, "domain": torch.tensor([0, 1])}


def _losses(model: DRPruningCausalLM, batch) -> dict[str, torch.Tensor]:
    model.train()
    if model.l0_module is not None:
        model.l0_module.train_step = 0
    return model.loss(model(batch), batch)


def _by_hand(model: DRPruningCausalLM, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, T^2 KL(teacher_T || student_T)) of the student with the masks the model just sampled."""
    inputs = {"input_ids": batch["input_ids"]}
    student = model.model(**inputs).logits[:, :-1].float()  # masks still set from the last forward
    with torch.no_grad():
        teacher = model.teacher(**inputs).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(student.flatten(0, 1), targets.flatten(), ignore_index=-100)
    p_teacher = F.softmax(teacher / temperature, -1)
    kl = (p_teacher * (F.log_softmax(teacher / temperature, -1) - F.log_softmax(student / temperature, -1))).sum(-1)
    return ce, (kl * mask).sum() / mask.sum() * temperature**2


def test_weight_0_is_the_plain_loss_and_weight_1_temperature_1_is_the_kl(source):
    vocab = len(source[1])
    batch = _batch(vocab)
    plain = _model(source, l0=False)
    torch.manual_seed(0)
    expected = _losses(plain, batch)["total"]
    w0 = _model(source, {"teacher": "source", "weight": 0.0, "temperature": 2.0}, l0=False)
    assert torch.equal(_losses(w0, batch)["total"], expected)
    w1 = _model(source, {"teacher": "source", "weight": 1.0, "temperature": 1.0}, l0=False)
    with torch.no_grad():  # a student that differs from its teacher, so the KL is not 0
        w1.model.model.embed_tokens.weight.mul_(1.5)
    losses = _losses(w1, batch)
    ce, kl = _by_hand(w1, batch, 1.0)
    assert float(kl) > 1e-3
    torch.testing.assert_close(losses["total"], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["lm_loss"], ce.detach(), rtol=1e-5, atol=1e-6)


def test_mixed_loss_with_masks_and_the_lagrangian(source):
    batch = _batch(len(source[1]))
    model = _model(source, {"teacher": "source", "weight": 0.3, "temperature": 2.0})
    losses = _losses(model, batch)
    ce, kl = _by_hand(model, batch, 2.0)
    expected = 0.7 * ce + 0.3 * kl + losses["lagrangian_loss"]
    torch.testing.assert_close(losses["total"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["distill_loss"], kl.detach(), rtol=1e-5, atol=1e-6)
    loss_sum, tokens = model.distill_stats.take(2)
    assert float(tokens.sum()) == float((batch["labels"][:, 1:] != -100).sum())
    losses["total"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())  # frozen
    assert any(p.grad is not None for p in model.model.parameters())


def test_the_teacher_is_never_in_a_checkpoint_and_comes_back(source):
    model = _model(source, {"teacher": "source", "weight": 0.5, "temperature": 1.0})
    state = model.state_dict()
    assert state and not any(key.startswith("teacher.") for key in state)
    fresh = _model(source, {"teacher": "source", "weight": 0.5, "temperature": 1.0})
    with torch.no_grad():
        fresh.model.model.embed_tokens.weight.zero_()
    fresh.load_state_dict(state)  # strict: only the teacher's keys may be missing
    assert torch.equal(fresh.model.model.embed_tokens.weight, model.model.model.embed_tokens.weight)
    with pytest.raises(RuntimeError, match="missing keys"):
        fresh.load_state_dict({k: v for k, v in state.items() if "embed_tokens" not in k})
    fresh.train()
    assert not fresh.teacher.training


def test_bad_teachers_and_blocks_are_refused(source, tmp_path):
    folder, tokenizer = source
    other = tmp_path / "other"
    other_tokenizer = make_tiny_tokenizer(other, vocab_size=280)
    tiny_model("qwen2", vocab_size=len(other_tokenizer)).save_pretrained(other)
    with pytest.raises(ConfigError, match="vocabulary of 280 tokens, the student 300"):
        _model(source, {"teacher": str(other)})
    with pytest.raises(ConfigError, match="not a local Hugging Face folder"):
        _model(source, {"teacher": str(tmp_path / "absent")})
    for block, message in (({"teacher": "source", "wieght": 0.5}, "unknown model.distillation keys"),
                           ({"weight": 1.5}, "weight=1.5 must lie in"), ({"temperature": 0}, "temperature=0")):
        with pytest.raises(ConfigError, match=message):
            DistillationConfig.from_dict(block)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_a_tiny_pruning_run_with_distillation(tiny_assets, tmp_path, fsdp):
    import json

    run = tmp_path / "run"
    overrides = [f"variables.assets={tiny_assets}", f"save_folder={run}", "max_duration=6ba", "save_interval=6ba",
                 "model.l0_module.lagrangian_warmup=3ba", "variables.update_interval=3",
                 "callbacks.data_scheduler.min_points=5",
                 "model.distillation={teacher: source, weight: 0.5, temperature: 2.0}"]  # fmt: skip
    env = None
    if fsdp:
        overrides += ["fsdp_config.sharding_strategy=FULL_SHARD", "fsdp_config.state_dict_type=sharded"]
        env = {"FSDP_VERSION": "2"}
    run_training("yamls/tiny/prune_qwen2.yaml", overrides, env=env)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    distill = [line["loss/train/distill_loss"] for line in lines if "loss/train/distill_loss" in line]
    assert len(distill) == 6 and all(value > 0 for value in distill)
    per_domain = [line for line in lines if any(k.endswith("/train_distill_loss") for k in line)]
    assert per_domain
