"""Remote data: a prepared folder at a remote is read through a local cache, shard by shard, ahead of use
and within a size limit; the mixer and the evaluators see exactly the local data. Each remote test runs
against an S3 server on loopback (moto's, `s3_bucket` in conftest.py) and against a local folder, which
streaming also treats as a remote."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
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
from drpruning.demo.local_s3 import s3_client
from drpruning.demo.tiny import make_tiny_mds
from drpruning.errors import ConfigError, RemoteDataError

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN, GLOBAL_BATCH = 32, 8
DOMAINS = ["prose", "code", "math"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder with several small shards per split, so on-demand downloads are visible."""
    return make_tiny_mds(tmp_path_factory.mktemp("remote"), n_domains=3, seq_len=SEQ_LEN, eval_sequences=6,
                         docs_per_domain=40, shard_size_limit=1024)


@dataclass
class Remote:
    """Where a test's copy of the prepared folder lives: `url` for the code under test; the rest to inspect
    or damage it (`rel` is a path inside the folder, such as "code/train/shard.00001.mds")."""

    url: str
    folder: Path | None = None  # a local-folder remote
    bucket: str = ""
    prefix: str = ""

    def join(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), *parts])

    def read(self, rel: str) -> bytes:
        if self.folder is not None:
            return (self.folder / rel).read_bytes()
        return s3_client().get_object(Bucket=self.bucket, Key=f"{self.prefix}/{rel}")["Body"].read()

    def write(self, rel: str, data: bytes) -> None:
        if self.folder is not None:
            (self.folder / rel).write_bytes(data)
        else:
            s3_client().put_object(Bucket=self.bucket, Key=f"{self.prefix}/{rel}", Body=data)

    def delete(self, rel: str = "") -> None:
        """Delete one file, or with no argument the whole folder."""
        if self.folder is not None:
            shutil.rmtree(self.folder) if not rel else (self.folder / rel).unlink()
            return
        client = s3_client()
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/{rel}")
                .get("Contents", [])] if not rel else [f"{self.prefix}/{rel}"]
        for key in keys:
            client.delete_object(Bucket=self.bucket, Key=key)


