"""Calibration data for the importance pass: which sequences it reads, and the `l0_module.calibration` block.

Sequences are the first ⌈N/D⌉ or ⌊N/D⌋ of a seeded permutation of each domain's split (equal shares: the
mixture's proportions are not known before the train loader exists), so the pass that reads them is a pure
function of (weights, data folder, settings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from drpruning.data.checks import check_tokenizer
from drpruning.data.manifest import load_manifest, open_split, select_domains
from drpruning.errors import CalibrationError, ConfigError

LAYER_MEASURES = ("cosine", "drop_loss")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Where the calibration sequences come from and how the pass runs (`l0_module.calibration`)."""

    data_dir: str
    """A `prepare_data` folder, usually the train loader's (`data_dir: ${variables.data}`)."""
    num_sequences: int = 32
    """Sequences in the pass, in equal shares per domain."""
    seed: int = 0
    """Which sequences of each domain are taken."""
    batch_size: int = 4
    """Sequences per forward of the pass."""
    max_seq_len: int | None = None
    """Cut each sequence to this many tokens (default: the prepared length)."""
    domains: tuple[str, ...] | None = None
    """Domains to draw from (default: all, in manifest order)."""
    split: str = "train"
    """Prepared split to read."""
    layer_measure: str = "cosine"
    """How a whole layer is scored: `cosine` (ShortGPT's Block Influence, same pass) or `drop_loss`
    (the loss increase with the block skipped, one extra pass per layer)."""
    device: str | None = None
    """Where the pass runs (default: the model's device, else CUDA when available, else CPU)."""

    def __post_init__(self) -> None:
        for name in ("num_sequences", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CalibrationError(f"calibration.{name}={value!r} must be a positive integer")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            raise CalibrationError(f"calibration.max_seq_len={self.max_seq_len!r} must be an integer ≥ 2 (or null)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CalibrationError(f"calibration.seed={self.seed!r} must be a non-negative integer")
        if self.layer_measure not in LAYER_MEASURES:
            raise CalibrationError(f"calibration.layer_measure={self.layer_measure!r} must be one of "
                                   f"{', '.join(LAYER_MEASURES)}")  # fmt: skip

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> CalibrationConfig:
        """From a yaml block; `data_dir` is required (the callback runs before the train loader exists)."""
        values = dict(values or {})
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CalibrationError(f"unknown calibration keys {unknown}; known: {sorted(known)}")
        if not values.get("data_dir"):
            raise CalibrationError(
                "l0_module.init: importance needs l0_module.calibration.data_dir, a prepare_data folder "
                "(usually the train loader's: calibration: {data_dir: ${variables.data}})"
            )
        values["data_dir"] = str(values["data_dir"])
        if values.get("domains") is not None:
            values["domains"] = tuple(values["domains"])
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        """Plain data; `data_dir` absolute so a cached pass is only reused for the same folder."""
        out = dataclasses.asdict(self)
        out["data_dir"] = str(Path(self.data_dir).resolve())
        out["domains"] = None if self.domains is None else list(self.domains)
        out.pop("device")  # where the pass runs does not change what it measures
        return out


def check_calibration_tokenizer(config: CalibrationConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse calibration data tokenized with another tokenizer than the run's (importance would be measured
    on token ids that mean other text)."""
    try:
        manifest = load_manifest(config.data_dir)
    except (FileNotFoundError, ValueError) as error:
        raise CalibrationError(f"calibration data: {error}") from None
    check_tokenizer(manifest, config.data_dir, tokenizer, "l0_module.calibration")


def calibration_sequences(config: CalibrationConfig) -> tuple[Tensor, dict[str, int]]:
    """[N, S] token ids and the number taken from each domain (equal shares, seeded choice per domain)."""
    try:
        manifest = load_manifest(config.data_dir)
        domains = select_domains(manifest, config.domains, config.data_dir)
    except (FileNotFoundError, ValueError) as error:
        raise CalibrationError(f"calibration data: {error}") from None
    seq_len = int(manifest["seq_len"])
    length = seq_len if config.max_seq_len is None else min(seq_len, config.max_seq_len)
    share, extra = divmod(config.num_sequences, len(domains))
    rows: list[np.ndarray] = []
    counts: dict[str, int] = {}
    for index, domain in enumerate(domains):
        count = share + (index < extra)
        counts[domain] = count
        if count == 0:
            continue
        try:
            reader = open_split(config.data_dir, manifest, domain, config.split)
        except ConfigError as error:
            raise CalibrationError(f"calibration data: {error}") from None
        if len(reader) < count:
            raise CalibrationError(f"calibration data: domain {domain!r} has {len(reader)} {config.split} "
                                   f"sequences, fewer than the {count} asked for")  # fmt: skip
        picks = np.random.default_rng([config.seed, index]).permutation(len(reader))[:count]
        rows += [np.asarray(reader[int(i)]["tokens"][:length], dtype=np.int64) for i in picks]
    return torch.from_numpy(np.stack(rows)), counts
