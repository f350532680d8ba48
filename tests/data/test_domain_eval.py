"""The domain_eval config transform and foundry's stock text loader on the prepared eval splits."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from llmfoundry.utils.builders import build_evaluators
from llmfoundry.utils.config_utils import TRAIN_CONFIG_KEYS, TrainConfig, make_dataclass_and_log_config
from omegaconf import OmegaConf
from streaming import LocalDataset
from transformers import AutoTokenizer

from drpruning.data.domain_eval import expand_domain_eval
from drpruning.demo.tiny import make_tiny_mds

SEQ_LEN = 32
EVAL_SEQUENCES = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mds(tmp_path_factory.mktemp("domain_eval"), n_domains=3, seq_len=SEQ_LEN,
                         eval_sequences=EVAL_SEQUENCES, docs_per_domain=40)


def _train_cfg(eval_loader: object) -> dict:
    return {
        "model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": "unused"},
        "tokenizer": {"name": "unused"},
        "optimizer": {"name": "decoupled_adamw", "lr": 1e-3},
        "scheduler": {"name": "constant_with_warmup", "t_warmup": "0ba"},
        "train_loader": {"name": "domain_mixture", "data_dir": "unused"},
        "max_duration": "2ba",
        "eval_interval": "1ba",
        "max_seq_len": SEQ_LEN,
        "seed": 17,
        "global_train_batch_size": 4,
        "device_train_microbatch_size": 4,
        "device_eval_batch_size": 4,
        "precision": "fp32",
        "eval_loader": eval_loader,
    }


def test_configs_without_the_block_are_untouched():
    cfg = _train_cfg({"name": "text", "dataset": {"local": "x", "split": "val"}})
    before = copy.deepcopy(cfg)
    assert expand_domain_eval(cfg) == before
    del cfg["eval_loader"]
    assert expand_domain_eval(cfg) == {k: v for k, v in before.items() if k != "eval_loader"}


def test_block_expands_to_one_labelled_text_loader_per_domain(data_dir):
    cfg = _train_cfg({"name": "domain_eval", "data_dir": str(data_dir), "domains": ["math", "prose"]})
    expanded = expand_domain_eval(cfg)
    assert "eval_loader" not in expanded and cfg["eval_loader"]["name"] == "domain_eval"  # input not mutated
    loaders = expanded["eval_loaders"]
    assert [loader["label"] for loader in loaders] == ["math", "prose"]
    assert all(loader["name"] == "text" for loader in loaders)
    assert loaders[0]["dataset"] == {"local": str(data_dir / "math"), "split": "eval", "shuffle": False,
                                     "max_seq_len": SEQ_LEN}
    assert loaders[0]["prefetch_factor"] is None and loaders[0]["persistent_workers"] is False


def test_blocks_inside_a_list_expand_in_place(data_dir):
    other = {"label": "extra", "name": "text", "dataset": {"local": "x"}}
    cfg = {"max_seq_len": SEQ_LEN, "eval_loaders": [other, {"name": "domain_eval", "data_dir": str(data_dir)}]}
    assert [loader["label"] for loader in expand_domain_eval(cfg)["eval_loaders"]] == ["extra", "prose", "code", "math"]
    clash = {"max_seq_len": SEQ_LEN, "eval_loaders": [{**other, "label": "code"}, cfg["eval_loaders"][1]]}
    with pytest.raises(ValueError, match=r"label\(s\) \['code'\] appear more than once"):
        expand_domain_eval(clash)


@pytest.mark.parametrize(
    "block, message",
    [
        ({"domains": ["poetry"]}, r"unknown domain\(s\) \['poetry'\].*known domains: \['prose', 'code', 'math'\]"),
        ({"split": "validation"}, "domain_eval: domain .* has no .validation. split"),
        ({"shuffle": True}, r"unknown key\(s\) \['shuffle'\]"),
        ({"max_seq_len": 64}, "exceeds the prepared seq_len 32"),
    ],
)
def test_bad_blocks_are_rejected(data_dir, block, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        expand_domain_eval(_train_cfg({"name": "domain_eval", "data_dir": str(data_dir), **block}))


def test_missing_data_dir_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        expand_domain_eval(_train_cfg({"name": "domain_eval"}))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        expand_domain_eval(_train_cfg({"name": "domain_eval", "data_dir": str(tmp_path)}))


def test_foundry_builds_labelled_evaluators_that_read_the_eval_split(data_dir):
    """Runs foundry's own config path (all registered transforms) and its stock text loader.

    Streaming's shared memory is keyed by these tmp folders, so no global shm cleanup is needed (it would
    also unlink the segments of other live processes)."""
    cfg = OmegaConf.create(_train_cfg({"name": "domain_eval", "data_dir": str(data_dir)}))
    _, train_cfg = make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms="all")
    assert train_cfg.eval_loader is None
    tokenizer = AutoTokenizer.from_pretrained(str(data_dir.parent / "tokenizer"))
    evaluators, _, _ = build_evaluators(
        train_cfg.eval_loaders, None, None, tokenizer=tokenizer, device_eval_batch_size=4,
        icl_seq_len=SEQ_LEN, icl_subset_num_batches=None,
    )
    assert [e.label for e in evaluators] == ["eval/prose", "eval/code", "eval/math"]
    for evaluator, domain in zip(evaluators, ["prose", "code", "math"], strict=True):
        rows = torch.cat([batch["input_ids"] for batch in evaluator.dataloader.dataloader])
        assert rows.dtype == torch.int64
        reader = LocalDataset(local=str(data_dir / domain / "eval"))
        expected = np.stack([reader[i]["tokens"] for i in range(len(reader))]).astype(np.int64)
        np.testing.assert_array_equal(rows.numpy(), expected)
