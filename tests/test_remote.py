"""Remote data: a prepared folder at a remote (here a local folder, which streaming treats as one) is read
through a local cache, shard by shard on first use; the mixer and the evaluators see exactly the local data."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from llmfoundry.utils.builders import build_evaluators
from llmfoundry.utils.config_utils import TRAIN_CONFIG_KEYS, TrainConfig, make_dataclass_and_log_config
from omegaconf import OmegaConf
from streaming import LocalDataset, MDSWriter
from transformers import AutoTokenizer

from drpruning.data.mixer import (
    REMOTE_SHUFFLE_WINDOW,
    DomainBatchSampler,
    DomainMixtureDataset,
    collate_mixture_batch,
)
from drpruning.data.remote import CachedSplit, fetch_manifest, upload_prepared
from drpruning.demo.tiny import make_tiny_mds
from drpruning.errors import RemoteDataError

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, GLOBAL_BATCH = 32, 8
DOMAINS = ["prose", "code", "math"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder with several small shards per split, so on-demand downloads are visible."""
    return make_tiny_mds(tmp_path_factory.mktemp("remote"), n_domains=3, seq_len=SEQ_LEN, eval_sequences=6,
                         docs_per_domain=40, shard_size_limit=1024)


@pytest.fixture()
def remote(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared folder, standing in for the remote (tests may damage it)."""
    return Path(shutil.copytree(prepared, tmp_path / "remote"))


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("shard.*.mds"))


def _batches(dataset: DomainMixtureDataset, count: int, num_workers: int = 0) -> list[dict[str, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=DomainBatchSampler(dataset, 0, 1), collate_fn=collate_mixture_batch,
        num_workers=num_workers, prefetch_factor=2 if num_workers else None,
    )
    return list(itertools.islice(loader, count))


def _assert_same(got: list[dict[str, torch.Tensor]], expected: list[dict[str, torch.Tensor]]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["domain"], b["domain"])


def test_first_read_downloads_shards_on_demand_and_a_second_run_reads_the_cache(remote, tmp_path):
    cache = tmp_path / "cache"
    dataset = DomainMixtureDataset(cache, GLOBAL_BATCH, proportions=[0.5, 0.3, 0.2], seed=3, remote=str(remote))
    assert (cache / "manifest.json").read_bytes() == (remote / "manifest.json").read_bytes()
    for domain in DOMAINS:  # the indexes are fetched, no shard yet
        assert (cache / domain / "train" / "index.json").is_file() and _shards(cache / domain / "train") == []
    assert len(_shards(remote / "prose" / "train")) >= 3

    local = LocalDataset(local=str(remote / "prose" / "train"))
    last = len(local) - 1
    np.testing.assert_array_equal(dataset[(0, last)]["input_ids"].numpy(), local[last]["tokens"].astype(np.int64))
    assert _shards(cache / "prose" / "train") == [_shards(remote / "prose" / "train")[-1]]  # only that shard
    assert _shards(cache / "code" / "train") == []

    # The same batches as the local folder gives in the remote's order, through workers sharing the cache.
    expected = _batches(DomainMixtureDataset(remote, GLOBAL_BATCH, proportions=[0.5, 0.3, 0.2], seed=3,
                                             shuffle_window=REMOTE_SHUFFLE_WINDOW), 40)
    _assert_same(_batches(dataset, 40, num_workers=2), expected)
    assert _shards(cache / "prose" / "train") == _shards(remote / "prose" / "train")

    # Second run: the remote is gone, the cache serves everything, resume stays bit-exact.
    state = dataset.state_dict(num_samples=25 * GLOBAL_BATCH, from_beginning=True)
    shutil.rmtree(remote)
    again = DomainMixtureDataset(cache, GLOBAL_BATCH, proportions=[0.5, 0.3, 0.2], seed=3, remote=str(remote))
    _assert_same(_batches(again, 40), expected)
    resumed = DomainMixtureDataset(cache, GLOBAL_BATCH, proportions=[0.5, 0.3, 0.2], seed=3, remote=str(remote))
    resumed.load_state_dict(state)
    _assert_same(_batches(resumed, 15), expected[25:])


def _sample_in_last_shard(remote: Path, domain: str) -> tuple[int, str]:
    local = LocalDataset(local=str(remote / domain / "train"))
    return len(local) - 1, _shards(remote / domain / "train")[-1]


def test_a_missing_remote_shard_is_an_error_naming_it(remote, tmp_path):
    index, shard = _sample_in_last_shard(remote, "code")
    (remote / "code" / "train" / shard).unlink()
    dataset = DomainMixtureDataset(tmp_path / "cache", GLOBAL_BATCH, remote=str(remote))
    with pytest.raises(RemoteDataError, match=f"cannot fetch shard {remote / 'code' / 'train' / shard}"):
        dataset[(1, index)]
    assert dataset[(1, 0)]["input_ids"].numel() == SEQ_LEN  # other shards still read


def test_a_truncated_remote_shard_is_an_error_naming_it_and_is_not_kept(remote, tmp_path):
    index, shard = _sample_in_last_shard(remote, "math")
    path = remote / "math" / "train" / shard
    path.write_bytes(path.read_bytes()[:-10])
    cache = tmp_path / "cache"
    dataset = DomainMixtureDataset(cache, GLOBAL_BATCH, remote=str(remote))
    with pytest.raises(RemoteDataError, match=f"shard {path} is corrupt: {shard} has .* bytes, the index says"):
        dataset[(2, index)]
    assert not (cache / "math" / "train" / shard).exists()


def test_prepared_shards_carry_hashes_and_a_same_size_damage_is_caught(remote, tmp_path):
    import json

    for split in ("train", "eval"):
        index = json.loads((remote / "prose" / split / "index.json").read_text())
        assert all(shard["raw_data"]["hashes"].get("xxh64") for shard in index["shards"]), split
    index, shard = _sample_in_last_shard(remote, "code")
    path = remote / "code" / "train" / shard
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55  # one token's bytes: same size, other value
    path.write_bytes(bytes(data))
    dataset = DomainMixtureDataset(tmp_path / "cache", GLOBAL_BATCH, remote=str(remote))
    with pytest.raises(RemoteDataError, match=f"shard {path} is corrupt: {shard} fails its xxh64 check"):
        dataset[(1, index)]


def test_a_damaged_shard_of_an_index_with_hashes_fails_its_check(tmp_path):
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    with MDSWriter(out=str(remote / "train"), columns={"tokens": "ndarray:uint16"}, hashes=["sha1"],
                   size_limit=256) as writer:
        for i in range(20):
            writer.write({"tokens": np.arange(i, i + 8, dtype=np.uint16)})
    split = CachedSplit(str(remote), cache, "train")
    np.testing.assert_array_equal(split[19]["tokens"], np.arange(19, 27))
    shard = _shards(remote / "train")[0]
    data = bytearray((remote / "train" / shard).read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    (remote / "train" / shard).write_bytes(bytes(data))
    fresh = CachedSplit(str(remote), tmp_path / "other-cache", "train")
    with pytest.raises(RemoteDataError, match=f"shard {remote / 'train' / shard} is corrupt: .*fails its sha1"):
        fresh[0]


def test_remote_setup_errors(remote, tmp_path):
    with pytest.raises(RemoteDataError, match=f"cannot download {tmp_path / 'nowhere' / 'manifest.json'}"):
        DomainMixtureDataset(tmp_path / "cache", GLOBAL_BATCH, remote=str(tmp_path / "nowhere"))
    assert len(DomainMixtureDataset(tmp_path / "cache", GLOBAL_BATCH, remote=str(remote)).domains) == 3  # fixed
    fetch_manifest(str(remote), tmp_path / "cache2")
    with pytest.raises(RemoteDataError, match="holds data from remote .* not"):
        fetch_manifest(str(tmp_path / "elsewhere"), tmp_path / "cache2")
    with pytest.raises(RemoteDataError, match="not fetched from a remote"):
        fetch_manifest(str(remote), remote)  # the remote's own folder is no cache


def test_domain_eval_reads_the_remote_eval_split_through_the_cache(prepared, remote, tmp_path):
    cache = tmp_path / "cache"
    cfg = OmegaConf.create({
        "model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": "unused"},
        "tokenizer": {"name": "unused"},
        "optimizer": {"name": "decoupled_adamw", "lr": 1e-3},
        "scheduler": {"name": "constant_with_warmup", "t_warmup": "0ba"},
        "train_loader": {"name": "domain_mixture", "data_dir": str(cache), "remote": str(remote)},
        "max_duration": "2ba", "eval_interval": "1ba", "max_seq_len": SEQ_LEN, "seed": 17,
        "global_train_batch_size": 4, "device_train_microbatch_size": 4, "device_eval_batch_size": 4,
        "precision": "fp32",
        "eval_loader": {"name": "domain_eval", "data_dir": str(cache), "remote": str(remote)},
    })
    _, train_cfg = make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms="all")
    datasets = [loader["dataset"] for loader in train_cfg.eval_loaders]
    assert [(d["remote"], d["local"]) for d in datasets] == [(str(remote / d), str(cache / d)) for d in DOMAINS]
    tokenizer = AutoTokenizer.from_pretrained(str(prepared.parent / "tokenizer"))
    evaluators, _, _ = build_evaluators(
        train_cfg.eval_loaders, None, None, tokenizer=tokenizer, device_eval_batch_size=4,
        icl_seq_len=SEQ_LEN, icl_subset_num_batches=None,
    )
    for evaluator, domain in zip(evaluators, DOMAINS, strict=True):
        rows = torch.cat([batch["input_ids"] for batch in evaluator.dataloader.dataloader])
        reader = LocalDataset(local=str(remote / domain / "eval"))
        expected = np.stack([reader[i]["tokens"] for i in range(len(reader))]).astype(np.int64)
        np.testing.assert_array_equal(rows.numpy(), expected)
        assert _shards(cache / domain / "eval") == _shards(remote / domain / "eval")


def test_upload_prepared_copies_the_folder_manifest_last(prepared, tmp_path):
    target = tmp_path / "bucket" / "mix"
    sent = upload_prepared(prepared, str(target))
    assert sent[-1] == str(target / "manifest.json")
    files = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file())
    assert sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file()) == files
    assert all((target / f).read_bytes() == (prepared / f).read_bytes() for f in files)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        upload_prepared(tmp_path / "bucket", str(tmp_path / "other"))


def test_prepare_data_script_writes_straight_to_a_remote(prepared, tmp_path):
    corpus, tokenizer = prepared.parent / "corpus", prepared.parent / "tokenizer"
    target = tmp_path / "bucket"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--tokenizer", str(tokenizer), "--seq-len",
         str(SEQ_LEN), "--eval-sequences", "6", "--out", str(tmp_path / "out"), "--no-progress",
         f"--domain=prose={corpus / 'prose.jsonl.gz'}", "--remote", str(target)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"uploaded {tmp_path / 'out'} to {target}" in result.stdout
    split = CachedSplit(str(target / "prose"), tmp_path / "cache" / "prose", "eval")
    assert len(split) == 6
