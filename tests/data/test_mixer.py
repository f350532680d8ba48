"""Domain mixer: determinism across world sizes, resume, update timing, proportions, wrapping, errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from composer import Callback, Trainer
from composer.core import DataSpec, State
from composer.loggers import Logger
from composer.models import HuggingFaceModel
from llmfoundry.data.dataloader import build_dataloader
from scipy.stats import chisquare
from streaming import LocalDataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from drpruning.data.mixer import (
    BATCHES_PER_EPOCH,
    DomainBatchSampler,
    DomainMixtureDataset,
    build_domain_mixture_dataloader,
    collate_mixture_batch,
)
from drpruning.data.mixture_plan import seeded_permutation
from drpruning.demo.tiny import make_tiny_mds, make_tiny_tokenizer
from drpruning.errors import ConfigError

GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mds(tmp_path_factory.mktemp("mixer"), n_domains=3, seq_len=32, eval_sequences=4,
                         docs_per_domain=40)


def _dataset(data_dir: Path, **kwargs) -> DomainMixtureDataset:
    return DomainMixtureDataset(data_dir, global_batch_size=kwargs.pop("global_batch_size", GLOBAL_BATCH), **kwargs)


def _global_batches(dataset: DomainMixtureDataset, world_size: int, num_batches: int) -> list[list[tuple[int, int]]]:
    """Concatenate every rank's slice, as the ranks of a real run would see them."""
    per_rank = [
        list(itertools.islice(DomainBatchSampler(dataset, rank, world_size), num_batches)) for rank in range(world_size)
    ]
    return [sum((per_rank[r][b] for r in range(world_size)), []) for b in range(num_batches)]


def _loader_batches(dataset: DomainMixtureDataset, num_workers: int, prefetch_factor: int | None):
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=DomainBatchSampler(dataset, 0, 1),
        collate_fn=collate_mixture_batch,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
    )
    return iter(loader)


def test_global_stream_is_independent_of_world_size(data_dir):
    dataset = _dataset(data_dir, proportions=[0.5, 0.3, 0.2], seed=5)
    single = _global_batches(dataset, 1, 30)
    for world_size in (2, 4):
        assert _global_batches(_dataset(data_dir, proportions=[0.5, 0.3, 0.2], seed=5), world_size, 30) == single
    assert _global_batches(_dataset(data_dir, proportions=[0.5, 0.3, 0.2], seed=6), 1, 30) != single


def test_batches_follow_the_contract(data_dir):
    spec = build_domain_mixture_dataloader(None, GLOBAL_BATCH, str(data_dir), max_seq_len=32, seed=1)
    assert isinstance(spec, DataSpec)
    batch = next(iter(spec.dataloader))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (GLOBAL_BATCH, 32)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["domain"].dtype == torch.long and batch["domain"].shape == (GLOBAL_BATCH,)
    dataset = spec.dataloader.dataset
    (domain, index), *_ = next(iter(DomainBatchSampler(_dataset(data_dir, seed=1), 0, 1)))
    reader = LocalDataset(local=str(data_dir / dataset.domains[domain] / "train"))
    np.testing.assert_array_equal(batch["input_ids"][0].numpy(), reader[index]["tokens"].astype(np.int64))
    assert batch["domain"][0].item() == domain
    assert spec.get_num_tokens_in_batch(batch) == GLOBAL_BATCH * 32


