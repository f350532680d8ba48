"""Deterministic, resumable dynamic domain mixer (LLM-Foundry dataloader `domain_mixture`).

Why this shape:
- The data stream is a pure function of (seed, proportion schedule, global batch index): the plan in
  `drpruning/data/mixture_plan.py` says which sample fills each slot; this module reads and batches them.
- Each rank computes the same global batch and keeps its slice, so world size 1 and 2 see the same samples.
- The batch sampler runs in the main process, so proportion updates are visible whatever `num_workers` is;
  an update takes effect at a declared batch that the DataLoader has not requested yet (`consumed + lag`).
- Resume state is O(domains + scheduled updates): the consumed batch, per-domain counters, the schedule.
- One epoch covers the whole run, so Composer never rolls over an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import DataSpec
from composer.utils import dist
from llmfoundry.data.utils import get_tokens_per_batch_func
from streaming.base.util import bytes_to_int
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import PreTrainedTokenizerBase

from drpruning.data.checks import check_seq_len, check_tokenizer
from drpruning.data.manifest import load_manifest, open_split, select_domains
from drpruning.data.mixture_plan import MixturePlan
from drpruning.data.remote import (
    DEFAULT_DOWNLOAD_RETRY,
    DEFAULT_DOWNLOAD_TIMEOUT,
    CachedSplit,
    fetch_manifest,
    join_remote,
)
from drpruning.data.shard_cache import RECENT_BATCHES, ShardCache
from drpruning.distributions import proportions_in_domain_order
from drpruning.errors import ConfigError

STATE_FORMAT_VERSION = 2
"""2 records `shuffle_window`; a format-1 state was written by the whole-domain order (shuffle_window 0)."""
REMOTE_SHUFFLE_WINDOW = 4
"""Shards per window of a domain's sample order when the data is remote (mixture_plan.py): a run downloads
each shard once per pass and holds at most this many unfinished shards per domain."""
PREDOWNLOAD_BATCHES = 8
"""Default look-ahead with a remote, in global batches: the samples of about the next 8 steps."""
BATCHES_PER_EPOCH = 1 << 40
"""Length of the single epoch: far beyond any run, so Composer never reaches an epoch boundary."""

class DomainMixtureDataset(Dataset):
    """Map-style dataset over per-domain MDS train splits, indexed by (domain, index) pairs.

    Holds the proportion schedule (the API the data scheduler drives) and Composer's dataset-state protocol.
    With `remote`, the prepared folder lives there and `data_dir` is its local cache (drpruning/data/remote.py).
    """

    def __init__(
        self,
        data_dir: str | Path,
        global_batch_size: int,
        domains: Sequence[str] | None = None,
        proportions: Mapping[str, float] | Sequence[float] | None = None,
        seed: int = 17,
        max_seq_len: int | None = None,
        split: str = "train",
        remote: str | None = None,
        shuffle_window: int | None = None,
        download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
        download_retry: int = DEFAULT_DOWNLOAD_RETRY,
        predownload: int | None = None,
        cache_limit: int | str | None = None,
    ) -> None:
        if remote is not None:
            fetch_manifest(remote, data_dir, download_timeout)
        manifest = load_manifest(data_dir)
        selected = select_domains(manifest, domains, data_dir)
        seq_len = int(manifest["seq_len"])
        if max_seq_len is not None:
            check_seq_len(manifest, data_dir, max_seq_len, "domain_mixture")
        self.data_dir = Path(data_dir)
        self.domains: list[str] = selected
        self.initial_proportions = (
            np.full(len(selected), 1.0 / len(selected))
            if proportions is None
            else proportions_in_domain_order(proportions, selected)
        )
        self.max_seq_len = max_seq_len or seq_len
        self.vocab_size = int(manifest["vocab_size"])
        self.manifest = manifest
        self.seed = seed
        self.remote = remote
        self.readers = [
            open_split(self.data_dir, manifest, d, split) if remote is None
            else CachedSplit(join_remote(remote, d), self.data_dir / d, split, download_timeout, download_retry)
            for d in selected
        ]
        if shuffle_window is None:
            shuffle_window = 0 if remote is None else REMOTE_SHUFFLE_WINDOW
        if isinstance(shuffle_window, bool) or not isinstance(shuffle_window, int) or shuffle_window < 0:
            raise ConfigError(f"shuffle_window must be a number of shards >= 0 (0: the whole domain), "
                              f"got {shuffle_window!r}")
        self.shuffle_window = shuffle_window
        self.plan = MixturePlan([len(r) for r in self.readers], global_batch_size, seed, self.initial_proportions,
                                shard_sizes=[[shard.samples for shard in r.shards] for r in self.readers],
                                shuffle_window=shuffle_window)  # fmt: skip
        self.predownload = _check_predownload(predownload, remote, global_batch_size)
        limit = _check_cache_limit(cache_limit, remote, shuffle_window, self.predownload, global_batch_size,
                                   self.readers)
        self.shard_cache = ShardCache(self.readers, limit) if self.predownload or limit is not None else None
        self._looked_ahead_to = np.zeros(len(selected), dtype=np.int64)  # per domain: positions planned ahead

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "shard_cache": None}  # dataloader workers read; the sampling process prefetches

    def look_ahead(self, batch: int, domains: np.ndarray, indices: np.ndarray, counts_after: np.ndarray) -> None:
        """After global batch `batch` (`domains`, `indices`): prefetch the shards of the next `predownload`
        samples, shared among the domains by the proportions in force, and keep the cache within its limit
        (remote data only). With shard windows, whole windows: cheap to plan, and a window's samples are
        spread over all its shards; without, the shards of each sample not planned before."""
        if self.shard_cache is None:
            return
        in_use = [reader.shards_of(indices[domains == d]) for d, reader in enumerate(self.readers)]
        horizon = counts_after + np.ceil(self.predownload * self.plan.proportions_at(batch)).astype(np.int64)
        if self.shuffle_window:
            upcoming = [self.plan.upcoming_shards(d, counts_after[d], horizon[d]) for d in range(len(self.readers))]
        else:
            first = np.maximum(counts_after, self._looked_ahead_to)
            self._looked_ahead_to = np.maximum(horizon, self._looked_ahead_to)
            upcoming = [reader.shards_of(self.plan.domain_samples(d, np.arange(first[d], horizon[d])))
                        for d, reader in enumerate(self.readers)]  # fmt: skip
        self.shard_cache.update(in_use, upcoming)

    @property
    def global_batch_size(self) -> int:
        return self.plan.global_batch_size

    def proportions_at(self, batch: int) -> np.ndarray:
        """The proportions in force for global batch `batch`."""
        return self.plan.proportions_at(batch)

    def set_proportions(
        self, proportions: Mapping[str, float] | Sequence[float] | np.ndarray, at_batch: int | None = None
    ) -> int:
        """Use `proportions` from global batch `at_batch` (default: the first batch not yet requested by the
        dataloader, i.e. consumed + lag) on; returns that batch. Call with identical arguments on every rank."""
        values = proportions_in_domain_order(proportions, self.domains)
        return self.plan.schedule(values, self.plan.next_batch if at_batch is None else int(at_batch))

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        domain, index = key
        tokens = self.readers[domain][index]["tokens"][: self.max_seq_len]
        return {"input_ids": torch.from_numpy(tokens.astype(np.int64)), "domain": domain}

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Composer's dataset-state hook: small, plain and rank-invariant (rank 0's copy is restored)."""
        if num_samples % self.global_batch_size:
            raise ValueError(f"{num_samples} samples is not a whole number of {self.global_batch_size}-sample batches")
        consumed = num_samples // self.global_batch_size + (0 if from_beginning else self.plan.start_batch)
        return {
            "format_version": STATE_FORMAT_VERSION,
            "domains": list(self.domains),
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "shuffle_window": self.shuffle_window,
            **self.plan.state_dict(consumed),
        }

    def load_state_dict(self, obj: Mapping[str, Any]) -> None:
        """Continue exactly where the checkpoint's run stopped (any world size with the same global batch)."""
        expected = {"domains": list(self.domains), "seed": self.seed, "global_batch_size": self.global_batch_size}
        for key, value in expected.items():
            if obj.get(key) != value:
                raise ConfigError(f"checkpointed mixer has {key}={obj.get(key)!r} but this run has {value!r}")
        version = obj.get("format_version")
        if version not in (1, STATE_FORMAT_VERSION):
            raise ValueError(f"unsupported mixer state format {version!r}")
        saved_window = obj.get("shuffle_window", 0)  # format 1: the whole-domain order
        if saved_window != self.shuffle_window:
            raise ConfigError(f"checkpointed mixer has shuffle_window={saved_window} but this run has "
                              f"{self.shuffle_window}; resume with train_loader.shuffle_window: {saved_window}")
        self.plan.load_state_dict(obj)


