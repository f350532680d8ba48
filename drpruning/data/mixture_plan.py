"""The mixer's plan: which sample of which domain fills each slot of each global batch (pure numpy).

The data stream is a pure function of (seed, proportion schedule, global batch index). Domains of global
batch b are drawn from `np.random.default_rng([seed, 0, b])` with the proportions in force at b; the k-th
sample ever taken from domain d is element k mod N_d of a seeded permutation of that domain (a keyed
Feistel network, so no permutation is ever stored), a fresh permutation per pass. Nothing depends on
timing, world size, worker count or the global numpy RNG, so every rank computes the same plan.
"""

from __future__ import annotations

import bisect
import functools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

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