def test_resume_continues_bit_exactly_with_small_rank_invariant_state(data_dir):
    reference = _dataset(data_dir, seed=3)
    reference.set_proportions([0.2, 0.2, 0.6], at_batch=4)
    stream = _loader_batches(reference, 0, None)
    batches = [next(stream) for _ in range(7)]
    reference.set_proportions([0.0, 1.0, 0.0])  # scheduled at batch 7, after the checkpoint at batch 6
    batches += [next(stream) for _ in range(5)]

    state = reference.state_dict(num_samples=6 * GLOBAL_BATCH, from_beginning=True)
    assert state == json.loads(json.dumps(state))  # plain types only
    assert len(json.dumps(state)) < 400
    assert state["consumed_batches"] == 6 and len(state["schedule"]) == 2

    resumed = _dataset(data_dir, seed=3)
    resumed.load_state_dict(state)
    resumed_stream = _loader_batches(resumed, 0, None)
    for expected in batches[6:]:
        got = next(resumed_stream)
        assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["domain"], expected["domain"])
    assert resumed.proportions_at(7).tolist() == [0.0, 1.0, 0.0]

    # any rank's dataset reports the same state (Composer restores rank 0's copy everywhere)
    other_rank = _dataset(data_dir, seed=3)
    other_rank.set_proportions([0.2, 0.2, 0.6], at_batch=4)
    rank1 = iter(DomainBatchSampler(other_rank, 1, 2))
    _ = [next(rank1) for _ in range(7)]
    other_rank.set_proportions([0.0, 1.0, 0.0], at_batch=7)
    assert other_rank.state_dict(6 * GLOBAL_BATCH, True) == state


def test_state_size_does_not_grow_with_run_length(data_dir):
    dataset = _dataset(data_dir, seed=3)
    sampler = iter(DomainBatchSampler(dataset, 0, 1))
    sizes = []
    for step in range(1, 301):
        next(sampler)
        if step % 10 == 0:
            dataset.set_proportions(np.roll([0.5, 0.3, 0.2], step // 10))
        if step in (20, 300):
            sizes.append(len(json.dumps(dataset.state_dict(step * GLOBAL_BATCH, True))))
    assert sizes[1] <= sizes[0] + 10


@pytest.mark.parametrize("num_workers, prefetch_factor", [(0, None), (2, 1), (2, 2)])
def test_update_takes_effect_exactly_at_the_declared_batch(data_dir, num_workers, prefetch_factor):
    lag = num_workers * (prefetch_factor or 0)  # the batches the loader has requested beyond those consumed
    dataset = _dataset(data_dir, seed=11)
    stream = _loader_batches(dataset, num_workers, prefetch_factor)
    consumed = [next(stream)["domain"] for _ in range(3)]
    effective = dataset.set_proportions([0.0, 0.0, 1.0])
    assert effective == 3 + lag
    consumed += [next(stream)["domain"] for _ in range(lag + 3)]

    planned = _dataset(data_dir, seed=11)
    planned.set_proportions([0.0, 0.0, 1.0], at_batch=effective)
    expected = [torch.as_tensor(b).T[0] for b in _global_batches(planned, 1, len(consumed))]
    for got, want in zip(consumed, expected, strict=True):
        assert torch.equal(got, want)
    assert all((d == 2).all() for d in consumed[effective:])
    assert not (consumed[effective - 1] == 2).all()
    with pytest.raises(ValueError, match="already produced"):
        dataset.set_proportions([1.0, 0.0, 0.0], at_batch=effective)


def test_observed_domain_frequencies_match_proportions(data_dir):
    proportions = np.array([0.55, 0.3, 0.15])
    dataset = _dataset(data_dir, proportions=proportions.tolist(), seed=2024)
    domains = np.concatenate([dataset.plan.batch_domains(b) for b in range(1500)])
    observed = np.bincount(domains, minlength=3)
    assert chisquare(observed, proportions * len(domains)).pvalue > 0.01
    assert chisquare(observed, np.full(3, len(domains) / 3)).pvalue < 1e-6


def test_no_sample_repeats_within_a_domain_until_it_wraps(data_dir):
    dataset = _dataset(data_dir, seed=9)
    sizes = dataset.plan.domain_sizes
    pairs = np.array(sum(_global_batches(dataset, 1, int(3 * sizes.max() * 3 / GLOBAL_BATCH) + 1), []))
    for domain, size in enumerate(sizes):
        order = pairs[pairs[:, 0] == domain, 1]
        passes = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
        assert len(passes) >= 2
        for one_pass in passes:
            np.testing.assert_array_equal(np.sort(one_pass), np.arange(size))
        assert not np.array_equal(passes[0], passes[1])  # a fresh order per pass


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100, 1024, 1025])
def test_seeded_permutation_is_a_bijection(size):
    image = seeded_permutation(np.arange(size), size, (1, 2, 3, 4, 5, 6))
    np.testing.assert_array_equal(np.sort(image), np.arange(size))