def _check_predownload(predownload: int | None, remote: str | None, global_batch_size: int) -> int:
    if remote is None:
        if predownload:
            raise ConfigError("train_loader.predownload needs a remote: a local folder has nothing to download")
        return 0
    if predownload is None:
        return PREDOWNLOAD_BATCHES * global_batch_size
    if isinstance(predownload, bool) or not isinstance(predownload, int) or predownload < 0:
        raise ConfigError(f"predownload must be a number of samples >= 0, got {predownload!r}")
    return predownload


def _check_cache_limit(cache_limit: int | str | None, remote: str | None, shuffle_window: int, predownload: int,
                       global_batch_size: int, readers: Sequence[Any]) -> int | None:
    """The limit in bytes; refused where it cannot hold what the next batches read."""
    if cache_limit is None:
        return None
    if remote is None:
        raise ConfigError("train_loader.cache_limit needs a remote: a local folder is not a cache")
    if shuffle_window == 0:
        raise ConfigError("train_loader.cache_limit needs shuffle_window > 0: the whole-domain order reads every "
                          "shard of a domain in every stretch of the run, so no shard could be evicted for long")
    try:
        limit = bytes_to_int(cache_limit)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"cache_limit must be bytes as an int or a string such as '10gb', got {cache_limit!r}") \
            from error
    # Per domain, each at the largest shard size: the windows that the batches the loader may still be reading
    # and the look-ahead span, plus the window either side of them.
    needed = 0
    for reader in readers:
        sizes = [reader.shard_bytes(i) for i in range(len(reader.shards))]
        per_window = max(1, len(reader) * shuffle_window // len(sizes))
        spanned = -(-(RECENT_BATCHES * global_batch_size + predownload) // per_window)
        needed += max(sizes) * shuffle_window * (2 + spanned)
    if limit < needed:
        raise ConfigError(f"cache_limit {cache_limit!r} ({limit} bytes) cannot hold the shards the next batches read: "
                          f"at least {needed} bytes for these domains, shuffle_window {shuffle_window} and "
                          f"predownload {predownload}")
    return limit


class DomainBatchSampler(DistributedSampler):
    """Yields this rank's slice of each global batch as (domain, index) pairs, from the plan's resume point.

    Subclasses DistributedSampler only to pass Composer's DataSpec check for map-style datasets; the base
    class's index partitioning does not apply, so its __init__ is deliberately not called.
    """

    def __init__(self, dataset: DomainMixtureDataset, rank: int, world_size: int) -> None:
        if dataset.global_batch_size % world_size:
            raise ConfigError(
                f"global batch size {dataset.global_batch_size} is not divisible by world size {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = world_size
        self.device_batch_size = dataset.global_batch_size // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Recorded only: the stream is one epoch long and keyed by global batch, not by epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return BATCHES_PER_EPOCH

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        plan = self.dataset.plan
        start = plan.start_batch
        counts = plan.counts_before(start)
        first_slot = self.rank * self.device_batch_size
        for batch in range(start, start + BATCHES_PER_EPOCH):
            plan.next_batch = batch + 1
            domains, indices, counts = plan.global_batch(batch, counts)
            self.dataset.look_ahead(batch, domains, indices, counts)
            rank_slots = slice(first_slot, first_slot + self.device_batch_size)
            yield list(zip(domains[rank_slots].tolist(), indices[rank_slots].tolist(), strict=True))


def collate_mixture_batch(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into the batch contract: `input_ids` and `labels` (= input_ids: packed data has no
    padding and the model shifts), `LongTensor[B, S]`; `domain`, `LongTensor[B]`, each sample's index into
    the dataset's `domains` (the model sums per-domain losses by it for the `data_scheduler`)."""
    input_ids = torch.stack([s["input_ids"] for s in samples])
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "domain": torch.tensor([s["domain"] for s in samples], dtype=torch.long),
    }


def build_domain_mixture_dataloader(
    tokenizer: PreTrainedTokenizerBase | None,
    device_batch_size: int | float,
    data_dir: str,
    domains: Sequence[str] | None = None,
    proportions: Mapping[str, float] | Sequence[float] | None = None,
    seed: int = 17,
    max_seq_len: int | None = None,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    persistent_workers: bool = True,
    pin_memory: bool | None = None,
    timeout: float = 0,
    remote: str | None = None,
    shuffle_window: int | None = None,
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
    download_retry: int = DEFAULT_DOWNLOAD_RETRY,
    predownload: int | None = None,
    cache_limit: int | str | None = None,
) -> DataSpec:
    """LLM-Foundry dataloader builder (`train_loader: {name: domain_mixture, ...}`).

    Args (the keys of the `train_loader` block; foundry passes `tokenizer` and `device_batch_size`):
        tokenizer: the run's tokenizer, checked against the one the data was prepared with.
        device_batch_size: sequences per rank per batch; the global batch is `device_batch_size * world_size`.
        data_dir: a `prepare_data` output folder, or with `remote` the local cache its shards download into.
        domains: the domains to mix (default: all, in manifest order).
        proportions: initial sampling proportions, a `{domain: p}` map or a list in `domains` order (default:
            uniform). The `data_scheduler` callback replaces them as training runs.
        seed: fixes which domain every sample slot draws and each domain's sample order; the same seed
            gives the same batches on any number of ranks and workers.
        max_seq_len: must equal the length the data was prepared with, when given.
        num_workers, prefetch_factor, persistent_workers, timeout: as for `torch.utils.data.DataLoader`.
            New proportions take effect `num_workers * prefetch_factor` batches after the batch that set
            them (the batches the loader has already requested), identically on every rank.
        pin_memory: default "when CUDA is available".
        remote: any location mosaicml-streaming reads (s3://, gs://, a shared path, ...).
        shuffle_window: shards per window of each domain's sample order (`drpruning/data/mixture_plan.py`):
            a pass takes every sample of W shards before moving to the next W, so a remote run fetches about
            the bytes it uses. 0 orders the whole domain at once. Default: 0 for a local folder (free on a
            local disk), 4 with `remote` (set it explicitly to read a local copy in the remote's order).
        download_timeout, download_retry: seconds per shard download and retries after a failed one
            (streaming's names; with `remote` only).
        predownload: with `remote`, samples looked ahead of the stream (shared among the domains by their
            proportions): their shards are downloaded by a background thread before the step reads them
            (drpruning/data/shard_cache.py). Default 8 global batches; 0 downloads on first read only.
        cache_limit: with `remote`, most bytes of shards kept in `data_dir` (an int or streaming's "10gb"
            form): the least recently used shards no upcoming batch needs are removed. Default: no limit.
    """
    if download_timeout <= 0 or download_retry < 0:
        raise ConfigError(f"need download_timeout > 0 and download_retry >= 0, got {download_timeout}, {download_retry}")
    if device_batch_size != int(device_batch_size) or device_batch_size < 1:
        raise ConfigError(f"domain_mixture needs a positive integer device batch size, got {device_batch_size}")
    if num_workers < 0 or (num_workers > 0 and prefetch_factor < 1):
        raise ConfigError(f"need num_workers >= 0 and prefetch_factor >= 1, got {num_workers}, {prefetch_factor}")
    world_size, rank = dist.get_world_size(), dist.get_global_rank()
    dataset = DomainMixtureDataset(
        data_dir,
        global_batch_size=int(device_batch_size) * world_size,
        domains=domains,
        proportions=proportions,
        seed=seed,
        max_seq_len=max_seq_len,
        remote=remote,
        shuffle_window=shuffle_window,
        download_timeout=download_timeout,
        download_retry=download_retry,
        predownload=predownload,
        cache_limit=cache_limit,
    )
    if tokenizer is not None:
        check_tokenizer(dataset.manifest, data_dir, tokenizer, "domain_mixture")
    multiprocess = num_workers > 0
    loader = DataLoader(
        dataset,
        batch_sampler=DomainBatchSampler(dataset, rank=rank, world_size=world_size),
        collate_fn=collate_mixture_batch,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if multiprocess else None,
        persistent_workers=persistent_workers and multiprocess,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        timeout=timeout,
    )
    return DataSpec(dataloader=loader, get_num_tokens_in_batch=get_tokens_per_batch_func())
