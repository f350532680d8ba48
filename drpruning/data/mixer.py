"""Deterministic, resumable dynamic domain mixer (LLM-Foundry dataloader `domain_mixture`).

Why this shape (see docs/architecture.md and the notes §6.6):
- The data stream is a pure function of (seed, proportion schedule, global batch index). Domains of global
  batch b are drawn from `np.random.default_rng([seed, 0, b])` with the proportions in force at b; the k-th
  sample ever taken from domain d is element k mod N_d of a seeded permutation of that domain, a fresh
  permutation per pass. Nothing depends on timing, world size, worker count or the global numpy RNG.
- Each rank computes the same global batch and keeps its slice, so world size 1 and 2 see the same samples.
- The batch sampler runs in the main process, so proportion updates are visible whatever `num_workers` is;
  an update takes effect at a declared batch that the DataLoader has not requested yet (`consumed + lag`).
- Resume state is O(domains + scheduled updates): the consumed batch, per-domain counters, the schedule.
- One epoch covers the whole run, so Composer never rolls over an epoch.
"""

from __future__ import annotations

import bisect
import functools
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import DataSpec
from composer.utils import dist
from llmfoundry.data.utils import get_tokens_per_batch_func
from streaming import LocalDataset
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import PreTrainedTokenizerBase

from drpruning.data.checks import check_seq_len, check_tokenizer
from drpruning.data.prepare import load_manifest, select_domains
from drpruning.data.remote import CachedSplit, fetch_manifest, join_remote
from drpruning.distributions import proportions_in_domain_order
from drpruning.errors import ConfigError

STATE_FORMAT_VERSION = 1
BATCHES_PER_EPOCH = 1 << 40
"""Length of the single epoch: far beyond any run, so Composer never reaches an epoch boundary."""

_FEISTEL_ROUNDS = 6
_COUNT_CACHE_SIZE = 256


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-mixing round function on uint64 arrays."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=1024)
def _round_keys(seed: int, domain: int, domain_pass: int) -> np.ndarray:
    """Feistel keys of one pass over one domain: a fresh permutation per pass, independent of other seeds."""
    keys = np.random.SeedSequence([seed, 1, domain, domain_pass]).generate_state(_FEISTEL_ROUNDS, np.uint64)
    keys.flags.writeable = False  # shared through the cache
    return keys