def _copy_to_remote(kind: str, prepared: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Remote:
    if kind == "local":
        folder = Path(shutil.copytree(prepared, tmp_path / "remote"))
        return Remote(url=str(folder), folder=folder)
    bucket_url = request.getfixturevalue("s3_bucket")
    prefix = f"mix-{uuid.uuid4().hex[:8]}"
    upload_prepared(prepared, f"{bucket_url}/{prefix}")
    return Remote(url=f"{bucket_url}/{prefix}", bucket=bucket_url.removeprefix("s3://"), prefix=prefix)


@pytest.fixture(params=["local", "s3"])
def remote(request: pytest.FixtureRequest, prepared: Path, tmp_path: Path) -> Remote:
    """A private copy of the prepared folder at a remote (tests may damage it): a local folder or S3."""
    return _copy_to_remote(request.param, prepared, tmp_path, request)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough 1 KB shards per domain that a cache limit binds."""
    return make_tiny_mds(tmp_path_factory.mktemp("many"), n_domains=3, seq_len=SEQ_LEN, eval_sequences=6,
                         docs_per_domain=200, shard_size_limit=1024)


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


def test_first_read_downloads_shards_on_demand_and_a_second_run_reads_the_cache(prepared, remote, tmp_path):
    cache = tmp_path / "cache"
    mix = {"proportions": [0.5, 0.3, 0.2], "seed": 3}
    dataset = DomainMixtureDataset(cache, GLOBAL_BATCH, remote=remote.url, predownload=0, **mix)
    assert (cache / "manifest.json").read_bytes() == remote.read("manifest.json")
    for domain in DOMAINS:  # the indexes are fetched, no shard yet
        assert (cache / domain / "train" / "index.json").is_file() and _shards(cache / domain / "train") == []
    assert len(_shards(prepared / "prose" / "train")) >= 3

    local = LocalDataset(local=str(prepared / "prose" / "train"))
    last = len(local) - 1
    np.testing.assert_array_equal(dataset[(0, last)]["input_ids"].numpy(), local[last]["tokens"].astype(np.int64))
    assert _shards(cache / "prose" / "train") == [_shards(prepared / "prose" / "train")[-1]]  # only that shard
    assert _shards(cache / "code" / "train") == []

    # The same batches as the local folder gives in the remote's order, through workers sharing the cache,
    # with the look-ahead on.
    expected = _batches(DomainMixtureDataset(prepared, GLOBAL_BATCH, shuffle_window=REMOTE_SHUFFLE_WINDOW, **mix), 40)
    dataset = DomainMixtureDataset(cache, GLOBAL_BATCH, remote=remote.url, **mix)
    _assert_same(_batches(dataset, 40, num_workers=2), expected)
    dataset.shard_cache.wait()
    assert _shards(cache / "prose" / "train") == _shards(prepared / "prose" / "train")

    # Second run: the remote is gone, the cache serves everything, resume stays bit-exact.
    state = dataset.state_dict(num_samples=25 * GLOBAL_BATCH, from_beginning=True)
    remote.delete()
    again = DomainMixtureDataset(cache, GLOBAL_BATCH, remote=remote.url, **mix)
    _assert_same(_batches(again, 40), expected)
    resumed = DomainMixtureDataset(cache, GLOBAL_BATCH, remote=remote.url, **mix)
    resumed.load_state_dict(state)
    _assert_same(_batches(resumed, 15), expected[25:])


def _shard_of(dataset: DomainMixtureDataset, key: tuple[int, int]) -> int:
    return int(dataset.readers[key[0]].shards_of([key[1]])[0])


@pytest.mark.parametrize("predownload", [None, 0])
def test_the_look_ahead_has_each_batch_s_shards_cached_before_the_batch_is_read(remote, tmp_path, predownload):
    dataset = DomainMixtureDataset(tmp_path / "cache", GLOBAL_BATCH, proportions=[0.5, 0.3, 0.2], seed=3,
                                   remote=remote.url, predownload=predownload)
    sampler = iter(DomainBatchSampler(dataset, 0, 1))
    for key in next(sampler):
        dataset[key]
    waits = 0
    for _ in range(30):
        batch = next(sampler)
        if dataset.shard_cache is not None:
            dataset.shard_cache.wait()
        waits += sum(not dataset.readers[d].is_ready(_shard_of(dataset, (d, i))) for d, i in batch)
        for key in batch:
            dataset[key]
    if predownload is None:  # the default: 4 batches ahead, by a background thread
        assert waits == 0
    else:
        assert dataset.shard_cache is None and waits > 0  # reads download their shards themselves


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_cache_limit_bounds_the_cache_and_leaves_the_batches_unchanged(kind, many_shards, tmp_path, request):
    prepared, remote = many_shards, _copy_to_remote(kind, many_shards, tmp_path, request)
    mix = {"proportions": [0.5, 0.3, 0.2], "seed": 3, "shuffle_window": 1}
    expected = _batches(DomainMixtureDataset(prepared, GLOBAL_BATCH, **mix), 150)
    mix["predownload"] = 8
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"cache_limit '1kb' \(1024 bytes\) cannot hold .* at least (\d+) bytes") as error:
        DomainMixtureDataset(cache, GLOBAL_BATCH, remote=remote.url, cache_limit="1kb", **mix)
    limit = int(re.search(r"at least (\d+) bytes", str(error.value)).group(1))
    total = sum(p.stat().st_size for p in prepared.glob("*/train/shard.*.mds"))
    assert total > 1.5 * limit, (total, limit)  # the limit binds

    dataset = DomainMixtureDataset(cache, GLOBAL_BATCH, remote=remote.url, cache_limit=limit, **mix)
    got, sampler = [], iter(DomainBatchSampler(dataset, 0, 1))
    for _ in range(150):
        batch = next(sampler)
        dataset.shard_cache.wait()
        assert sum(p.stat().st_size for p in cache.glob("*/train/shard.*.mds")) <= limit
        got.append(collate_mixture_batch([dataset[key] for key in batch]))
    _assert_same(got, expected)
    fetched = sum(r.fetched_bytes for r in dataset.readers)
    assert fetched > 1.5 * limit  # the run went through more shards than the cache may hold

    for bad, message in [({"cache_limit": limit, "shuffle_window": 0}, "needs shuffle_window > 0"),
                         ({"cache_limit": "lots"}, "cache_limit must be bytes"),
                         ({"predownload": -1}, "predownload must be a number of samples")]:
        with pytest.raises(ConfigError, match=message):
            DomainMixtureDataset(cache, GLOBAL_BATCH, remote=remote.url, **{**mix, **bad})
    for bad in ({"cache_limit": "1gb"}, {"predownload": 8}):
        with pytest.raises(ConfigError, match="needs a remote"):
            DomainMixtureDataset(prepared, GLOBAL_BATCH, **bad)


def test_a_shard_evicted_under_a_reader_is_fetched_again(remote, tmp_path):
    split = CachedSplit(remote.join("code"), tmp_path / "cache" / "code", "train")
    first = split[0]["tokens"]
    split.evict(0)
    assert not split.is_ready(0) and _shards(tmp_path / "cache" / "code" / "train") == []
    split._ready.add(0)  # as a dataloader worker's copy believes, after another process evicted it
    np.testing.assert_array_equal(split[0]["tokens"], first)
    assert split.is_ready(0) and split.fetched_bytes == 2 * split.shard_bytes(0)


def _sample_in_last_shard(prepared: Path, domain: str) -> tuple[int, str]:
    local = LocalDataset(local=str(prepared / domain / "train"))
    return len(local) - 1, _shards(prepared / domain / "train")[-1]


def test_a_missing_remote_shard_is_an_error_naming_it(prepared, remote, tmp_path):
    index, shard = _sample_in_last_shard(prepared, "code")
    remote.delete(f"code/train/{shard}")
    dataset = DomainMixtureDataset(tmp_path / "cache", GLOBAL_BATCH, remote=remote.url)
    with pytest.raises(RemoteDataError, match=f"cannot fetch shard {re.escape(remote.join('code', 'train', shard))}"):
        dataset[(1, index)]
    assert dataset[(1, 0)]["input_ids"].numel() == SEQ_LEN  # other shards still read


def test_a_truncated_remote_shard_is_an_error_naming_it_and_is_not_kept(prepared, remote, tmp_path):
    index, shard = _sample_in_last_shard(prepared, "math")
    remote.write(f"math/train/{shard}", remote.read(f"math/train/{shard}")[:-10])
    cache = tmp_path / "cache"
    dataset = DomainMixtureDataset(cache, GLOBAL_BATCH, remote=remote.url)
    name = re.escape(remote.join("math", "train", shard))
    with pytest.raises(RemoteDataError, match=f"shard {name} is corrupt: {shard} has .* bytes, the index says"):
        dataset[(2, index)]
    assert not (cache / "math" / "train" / shard).exists()


def test_prepared_shards_carry_hashes_and_a_same_size_damage_is_caught(prepared, remote, tmp_path):
    for split in ("train", "eval"):
        index = json.loads(remote.read(f"prose/{split}/index.json"))
        assert all(shard["raw_data"]["hashes"].get("xxh64") for shard in index["shards"]), split
    index, shard = _sample_in_last_shard(prepared, "code")
    data = bytearray(remote.read(f"code/train/{shard}"))
    data[-3] ^= 0x55  # one token's bytes: same size, other value
    remote.write(f"code/train/{shard}", bytes(data))
    dataset = DomainMixtureDataset(tmp_path / "cache", GLOBAL_BATCH, remote=remote.url)
    name = re.escape(remote.join("code", "train", shard))
    with pytest.raises(RemoteDataError, match=f"shard {name} is corrupt: {shard} fails its xxh64 check"):
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
    nowhere = remote.join("nowhere")
    with pytest.raises(RemoteDataError, match=f"cannot download {re.escape(nowhere)}/manifest.json"):
        DomainMixtureDataset(tmp_path / "cache", GLOBAL_BATCH, remote=nowhere)
    assert len(DomainMixtureDataset(tmp_path / "cache", GLOBAL_BATCH, remote=remote.url).domains) == 3  # fixed
    fetch_manifest(remote.url, tmp_path / "cache2")
    with pytest.raises(RemoteDataError, match="holds data from remote .* not"):
        fetch_manifest(remote.join("elsewhere"), tmp_path / "cache2")
    if remote.folder is not None:
        with pytest.raises(RemoteDataError, match="not fetched from a remote"):
            fetch_manifest(remote.url, remote.folder)  # the remote's own folder is no cache


def test_domain_eval_reads_the_remote_eval_split_through_the_cache(prepared, remote, tmp_path):
    cache = tmp_path / "cache"
    cfg = OmegaConf.create({
        "model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": "unused"},
        "tokenizer": {"name": "unused"},
        "optimizer": {"name": "decoupled_adamw", "lr": 1e-3},
        "scheduler": {"name": "constant_with_warmup", "t_warmup": "0ba"},
        "train_loader": {"name": "domain_mixture", "data_dir": str(cache), "remote": remote.url},
        "max_duration": "2ba", "eval_interval": "1ba", "max_seq_len": SEQ_LEN, "seed": 17,
        "global_train_batch_size": 4, "device_train_microbatch_size": 4, "device_eval_batch_size": 4,
        "precision": "fp32",
        "eval_loader": {"name": "domain_eval", "data_dir": str(cache), "remote": remote.url},
    })
    _, train_cfg = make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms="all")
    datasets = [loader["dataset"] for loader in train_cfg.eval_loaders]
    assert [(d["remote"], d["local"]) for d in datasets] == [(remote.join(d), str(cache / d)) for d in DOMAINS]
    tokenizer = AutoTokenizer.from_pretrained(str(prepared.parent / "tokenizer"))
    evaluators, _, _ = build_evaluators(
        train_cfg.eval_loaders, None, None, tokenizer=tokenizer, device_eval_batch_size=4,
        icl_seq_len=SEQ_LEN, icl_subset_num_batches=None,
    )
    for evaluator, domain in zip(evaluators, DOMAINS, strict=True):
        rows = torch.cat([batch["input_ids"] for batch in evaluator.dataloader.dataloader])
        reader = LocalDataset(local=str(prepared / domain / "eval"))
        expected = np.stack([reader[i]["tokens"] for i in range(len(reader))]).astype(np.int64)
        np.testing.assert_array_equal(rows.numpy(), expected)
        assert _shards(cache / domain / "eval") == _shards(prepared / domain / "eval")


def test_upload_prepared_copies_the_folder_manifest_last(prepared, tmp_path):
    target = tmp_path / "bucket" / "mix"
    sent = upload_prepared(prepared, str(target))
    assert sent[-1] == str(target / "manifest.json")
    files = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file())
    assert sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file()) == files
    assert all((target / f).read_bytes() == (prepared / f).read_bytes() for f in files)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        upload_prepared(tmp_path / "bucket", str(tmp_path / "other"))


@pytest.mark.slow  # starts a process
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


@pytest.mark.slow
def test_a_two_rank_pruning_run_from_s3_trains_exactly_as_from_local_disk(tiny_assets, s3_bucket, tmp_path):
    """DDP on 2 ranks, train and eval data from S3 with the look-ahead and a cache limit: the same losses
    as the same data read from local disk in the same order."""
    from tests.helpers import run_training

    remote = f"{s3_bucket}/tiny-{uuid.uuid4().hex[:8]}"
    upload_prepared(tiny_assets / "mds", remote)
    common = [f"variables.assets={tiny_assets}", "max_duration=6ba", "variables.update_interval=3",
              "save_interval=3ba", "model.l0_module.lagrangian_warmup=3ba", "scheduler.t_warmup=2ba",
              "callbacks.data_scheduler.min_points=5", f"train_loader.shuffle_window={REMOTE_SHUFFLE_WINDOW}"]
    cache = tmp_path / "cache"
    runs = {"local": [], "s3": [f"variables.data={cache}", f"train_loader.remote={remote}",
                                f"eval_loader.remote={remote}", "train_loader.cache_limit=64mb"]}
    losses = {}
    for name, extra in runs.items():
        run_training("yamls/tiny/prune_llama_gqa.yaml", [*common, f"save_folder={tmp_path / name}", *extra])
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [line for line in lines if "loss/train/total" in line or "/eval/" in line]
    assert losses["s3"] and [json.loads(x) for x in losses["s3"]] == [json.loads(x) for x in losses["local"]]
    assert (cache / "manifest.json").is_file() and list(cache.glob("*/train/shard.*.mds"))
