"""The L0 module under mixed precision, FSDP2 and activation checkpointing: fp32 gate maths, replicated
state that stays identical on every rank, gradients averaged, and a clipping norm of its own."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from composer.algorithms import GradientClipping
from composer.core import Event
from transformers import AutoTokenizer

from drpruning.pruning.l0_training import (
    PruningGradientClipping,
    average_gradients_,
    replace_gradient_clipping_,
    replicate_,
    split_parameters,
)
from drpruning.pruning.masks import L0Module
from drpruning.pruning.model import DRPruningCausalLM
from drpruning.pruning.shapes import ModelShape

TARGET = {"n_layers": 3, "hidden_size": 48, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 96}
SHAPE = ModelShape(n_layers=4, hidden_size=64, n_heads=8, n_kv_heads=2, head_dim=8, intermediate_size=128,
                   vocab_size=512)  # fmt: skip


def _model(assets: Path) -> DRPruningCausalLM:
    source = assets / "llama_gqa"
    model = DRPruningCausalLM(tokenizer=AutoTokenizer.from_pretrained(source),
                              pretrained_model_name_or_path=str(source),
                              l0_module={"target": TARGET, "lagrangian_warmup": 4, "init_lambda_2": 3000.0})
    model.l0_module.train_step = 2  # mid-ramp: every module has a gap, so the Lagrangian is not 0
    with torch.no_grad():  # gates spread over the steep part of the sigmoid, where precision shows
        for log_alpha in model.l0_module.gates.values():
            log_alpha.copy_(torch.linspace(-2.0, 3.0, log_alpha.numel()).reshape(log_alpha.shape))
    return model


def _batch(rank: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(rank))
    return {"input_ids": ids, "labels": ids.clone(), "domain": torch.tensor([0, 1])}


def _l0_outputs(model: DRPruningCausalLM) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    model.l0_module._noise_step = -1  # the same draw again (noise is keyed by seed, rank, step, forward)
    return model.l0_module()


def _assert_same_gate_maths(got, want) -> None:
    masks, lagrangian, stats = got
    want_masks, want_lagrangian, want_stats = want
    assert lagrangian.dtype == torch.float32
    assert abs(float(lagrangian) - float(want_lagrangian)) <= 1e-6 * max(1.0, abs(float(want_lagrangian)))
    for name, value in want_stats.items():
        assert abs(float(stats[name]) - float(value)) <= 1e-6 * max(1.0, abs(float(value))), name
    for m, mask in want_masks.items():
        assert masks[m].dtype == torch.float32 and torch.equal(masks[m], mask), m


def test_gate_maths_is_fp32_under_bf16_autocast(tiny_assets):
    model = _model(tiny_assets).train()
    want = _l0_outputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _l0_outputs(model)
        logits = model(_batch())["logits"]
    assert logits.dtype == torch.bfloat16, "the decoder itself does run in bf16 under autocast"
    _assert_same_gate_maths(got, want)


def test_meta_l0_module_is_materialised_and_placed():
    with torch.device("meta"):
        l0 = L0Module(SHAPE, TARGET, init_lambda_2=5.0)
    replicate_(l0, torch.device("cpu"))
    fresh = L0Module(SHAPE, TARGET, init_lambda_2=5.0)
    for (name, got), want in zip(l0.named_parameters(), fresh.parameters(), strict=True):
        assert got.device.type == "cpu" and torch.equal(got, want), name


@pytest.mark.parametrize("clip_l0", [False, True])
def test_clipping_covers_the_weights_and_clips_the_l0_module_only_on_request(tiny_assets, clip_l0):
    model = _model(tiny_assets).train()
    batch = _batch()
    model.loss(model(batch), batch)["total"].backward()
    weights, l0 = split_parameters(model)
    assert weights and l0 and len(weights) + len(l0) == len(list(model.parameters()))
    before = {id(p): p.grad.clone() for p in [*weights, *l0] if p.grad is not None}

    def norm(params):
        return float(torch.linalg.vector_norm(torch.stack([before[id(p)].norm() for p in params if id(p) in before])))

    weight_norm, l0_norm = norm(weights), norm(l0)
    threshold = 0.5 * min(weight_norm, l0_norm)  # both over the threshold, by different factors

    class State:  # what the algorithm reads
        model = None

    state = State()
    state.model = model
    PruningGradientClipping("norm", threshold, clip_l0).apply(Event.AFTER_TRAIN_BATCH, state, None)
    for p in weights:
        if id(p) in before:
            torch.testing.assert_close(p.grad, before[id(p)] * (threshold / (weight_norm + 1e-6)), rtol=1e-5, atol=0)
    for p in l0:
        if id(p) in before:
            scale = threshold / (l0_norm + 1e-6) if clip_l0 else 1.0
            torch.testing.assert_close(p.grad, before[id(p)] * scale, rtol=1e-5, atol=0)


def test_the_runs_gradient_clipping_is_swapped_in_place():
    class State:
        algorithms = [GradientClipping("norm", 1.0)]

    assert replace_gradient_clipping_(State, clip_l0=True)
    swapped = State.algorithms[0]
    assert type(swapped) is PruningGradientClipping
    assert (swapped.clipping_type, swapped.clipping_threshold, swapped.clip_l0) == ("norm", 1.0, True)
    assert not replace_gradient_clipping_(State), "swapped once"


# ---- two ranks (gloo, CPU) ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, assets: Path, out: Path, check: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "NODE_RANK": "0"})  # fmt: skip
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = CHECKS[check](rank, assets)
        torch.save(result, out / f"rank{rank}.pt")
        # gloo's worker thread may still be freeing the last all-reduce, whose tensor is a Python object:
        # destroying the group then (holding the GIL, joining that thread) deadlocked. A barrier runs after it.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _shard(model: DRPruningCausalLM, mixed_precision: str, checkpointing: bool = False) -> None:
    from composer.core import Precision
    from composer.distributed.activation_checkpointing import apply_ac, generate_composer_model_check_fn
    from composer.distributed.fsdp2 import prepare_fully_shard
    from composer.distributed.fsdp2_utils import generate_composer_model_policy
    from composer.utils.parallelism import FSDP2Config

    if checkpointing:
        apply_ac(model, activation_checkpointing=True, activation_cpu_offload=False,
                 check_fn=generate_composer_model_check_fn(model))  # what Composer's trainer passes
    precision = Precision.AMP_BF16 if mixed_precision == "PURE" else Precision.FP32
    prepare_fully_shard(model, FSDP2Config(mixed_precision=mixed_precision), precision,
                        generate_composer_model_policy(model))  # fmt: skip


def _check_bf16(rank: int, assets: Path) -> dict:
    reference = _model(assets).train()
    want = _l0_outputs(reference)
    model = _model(assets).train()
    _shard(model, "PURE")
    dtypes = []
    hook = model.model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: dtypes.append(module.weight.dtype))
    model(_batch(rank))
    hook.remove()
    got = _l0_outputs(model)
    return {"decoder_dtype": dtypes[0], "got": got, "want": want,
            "l0_types": {type(p).__name__ for p in model.l0_module.parameters()}}


def _check_checkpointing(rank: int, assets: Path) -> dict:
    results = {}
    for checkpointing in (False, True):
        model = _model(assets).train()
        model.l0_module.noise_rank = rank
        _shard(model, "DEFAULT", checkpointing)
        batch = _batch(rank)
        loss = model.loss(model(batch), batch)["total"]
        loss.backward()
        average_gradients_(model.l0_module)
        results[checkpointing] = {
            "loss": float(loss.detach()),
            "gate_grads": {m: p.grad.clone() for m, p in model.l0_module.gates.items()},
            "lambda_grads": {m: p.grad.clone() for m, p in model.l0_module.lambda_1.items()},
            "checkpointed": any("CheckpointWrapper" in type(m).__name__ for m in model.modules()),
        }
    return results


def _check_replication(rank: int, assets: Path) -> dict:
    from drpruning.pruning.masks import L0Module

    if rank == 0:
        l0 = L0Module(SHAPE, TARGET)
        l0.order_gates_({m: torch.rand(g.shape, generator=torch.Generator().manual_seed(7))
                         for m, g in l0.gates.items()})  # fmt: skip
    else:
        with torch.device("meta"):  # as under init_device: mixed
            l0 = L0Module(SHAPE, TARGET)
    replicate_(l0, torch.device("cpu"))
    for p in l0.parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    average_gradients_(l0)
    return {"params": {n: p.detach().clone() for n, p in l0.named_parameters()},
            "grads": {n: p.grad.clone() for n, p in l0.named_parameters()}}


CHECKS = {"bf16": _check_bf16, "checkpointing": _check_checkpointing, "replication": _check_replication}


def _run_two_ranks(check: str, assets: Path, tmp_path: Path) -> list[dict]:
    mp.spawn(_worker, args=(2, _free_port(), assets, tmp_path, check), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_leaves_the_gate_maths_in_fp32(tiny_assets, tmp_path):
    for result in _run_two_ranks("bf16", tiny_assets, tmp_path):
        assert result["decoder_dtype"] == torch.bfloat16, "the policy did cast the sharded decoder"
        assert result["l0_types"] == {"Parameter"}, "the L0 module is not sharded"
        _assert_same_gate_maths(result["got"], result["want"])


@pytest.mark.slow
def test_fsdp2_activation_checkpointing_gives_the_same_losses_and_gate_gradients(tiny_assets, tmp_path):
    results = _run_two_ranks("checkpointing", tiny_assets, tmp_path)
    for result in results:
        plain, checkpointed = result[False], result[True]
        assert checkpointed["checkpointed"] and not plain["checkpointed"]
        assert abs(plain["loss"] - checkpointed["loss"]) <= 1e-6 * abs(plain["loss"])
        for m, grad in plain["gate_grads"].items():
            assert grad.abs().sum() > 0, m
            torch.testing.assert_close(checkpointed["gate_grads"][m], grad, rtol=1e-5, atol=1e-7)
        for m, grad in plain["lambda_grads"].items():
            torch.testing.assert_close(checkpointed["lambda_grads"][m], grad, rtol=1e-5, atol=1e-7)
    for key in ("gate_grads", "lambda_grads"):  # averaged: every rank holds the same gradients
        for m, grad in results[0][True][key].items():
            assert torch.equal(results[1][True][key][m], grad), (key, m)


@pytest.mark.slow
def test_replication_gives_every_rank_rank0s_values_and_averages_gradients(tmp_path):
    first, second = _run_two_ranks("replication", Path("."), tmp_path)
    for name, value in first["params"].items():
        assert torch.equal(second["params"][name], value), name
        assert torch.equal(first["grads"][name], torch.full_like(value, 1.5)), name
        assert torch.equal(second["grads"][name], torch.full_like(value, 1.5)), name
    assert not torch.equal(first["params"]["gates.intermediate"],
                           copy.deepcopy(L0Module(SHAPE, TARGET)).gates["intermediate"]), "rank 0's order arrived"  # fmt: skip
