"""The mixer's plan: which sample of which domain fills each slot of each global batch (pure numpy).

The data stream is a pure function of (seed, proportion schedule, global batch index). Domains of global
batch b are drawn from `np.random.default_rng([seed, 0, b])` with the proportions in force at b; the k-th
sample ever taken from domain d is element k mod N_d of a seeded order of that domain, a fresh order per
pass. Nothing depends on timing, world size, worker count or the global numpy RNG, so every rank computes
the same plan.

The order is local in shards (`ShardWindowOrder`, `shuffle_window` W > 0): each pass shuffles the domain's
shards, cuts that sequence into windows of W shards, and takes every sample of one window, in a shuffled
order, before the next window starts. A reader that downloads shards on first use (a remote) therefore
fetches each shard once per pass, and at any moment holds at most W shards of a domain that it has not
finished: bytes fetched <= bytes used + (domains x W x shard size), whatever the run's length. The price is
that a run which uses fewer samples of a domain than a window holds sees only that window's shards; small
shards (`prepare_data --shard-size-limit`) keep a short run diverse. W = 0 permutes the whole domain at once
(a keyed Feistel network, so no permutation is ever stored), the mixer's plan before windows existed.
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


@functools.lru_cache(maxsize=4096)
def _keys(*key: int) -> np.ndarray:
    keys = np.random.SeedSequence(list(key)).generate_state(_FEISTEL_ROUNDS, np.uint64)
    keys.flags.writeable = False  # shared through the cache
    return keys


class ShardWindowOrder:
    """The order of one domain's samples within a pass, taken W shards at a time (see the module docstring).

    Position q of pass p maps to a sample as follows: the shards, shuffled for the pass, laid end to end give
    a "pass space" [0, N); windows are runs of W consecutive shards in it; q falls in window w at offset
    q - start_w, which a keyed bijection of [0, size_w) moves within the window; the result is read back
    through the shard order to a sample index. Every step is a bijection, so a pass takes every sample once.
    """

    def __init__(self, shard_sizes: Sequence[int], window: int, seed: int, domain: int) -> None:
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        if len(sizes) == 0 or (sizes < 0).any() or sizes.sum() < 1:
            raise ValueError(f"a domain needs shards with samples, got shard sizes {list(shard_sizes)}")
        if window < 1:
            raise ValueError(f"shuffle window must be at least one shard, got {window}")
        self.shard_sizes, self.window, self.seed, self.domain = sizes, window, seed, domain
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.size = int(sizes.sum())
        self._passes: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _pass(self, domain_pass: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard order, start of each shuffled shard in pass space, start of each window in pass space)."""
        if domain_pass not in self._passes:
            n = len(self.shard_sizes)
            order = seeded_permutation(np.arange(n), n, _keys(self.seed, 2, self.domain, domain_pass))
            in_order = self.shard_sizes[order]
            starts = np.concatenate([[0], np.cumsum(in_order)[:-1]])
            self._passes[domain_pass] = (order, starts, starts[:: self.window])
            while len(self._passes) > 4:
                self._passes.popitem(last=False)
        self._passes.move_to_end(domain_pass)
        return self._passes[domain_pass]

    def samples(self, positions: np.ndarray, domain_pass: int) -> np.ndarray:
        """Sample index of each in-pass position (`positions` in [0, size))."""
        order, starts, window_starts = self._pass(domain_pass)
        positions = np.asarray(positions, dtype=np.int64)
        window = np.searchsorted(window_starts, positions, side="right") - 1
        window_ends = np.append(window_starts[1:], self.size)
        offset, window_size = positions - window_starts[window], window_ends[window] - window_starts[window]
        keys = np.stack([_keys(self.seed, 3, self.domain, domain_pass, int(w)) for w in window])
        moved = window_starts[window] + seeded_permutation(offset, window_size, keys)
        slot = np.searchsorted(starts, moved, side="right") - 1
        # Empty shards start where the next one does; `side="right"` lands on the last shard with that start,
        # the one that holds the position.
        return self.shard_starts[order[slot]] + (moved - starts[slot])

    def window_shards(self, first: int, last: int, domain_pass: int) -> np.ndarray:
        """The shards (file order), in the order they are read, of the windows that in-pass positions
        `first`..`last` fall in: a window's samples are spread over all its shards, so it needs all of them."""
        order, _, window_starts = self._pass(domain_pass)
        w0, w1 = np.searchsorted(window_starts, [first, last], side="right") - 1
        return order[w0 * self.window : (w1 + 1) * self.window]


class MixturePlan:
    """The pure schedule → sample mapping shared by every rank (no data access, no torch).

    `shard_sizes`: per domain, the number of samples in each of its shards (in file order); `shuffle_window`:
    W shards per window of the sample order (0: the whole domain at once)."""

    def __init__(
        self, domain_sizes: Sequence[int], global_batch_size: int, seed: int, initial_proportions: np.ndarray,
        shard_sizes: Sequence[Sequence[int]] | None = None, shuffle_window: int = 0,
    ) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}")
        if any(size < 1 for size in domain_sizes):
            raise ValueError(f"every domain needs at least one sample, got sizes {list(domain_sizes)}")
        if shuffle_window < 0:
            raise ValueError(f"shuffle_window must be >= 0 shards, got {shuffle_window}")
        if shuffle_window and (shard_sizes is None or len(shard_sizes) != len(domain_sizes)):
            raise ValueError("a shuffle window needs the shard sizes of every domain")
        self.shuffle_window = shuffle_window
        self.orders = [] if not shuffle_window else [
            ShardWindowOrder(sizes, shuffle_window, seed, d) for d, sizes in enumerate(shard_sizes)]  # fmt: skip
        for d, order in enumerate(self.orders):
            if order.size != domain_sizes[d]:
                raise ValueError(f"domain {d}: shard sizes sum to {order.size}, not its {domain_sizes[d]} samples")
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
        indices = np.empty(self.global_batch_size, dtype=np.int64)
        for domain in np.unique(domains):
            where = domains == domain
            indices[where] = self.domain_samples(int(domain), positions[where])
        return domains, indices, counts + per_domain

    def domain_samples(self, domain: int, positions: np.ndarray) -> np.ndarray:
        """Sample index of the k-th sample ever taken from `domain`, for each k in `positions` (any pass)."""
        positions = np.asarray(positions, dtype=np.int64)
        size = int(self.domain_sizes[domain])
        passes, in_pass = positions // size, positions % size
        out = np.empty(len(positions), dtype=np.int64)
        for domain_pass in np.unique(passes):
            where = passes == domain_pass
            if self.orders:
                out[where] = self.orders[domain].samples(in_pass[where], int(domain_pass))
            else:
                out[where] = seeded_permutation(in_pass[where], size, _keys(self.seed, 1, domain, int(domain_pass)))
        return out

    def upcoming_shards(self, domain: int, start: int, stop: int) -> np.ndarray:
        """With shard windows: the shards that positions [start, stop) of `domain` read, first needed first."""
        if not self.orders:
            raise ValueError("only a plan with a shuffle window knows its shards")
        size, parts = int(self.domain_sizes[domain]), []
        for domain_pass in range(start // size, (stop - 1) // size + 1) if stop > start else ():
            lo, hi = max(start, domain_pass * size), min(stop, (domain_pass + 1) * size) - 1
            parts.append(self.orders[domain].window_shards(lo % size, hi % size, domain_pass))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

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
