"""Throughput of the domain mixer against a plain StreamingDataset over the same shards, and its state size.

    python benchmarks/mixer_throughput.py [--data-dir PREPARED_DIR] [--batch-size 32] [--batches 200]

Without --data-dir a tiny 4-domain set is generated in a temporary folder. Both loaders read the same MDS
train shards and return int64 token batches; the ratio is mixer / streaming samples per second.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from streaming.base.util import clean_stale_shared_memory
from torch.utils.data import DataLoader

from drpruning.data.manifest import load_manifest
from drpruning.data.mixer import DomainBatchSampler, DomainMixtureDataset, build_domain_mixture_dataloader
from drpruning.demo.tiny import make_tiny_mds

WARMUP_BATCHES = 5


def _collate_tokens(samples: list[dict[str, np.ndarray]]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))


def _samples_per_second(loader: DataLoader, batches: int, batch_size: int) -> float:
    iterator = iter(loader)
    for _ in range(WARMUP_BATCHES):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def _loader_options(num_workers: int) -> dict:
    return {"num_workers": num_workers, "prefetch_factor": 2 if num_workers else None}


def mixer_throughput(data_dir: Path, batch_size: int, batches: int, num_workers: int) -> float:
    spec = build_domain_mixture_dataloader(
        None, batch_size, str(data_dir), num_workers=num_workers, persistent_workers=False, pin_memory=False
    )
    return _samples_per_second(spec.dataloader, batches, batch_size)


def streaming_throughput(data_dir: Path, batch_size: int, batches: int, num_workers: int) -> float:
    clean_stale_shared_memory()
    domains = [d["name"] for d in load_manifest(data_dir)["domains"]]
    dataset = StreamingDataset(
        streams=[Stream(local=str(data_dir / d / "train")) for d in domains],
        batch_size=batch_size,
        shuffle=False,
        epoch_size=(batches + WARMUP_BATCHES) * batch_size,  # repeat small data instead of running out
    )
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=_collate_tokens, **_loader_options(num_workers))
    try:
        return _samples_per_second(loader, batches, batch_size)
    finally:
        del loader, dataset
        clean_stale_shared_memory()


def state_size_after(data_dir: Path, batch_size: int, num_batches: int, update_every: int = 50) -> int:
    """JSON bytes of the checkpointed mixer state after `num_batches`, with a proportion update every
    `update_every` batches (as the data scheduler does); the counters are rebuilt by replaying the draws."""
    dataset = DomainMixtureDataset(data_dir, global_batch_size=batch_size)
    rng = np.random.default_rng(0)
    for batch in range(update_every, num_batches + 1, update_every):
        dataset.set_proportions(rng.dirichlet(np.ones(len(dataset.domains))), at_batch=batch)
    return len(json.dumps(dataset.state_dict(num_batches * batch_size, from_beginning=True)))


def sampler_milliseconds_per_batch(data_dir: Path, batch_size: int, batches: int) -> float:
    """Main-process cost of planning one global batch (domain draws and permutations), without data."""
    sampler = iter(DomainBatchSampler(DomainMixtureDataset(data_dir, global_batch_size=batch_size), 0, 1))
    start = time.perf_counter()
    for _ in range(batches):
        next(sampler)
    return (time.perf_counter() - start) / batches * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="a prepare_data output folder (default: generate one)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or make_tiny_mds(tmp, n_domains=4, seq_len=256, docs_per_domain=3000)
        print(f"data: {data_dir}; batch {args.batch_size}; {args.batches} timed batches after {WARMUP_BATCHES} warm-up")
        print(f"{'num_workers':>11} | {'mixer samples/s':>15} | {'streaming samples/s':>19} | {'ratio':>5}")
        for num_workers in (0, 2):
            mixer = mixer_throughput(data_dir, args.batch_size, args.batches, num_workers)
            plain = streaming_throughput(data_dir, args.batch_size, args.batches, num_workers)
            print(f"{num_workers:>11} | {mixer:>15.0f} | {plain:>19.0f} | {mixer / plain:>5.2f}")
        sizes = {n: state_size_after(data_dir, args.batch_size, n) for n in (1_000, 100_000)}
        for n, size in sizes.items():
            print(f"mixer state after {n:>7,} batches (update every 50): {size} bytes of JSON")
        print(f"state size ratio 100k / 1k batches: {sizes[100_000] / sizes[1_000]:.2f}")
        planning = sampler_milliseconds_per_batch(data_dir, args.batch_size, 1_000)
        print(f"sampler planning cost: {planning:.3f} ms per global batch of {args.batch_size}")


if __name__ == "__main__":
    main()