def test_one_epoch_covers_the_run_and_workers_match_the_main_process(data_dir):
    spec = build_domain_mixture_dataloader(None, GLOBAL_BATCH, str(data_dir), num_workers=2, seed=4)
    assert len(spec.dataloader) == BATCHES_PER_EPOCH
    total_samples = sum(len(r) for r in spec.dataloader.dataset.readers)
    num_batches = 2 * total_samples // GLOBAL_BATCH  # two full passes over the data
    with_workers = list(itertools.islice(spec.dataloader, num_batches))
    main_process = _loader_batches(_dataset(data_dir, seed=4), 0, None)
    for batch in with_workers:
        assert torch.equal(batch["input_ids"], next(main_process)["input_ids"])


def test_registered_in_foundry_and_checks_the_tokenizer(data_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(data_dir.parent / "tokenizer"))
    spec = build_dataloader({"name": "domain_mixture", "data_dir": str(data_dir), "seed": 1}, tokenizer, 4)
    assert isinstance(spec.dataloader.dataset, DomainMixtureDataset)
    assert spec.dataloader.dataset.domains == ["prose", "code", "math"]
    smaller = make_tiny_tokenizer(tmp_path / "small", vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary of 512 tokens but the tokenizer .* has 300"):
        build_dataloader({"name": "domain_mixture", "data_dir": str(data_dir)}, smaller, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"domains": ["prose", "poetry"]}, r"unknown domain\(s\) \['poetry'\].*known domains: \['prose', 'code', 'math'\]"),
        ({"proportions": [0.5, 0.5]}, "got 2 proportions for 3 domains"),
        ({"proportions": [1.2, -0.1, -0.1]}, "non-negative"),
        ({"proportions": [0.3, 0.3, 0.3]}, "must sum to 1"),
        ({"proportions": {"prose": 0.5, "poetry": 0.5}}, "unknown domain"),
        ({"proportions": {"prose": 0.5, "code": 0.5}}, r"misses domain\(s\) \['math'\]"),
        ({"max_seq_len": 64}, "max_seq_len 64 exceeds the prepared seq_len 32"),
        ({"max_seq_len": 24}, "max_seq_len 24 is shorter than the seq_len 32 .* only the first 24 tokens"),
    ],
)
def test_invalid_configuration_is_rejected(data_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _dataset(data_dir, **kwargs)


def test_invalid_setup_errors(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        _dataset(tmp_path)
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        DomainBatchSampler(_dataset(data_dir), 0, 3)
    with pytest.raises(ValueError, match="must sum to 1"):
        _dataset(data_dir).set_proportions([0.5, 0.2, 0.2])
    state = _dataset(data_dir, seed=1).state_dict(0, True)
    with pytest.raises(ValueError, match="seed"):
        _dataset(data_dir, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        _dataset(data_dir, seed=1, global_batch_size=4).load_state_dict(state)


def test_builder_slices_the_global_batch_by_rank_and_passes_composers_check(data_dir, monkeypatch):
    """Composer's DataSpec rejects map-style loaders without a DistributedSampler when world_size > 1."""
    from composer.utils import dist

    reference = next(iter(build_domain_mixture_dataloader(None, GLOBAL_BATCH, str(data_dir), seed=8).dataloader))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    halves = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_global_rank", lambda rank=rank: rank)
        spec = build_domain_mixture_dataloader(None, GLOBAL_BATCH // 2, str(data_dir), seed=8)
        assert spec.dataloader.dataset.global_batch_size == GLOBAL_BATCH
        halves.append(next(iter(spec.dataloader)))
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), reference["input_ids"])
    assert torch.equal(torch.cat([h["domain"] for h in halves]), reference["domain"])


class _RecordBatches(Callback):
    """Records every train batch and schedules a proportion change at the end of batch 2 (like the scheduler)."""

    def __init__(self) -> None:
        self.batches: dict[int, torch.Tensor] = {}
        self.effective_batches: list[int] = []

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self.batches[int(state.timestamp.batch)] = state.batch["input_ids"].clone()

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == 2:
            self.effective_batches.append(state.train_dataloader.dataset.set_proportions([0.0, 0.0, 1.0]))


def _tiny_trainer(data_dir: Path, save_folder: Path, recorder: _RecordBatches, load_path: str | None) -> Trainer:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)
    model = HuggingFaceModel(LlamaForCausalLM(config), use_logits=True)
    spec = build_domain_mixture_dataloader(None, 4, str(data_dir), num_workers=2, prefetch_factor=1, seed=5)
    return Trainer(
        model=model, train_dataloader=spec, max_duration="6ba", device="cpu", device_train_microbatch_size=4,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1), save_folder=str(save_folder),
        save_interval="3ba", load_path=load_path, callbacks=[recorder], progress_bar=False,
    )


