"""Remote shards ahead of the step, in a cache of bounded size (the mixer's main process drives it).

The mixer's plan says which samples every domain takes next (`MixturePlan.domain_samples`), whatever the
proportions do later: the k-th sample of a domain is fixed by the seed. After handing out each batch the
sampler calls `ShardCache.update` with the shards that batch reads and the shards of the next `predownload`
samples of every domain. Those are downloaded in order by background threads, so a step rarely waits for
a download; with `cache_limit`, the least recently used shards that no recent or upcoming batch needs are
removed once the cache holds more bytes than the limit.

Prefetching is an optimisation only: a failed prefetch is left to the read, which retries and raises the
error that names the shard, and a shard evicted under a reader (another rank on the same machine, a
dataloader worker) is fetched again by that reader.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from drpruning.data.remote import CachedSplit

log = logging.getLogger(__name__)

RECENT_BATCHES = 8
"""Batches whose shards are never evicted: those the dataloader may still be reading."""
DOWNLOAD_THREADS = 2
"""Prefetch threads; each split downloads one shard at a time, so up to this many domains at once."""


class ShardCache:
    """Prefetch and size limit over the cached splits of one mixture (one per process that samples)."""

    def __init__(self, splits: Sequence[CachedSplit], cache_limit: int | None = None) -> None:
        self.splits = list(splits)
        self.cache_limit = cache_limit
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[tuple[int, int], Future[None]] = {}
        self._cached: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()  # LRU: bytes
        self._recent: collections.deque[set[tuple[int, int]]] = collections.deque(maxlen=RECENT_BATCHES)
        self._lock = threading.Lock()
        self._warned = False

    def update(self, in_use: Sequence[np.ndarray], upcoming: Sequence[np.ndarray]) -> None:
        """`in_use[d]`: shards of domain d the batch just handed out reads; `upcoming[d]`: the shards its next
        samples read, first needed first. Starts their downloads, then evicts down to the limit."""
        batch = {(d, int(s)) for d, shards in enumerate(in_use) for s in np.unique(shards)}
        self._recent.append(batch)
        with self._lock:
            for key in batch:
                self._touch(key)
        ahead = list(dict.fromkeys((d, int(s)) for d, shards in enumerate(upcoming) for s in shards))
        for key in ahead:
            self._prefetch(key)
        if self.cache_limit is not None:
            self._evict(keep=set().union(*self._recent, ahead))

    def wait(self) -> None:
        """Block until every started prefetch has finished (tests and benchmarks)."""
        with self._lock:
            pending = list(self._pending.values())
        for future in pending:
            future.exception()

    def _touch(self, key: tuple[int, int]) -> None:
        """Record that the shard is (or is about to be) in the cache, as the most recently used."""
        self._cached[key] = self.splits[key[0]].shard_bytes(key[1])
        self._cached.move_to_end(key)

    def _prefetch(self, key: tuple[int, int]) -> None:
        """Download the shard in the background unless it is cached or on its way; its bytes count at once."""
        domain, shard = key
        with self._lock:
            if key in self._pending:
                return
            self._touch(key)
            if self.splits[domain].is_ready(shard):
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="drpruning-prefetch")
            future = self._executor.submit(self.splits[domain].fetch, shard)
            self._pending[key] = future
        future.add_done_callback(lambda done, key=key: self._fetched(key, done))

    def _fetched(self, key: tuple[int, int], future: Future[None]) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if future.exception() is not None:  # the read that needs it retries and raises the error naming it
                self._cached.pop(key, None)
                log.debug("prefetch of domain %d shard %d failed: %s", key[0], key[1], future.exception())

    def _evict(self, keep: set[tuple[int, int]]) -> None:
        with self._lock:
            total = sum(self._cached.values())
            victims = []
            for key, size in self._cached.items():  # least recently used first
                if total <= self.cache_limit:
                    break
                if key not in keep and key not in self._pending:
                    victims.append(key)
                    total -= size
            for key in victims:
                del self._cached[key]
        for domain, shard in victims:
            self.splits[domain].evict(shard)
        if total > self.cache_limit and not self._warned:
            self._warned = True
            log.warning("cache_limit %d bytes is below the %d bytes of shards the next batches need: the cache "
                        "goes over it; raise cache_limit or lower predownload / shuffle_window", self.cache_limit,
                        total)