def seeded_permutation(positions: np.ndarray, sizes: int | np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Image of each `positions[i]` (in [0, sizes[i])) under a keyed bijection of [0, sizes[i]).

    A balanced Feistel network on the smallest even number of bits that covers the size, with cycle
    walking back into range: O(1) memory per domain however large, unlike a materialised permutation.
    `keys` holds the round keys, shape [rounds] or [len(positions), rounds]; the whole batch is encrypted
    in one vectorised pass so the cost per global batch stays flat in the number of domains.
    """
    positions = np.asarray(positions, dtype=np.uint64)
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.uint64), positions.shape)
    keys = np.broadcast_to(np.asarray(keys, dtype=np.uint64), (*positions.shape, np.shape(keys)[-1]))
    # bit length of max(size - 1, 1) via the float exponent (exact for sizes below 2**53)
    bits = np.frexp(np.maximum(sizes.astype(np.float64) - 1, 1))[1]
    shift = np.maximum(1, (bits + 1) // 2).astype(np.uint64)
    mask = (np.uint64(1) << shift) - np.uint64(1)

    def encrypt(values: np.ndarray, where: np.ndarray | slice) -> np.ndarray:
        left, right = values >> shift[where], values & mask[where]
        for round_keys in np.moveaxis(keys[where], -1, 0):
            left, right = right, left ^ (_mix64(right ^ round_keys) & mask[where])
        return (left << shift[where]) | right

    out = encrypt(positions, slice(None))
    outside = np.flatnonzero(out >= sizes)
    while len(outside):
        out[outside] = encrypt(out[outside], outside)
        outside = outside[out[outside] >= sizes[outside]]
    return out.astype(np.int64)


class MixturePlan:
    """The pure schedule → sample mapping shared by every rank (no data access, no torch)."""

    def __init__(
        self, domain_sizes: Sequence[int], global_batch_size: int, seed: int, initial_proportions: np.ndarray
    ) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}")
        if any(size < 1 for size in domain_sizes):
            raise ValueError(f"every domain needs at least one sample, got sizes {list(domain_sizes)}")
        self.domain_sizes = np.asarray(domain_sizes, dtype=np.int64)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._schedule_batches: list[int] = [0]
        self._schedule_proportions: list[np.ndarray] = [np.asarray(initial_proportions, dtype=np.float64)]
        self.start_batch = 0
        """Where the next iteration starts: 0, or the consumed batch of a loaded state."""
        self.next_batch = 0
        """The first global batch the sampler has not produced yet; schedule changes must not precede it."""
        self._count_anchor = (0, np.zeros(len(domain_sizes), dtype=np.int64))
        self._recent_counts: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def num_domains(self) -> int:
        return len(self.domain_sizes)

    def proportions_at(self, batch: int) -> np.ndarray:
        if batch < self._schedule_batches[0]:
            raise ValueError(
                f"proportions before batch {self._schedule_batches[0]} are not known (resumed from a checkpoint)"
            )
        return self._schedule_proportions[bisect.bisect_right(self._schedule_batches, batch) - 1].copy()

    def schedule(self, proportions: np.ndarray, at_batch: int) -> int:
        """Put `proportions` in force from `at_batch` on, replacing any later scheduled change."""
        if at_batch < self.next_batch:
            raise ValueError(
                f"cannot change proportions at batch {at_batch}: the dataloader already produced batches up to "
                f"{self.next_batch - 1}; schedule at >= {self.next_batch} (consumed + lag)"
            )
        keep = bisect.bisect_left(self._schedule_batches, at_batch)
        del self._schedule_batches[keep:], self._schedule_proportions[keep:]
        self._schedule_batches.append(at_batch)
        self._schedule_proportions.append(np.asarray(proportions, dtype=np.float64).copy())
        return at_batch

    def batch_domains(self, batch: int) -> np.ndarray:
        """Domain of each slot of global batch `batch`."""
        rng = np.random.default_rng([self.seed, 0, batch])
        return rng.choice(self.num_domains, size=self.global_batch_size, p=self.proportions_at(batch))

    def counts_before(self, batch: int) -> np.ndarray:
        """Samples taken from each domain in batches [0, batch), replayed from the nearest known point."""
        anchor_batch, anchor_counts = self._count_anchor
        if batch < anchor_batch:
            raise ValueError(f"domain counters before batch {anchor_batch} are not known")
        start, counts = anchor_batch, anchor_counts
        for known_batch, known_counts in self._recent_counts.items():
            if start < known_batch <= batch:
                start, counts = known_batch, known_counts
        counts = counts.copy()
        for b in range(start, batch):
            counts += np.bincount(self.batch_domains(b), minlength=self.num_domains)
        return counts

    def global_batch(self, batch: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(domains, sample indices, counters after the batch) for global batch `batch`.

        `counts` are the counters before the batch; they are remembered so that a checkpoint taken a few
        batches behind the prefetching sampler does not need a long replay.
        """
        self._remember_counts(batch, counts)
        domains = self.batch_domains(batch)
        # position of each slot in its domain's consumption order: counter + rank among same-domain slots
        slot_order = np.argsort(domains, kind="stable")
        per_domain = np.bincount(domains, minlength=self.num_domains)
        first_slot = np.concatenate([[0], np.cumsum(per_domain)[:-1]])
        rank_in_domain = np.empty(self.global_batch_size, dtype=np.int64)
        rank_in_domain[slot_order] = np.arange(self.global_batch_size) - np.repeat(first_slot, per_domain)
        positions = counts[domains] + rank_in_domain
        sizes = self.domain_sizes[domains]
        passes = positions // sizes
        keys = np.empty((self.global_batch_size, _FEISTEL_ROUNDS), dtype=np.uint64)
        for domain, domain_pass in {(int(d), int(p)) for d, p in zip(domains, passes, strict=True)}:
            keys[(domains == domain) & (passes == domain_pass)] = _round_keys(self.seed, domain, domain_pass)
        indices = seeded_permutation(positions % sizes, sizes, keys)
        return domains, indices, counts + per_domain

    def _remember_counts(self, batch: int, counts: np.ndarray) -> None:
        self._recent_counts[batch] = counts.copy()
        self._recent_counts.move_to_end(batch)
        while len(self._recent_counts) > _COUNT_CACHE_SIZE:
            self._recent_counts.popitem(last=False)

    def state_dict(self, consumed_batches: int) -> dict[str, Any]:
        first_in_force = bisect.bisect_right(self._schedule_batches, consumed_batches) - 1
        return {
            "consumed_batches": consumed_batches,
            "domain_counts": self.counts_before(consumed_batches).tolist(),
            "schedule": [
                [b, p.tolist()]
                for b, p in zip(
                    self._schedule_batches[first_in_force:], self._schedule_proportions[first_in_force:], strict=True
                )
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        consumed = int(state["consumed_batches"])
        counts = np.asarray(state["domain_counts"], dtype=np.int64)
        if counts.shape != (self.num_domains,):
            raise ValueError(f"state has {counts.shape} domain counters for {self.num_domains} domains")
        self._schedule_batches = [int(b) for b, _ in state["schedule"]]
        self._schedule_proportions = [np.asarray(p, dtype=np.float64) for _, p in state["schedule"]]
        self._count_anchor = (consumed, counts)
        self._recent_counts.clear()
        self.start_batch = self.next_batch = consumed


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
        lag: int = 0,
        split: str = "train",
        remote: str | None = None,
    ) -> None:
        if remote is not None:
            fetch_manifest(remote, data_dir)
        manifest = load_manifest(data_dir)
        selected = select_domains(manifest, domains, data_dir)
        seq_len = int(manifest["seq_len"])
        if max_seq_len is not None:
            check_seq_len(manifest, data_dir, max_seq_len, "domain_mixture")
        if lag < 0:
            raise ConfigError(f"lag must be >= 0, got {lag}")
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
        self.lag = lag
        self.seed = seed
        self.remote = remote
        self.readers = [
            LocalDataset(local=str(self.data_dir / d / split)) if remote is None
            else CachedSplit(join_remote(remote, d), self.data_dir / d, split)
            for d in selected
        ]
        self.plan = MixturePlan([len(r) for r in self.readers], global_batch_size, seed, self.initial_proportions)

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
            **self.plan.state_dict(consumed),
        }

    def load_state_dict(self, obj: Mapping[str, Any]) -> None:
        """Continue exactly where the checkpoint's run stopped (any world size with the same global batch)."""
        expected = {"domains": list(self.domains), "seed": self.seed, "global_batch_size": self.global_batch_size}
        for key, value in expected.items():
            if obj.get(key) != value:
                raise ConfigError(f"checkpointed mixer has {key}={obj.get(key)!r} but this run has {value!r}")
        if obj.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(f"unsupported mixer state format {obj.get('format_version')!r}")
        self.plan.load_state_dict(obj)


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
            rank_slots = slice(first_slot, first_slot + self.device_batch_size)
            yield list(zip(domains[rank_slots].tolist(), indices[rank_slots].tolist(), strict=True))


def collate_mixture_batch(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into the batch contract: input_ids, labels (= input_ids), domain."""
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
    """
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
        lag=num_workers * prefetch_factor,
        remote=remote,
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