@pytest.mark.slow
def test_composer_checkpoint_resume_replays_the_same_batches(data_dir, tmp_path):
    """A real Composer run with workers: the update lands at batch 2 + lag and resume from ba3 is bit-exact."""
    first = _RecordBatches()
    _tiny_trainer(data_dir, tmp_path, first, None).fit()
    assert first.effective_batches == [2 + 2 * 1]
    state = torch.load(tmp_path / "ep0-ba3-rank0.pt", weights_only=False)["state"]["dataset_state"]["train"]
    assert state["consumed_batches"] == 3 and state["schedule"][-1] == [4, [0.0, 0.0, 1.0]]
    resumed = _RecordBatches()
    _tiny_trainer(data_dir, tmp_path / "resumed", resumed, str(tmp_path / "ep0-ba3-rank0.pt")).fit()
    assert sorted(resumed.batches) == [3, 4, 5]
    for batch, input_ids in resumed.batches.items():
        assert torch.equal(input_ids, first.batches[batch])


# ---- shard windows: a domain's order taken W shards at a time ----------------------------------------


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three domains of many small shards (1 KB: about a dozen 32-token samples each)."""
    return make_tiny_mds(tmp_path_factory.mktemp("sharded"), n_domains=3, seq_len=32, eval_sequences=4,
                         docs_per_domain=40, shard_size_limit=1024)


def _shard_of(dataset: DomainMixtureDataset, domain: int, samples: np.ndarray) -> np.ndarray:
    sizes = [shard.samples for shard in dataset.readers[domain].shards]
    return np.searchsorted(np.cumsum(sizes), samples, side="right")


@pytest.mark.parametrize("window", [1, 3])
def test_shard_windows_keep_the_mixers_guarantees_and_read_few_shards_at_a_time(sharded_dir, window):
    dataset = _dataset(sharded_dir, proportions=[0.5, 0.3, 0.2], seed=5, shuffle_window=window)
    assert all(len(r.shards) >= 6 for r in dataset.readers)
    single = _global_batches(dataset, 1, 40)
    for world_size in (2, 4):
        again = _dataset(sharded_dir, proportions=[0.5, 0.3, 0.2], seed=5, shuffle_window=window)
        assert _global_batches(again, world_size, 40) == single
    whole = _global_batches(_dataset(sharded_dir, proportions=[0.5, 0.3, 0.2], seed=5, shuffle_window=0), 1, 40)
    assert whole != single

    # resume bit-exactly from a mid-run state
    state = dataset.state_dict(num_samples=17 * GLOBAL_BATCH, from_beginning=True)
    assert state["shuffle_window"] == window
    resumed = _dataset(sharded_dir, proportions=[0.5, 0.3, 0.2], seed=5, shuffle_window=window)
    resumed.load_state_dict(state)
    assert _global_batches(resumed, 1, 23) == single[17:]

    # every pass takes every sample once, a fresh order per pass, and never holds more than W unfinished shards
    sizes = dataset.plan.domain_sizes
    pairs = np.array(sum(_global_batches(dataset, 1, int(2.5 * sizes.max() / (0.2 * GLOBAL_BATCH))), []))
    for domain, size in enumerate(sizes):
        order = pairs[pairs[:, 0] == domain, 1]
        passes = [order[i: i + size] for i in range(0, len(order) - size + 1, size)]
        assert len(passes) >= 2 and not np.array_equal(passes[0], passes[1])
        shard_samples = np.bincount(_shard_of(dataset, domain, np.arange(size)))
        for one_pass in passes:
            np.testing.assert_array_equal(np.sort(one_pass), np.arange(size))
            seen = np.zeros_like(shard_samples)
            for shard in _shard_of(dataset, domain, one_pass):
                seen[shard] += 1
                unfinished = int(((seen > 0) & (seen < shard_samples)).sum())
                assert unfinished <= window, (domain, unfinished)


def test_a_checkpoint_of_another_shuffle_window_is_refused_by_name(sharded_dir):
    state = _dataset(sharded_dir, seed=5, shuffle_window=2).state_dict(4 * GLOBAL_BATCH, True)
    with pytest.raises(ConfigError, match="shuffle_window=2 but this run has 0; resume with train_loader.shuffle_window: 2"):
        _dataset(sharded_dir, seed=5).load_state_dict(state)
    old = {**_dataset(sharded_dir, seed=5).state_dict(4 * GLOBAL_BATCH, True), "format_version": 1}
    del old["shuffle_window"]  # written before windows existed: the whole-domain order
    _dataset(sharded_dir, seed=5).load_state_dict(old)
    with pytest.raises(ConfigError, match="shuffle_window must be a number of shards"):
        _dataset(sharded_dir, seed=5, shuffle_window=-1)


def test_a_twelve_step_remote_run_fetches_at_most_four_times_the_bytes_it_uses(tmp_path):
    """The issue's check: 12 global batches of 8 from a remote of 2 KB shards (64-token sequences)."""
    remote = make_tiny_mds(tmp_path / "prepared", n_domains=4, seq_len=64, eval_sequences=4, docs_per_domain=150,
                           shard_size_limit=2048)

    def fetched_per_used(cache: Path, **kwargs) -> float:
        dataset = DomainMixtureDataset(cache, GLOBAL_BATCH, seed=17, remote=str(remote), **kwargs)
        assert all(len(r.shards) >= 8 for r in dataset.readers)
        batches = list(itertools.islice(DomainBatchSampler(dataset, 0, 1), 12))
        used = 0
        for batch in batches:
            for key in batch:
                used += dataset[key]["input_ids"].numel() * 2  # uint16 tokens
        if dataset.shard_cache is not None:
            dataset.shard_cache.wait()  # what the look-ahead fetched counts too
        fetched = sum(p.stat().st_size for p in cache.rglob("shard.*.mds"))
        assert fetched == sum(r.fetched_bytes for r in dataset.readers)
        return fetched / used

    windowed = fetched_per_used(tmp_path / "cache")  # the remote default, with its look-ahead
    assert windowed <= 4.0, windowed
    assert fetched_per_used(tmp_path / "cache-no-look-ahead", predownload=0) <= windowed
    assert fetched_per_used(tmp_path / "cache-whole", shuffle_window=0) > 4.0, "the whole-domain order reads far more"
