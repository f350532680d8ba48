"""Remote data against the same data on local disk: bytes fetched per byte used, and step time.

    python benchmarks/remote_data.py [--steps 150] [--step-ms 40] [--latency-ms 100] [--repeats 3]

A 4-domain set with 16 KiB shards is prepared in a temporary folder and uploaded to an S3 server on loopback
(moto's, in its own process: `drpruning/demo/local_s3.py`). Each row reads `--steps` global batches of 16
through the mixer's DataLoader in the remote's sample order (`shuffle_window` 4), sleeping `--step-ms` per
step for the model's compute, from a fresh cache each time; the rows alternate, `--repeats` times.
Loopback answers in well under a millisecond, so each shard download is also delayed by `--latency-ms`, a
stand-in for a real bucket's first byte and transfer time (a 64 MiB shard takes about a second).

Reported per row: bytes of shards fetched over bytes of the samples consumed, the time for all steps
against local disk, and the mean and worst time a step waited for its batch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from streaming.base.storage.download import S3Downloader

from drpruning.data.mixer import (
    REMOTE_SHUFFLE_WINDOW,
    DomainBatchSampler,
    DomainMixtureDataset,
    collate_mixture_batch,
)
from drpruning.data.remote import upload_prepared
from drpruning.demo.local_s3 import local_s3_bucket
from drpruning.demo.tiny import make_tiny_mds

GLOBAL_BATCH = 16
TOKEN_BYTES = 2  # uint16 tokens


def add_latency(seconds: float) -> None:
    """Delay every S3 download by `seconds` (streaming's downloader, whichever thread calls it)."""
    download = S3Downloader.download

    def slow_download(self: S3Downloader, *args: object, **kwargs: object) -> None:
        time.sleep(seconds)
        return download(self, *args, **kwargs)

    S3Downloader.download = slow_download


def run(dataset: DomainMixtureDataset, steps: int, step_seconds: float) -> tuple[float, float, float, float]:
    """(bytes fetched / bytes used, seconds for all steps, mean and worst wait for a batch) over `steps`."""
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=DomainBatchSampler(dataset, 0, 1),
                                         collate_fn=collate_mixture_batch)
    used, waits = 0, []
    iterator = iter(loader)
    begin = time.perf_counter()
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(iterator)
        waits.append(time.perf_counter() - start)
        time.sleep(step_seconds)  # the model's step
        used += batch["input_ids"].numel() * TOKEN_BYTES
    total = time.perf_counter() - begin
    if dataset.shard_cache is not None:
        dataset.shard_cache.wait()
    fetched = sum(getattr(reader, "fetched_bytes", 0) for reader in dataset.readers)
    return fetched / used, total, statistics.mean(waits), max(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--step-ms", type=float, default=40.0, help="simulated compute per step")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="added to every shard download")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    add_latency(args.latency_ms / 1000)
    with tempfile.TemporaryDirectory() as tmp, local_s3_bucket("drpruning-bench") as bucket:
        root = Path(tmp)
        prepared = make_tiny_mds(root / "data", n_domains=4, seq_len=128, eval_sequences=4, docs_per_domain=1500,
                                 shard_size_limit=16 << 10)
        remote = f"{bucket}/mix"
        upload_prepared(prepared, remote)
        common = {"proportions": [0.4, 0.3, 0.2, 0.1], "seed": 17, "shuffle_window": REMOTE_SHUFFLE_WINDOW}
        rows = {
            "local disk": lambda cache: DomainMixtureDataset(prepared, GLOBAL_BATCH, **common),
            "S3, read on first use": lambda cache: DomainMixtureDataset(cache, GLOBAL_BATCH, remote=remote,
                                                                        predownload=0, **common),
            "S3, look-ahead (default)": lambda cache: DomainMixtureDataset(cache, GLOBAL_BATCH, remote=remote,
                                                                           **common),
            "S3, look-ahead + cache_limit": lambda cache: DomainMixtureDataset(
                cache, GLOBAL_BATCH, remote=remote, cache_limit="1536kb", **common),
        }
        results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in rows}
        for repeat in range(args.repeats):
            for i, (name, make) in enumerate(rows.items()):
                results[name].append(run(make(root / f"cache-{repeat}-{i}"), args.steps, args.step_ms / 1000))
        print(f"{args.steps} steps of {GLOBAL_BATCH} x 128 tokens, 16 KiB shards, {args.step_ms:g} ms compute per "
              f"step, {args.latency_ms:g} ms per download, {args.repeats} alternating repeats (medians over them)\n")
        print("| data | fetched / used | time for the steps vs local disk | mean wait per step | worst wait |")
        print("|---|---:|---:|---:|---:|")
        local = statistics.median(v[1] for v in results["local disk"])
        for name, values in results.items():
            ratio, total, mean, worst = (statistics.median(v[k] for v in values) for k in range(4))
            print(f"| {name} | {ratio:.2f} | {total / local:.2f}x | {mean * 1000:.1f} ms | {worst * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
